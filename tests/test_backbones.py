"""Backbones (llama, mixtral, native transformer, mamba, retnet, bitnet) on tiny shapes: causal vs non-causal
rows, padding invariance, incremental decoding with the cache (or recurrent state) equal to the full pass,
gradient flow, MoE aux loss."""

from __future__ import annotations

import pytest
import torch

from valle_cli.backbones.base import attention_mask, build_backbone, layout
from valle_cli.config import load_config
from valle_cli.errors import ConfigError

NAMES = ["llama", "mixtral", "transformer", "mamba", "retnet", "bitnet"]


def overrides(name: str) -> list[str]:
    extra = ["model.backbone_options.n_experts=4"] if name == "mixtral" else []
    return [f"model.backbone={name}", *extra]


@pytest.fixture(params=NAMES)
def backbone(request):
    torch.manual_seed(0)
    return build_backbone(load_config("tiny", overrides(request.param)).model).eval()


def run(bb, x, lengths, causal, cache=None, past=0, use_cache=False):
    b, t, _ = x.shape
    mask = attention_mask(lengths, causal, t, past=past)
    pos = (torch.arange(t) + past)[None].expand(b, t)
    return bb(x, mask, pos, cache=cache, use_cache=use_cache, layout=layout(lengths, causal, t))


def test_causal_mask_hides_the_future_and_full_mask_does_not(backbone):
    x = torch.randn(1, 10, 64)
    y = x.clone()
    y[0, 7] += 1.0  # change a later position
    lengths = torch.tensor([10])
    a, b = run(backbone, x, lengths, True).hidden, run(backbone, y, lengths, True).hidden
    torch.testing.assert_close(a[0, :7], b[0, :7])  # causal: earlier positions unchanged
    a, b = run(backbone, x, lengths, False).hidden, run(backbone, y, lengths, False).hidden
    assert (a[0, :7] - b[0, :7]).abs().max() > 1e-4  # non-causal: position i sees later positions


@pytest.mark.parametrize("causal", [True, False])
def test_padding_does_not_change_real_positions(backbone, causal):
    x = torch.randn(1, 6, 64)
    alone = run(backbone, x, torch.tensor([6]), causal).hidden
    padded = torch.cat([x, torch.randn(1, 4, 64)], dim=1)
    batch = torch.cat([padded, torch.randn(1, 10, 64)], dim=0)
    out = run(backbone, batch, torch.tensor([6, 10]), causal).hidden
    torch.testing.assert_close(out[0, :6], alone[0], atol=1e-5, rtol=1e-4)


def test_incremental_with_cache_equals_full_sequence(backbone):
    x = torch.randn(2, 9, 64)
    lengths = torch.tensor([9, 9])
    full = run(backbone, x, lengths, True).hidden
    out = run(backbone, x[:, :5], torch.tensor([5, 5]), True, use_cache=True)
    steps = [out.hidden]
    cache = out.cache
    for t in range(5, 9):
        out = run(backbone, x[:, t : t + 1], torch.tensor([1, 1]), True, cache=cache, past=t, use_cache=True)
        cache = out.cache
        steps.append(out.hidden)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-4)


def test_gradients_reach_every_parameter(backbone):
    backbone.train()
    x = torch.randn(2, 8, 64, requires_grad=True)
    out = run(backbone, x, torch.tensor([8, 5]), torch.tensor([True, False]))
    loss = out.hidden.pow(2).mean() + (out.aux_loss if out.aux_loss is not None else 0)
    loss.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    dead = [
        n
        for n, p in backbone.named_parameters()
        if p.requires_grad and (p.grad is None or not p.grad.abs().sum())
    ]
    # mixtral: an expert that no token was routed to in this tiny batch legitimately gets no gradient
    dead = [n for n in dead if "experts" not in n]
    assert not dead, dead


def test_mixtral_reports_router_loss_in_training_only():
    cfg = load_config("tiny", overrides("mixtral")).model
    bb = build_backbone(cfg)
    x = torch.randn(1, 6, 64)
    bb.train()
    aux = run(bb, x, torch.tensor([6]), True).aux_loss
    assert aux is not None and aux.item() > 0
    bb.eval()
    assert run(bb, x, torch.tensor([6]), True).aux_loss is None


@pytest.mark.parametrize(
    ("kind", "reason"),
    [("flash_attention_2", "non-causal rows and prefix masks"), ("flash", "takes no attention mask")],
)
def test_maskless_attention_kernels_are_refused_with_the_reason(kind, reason):
    for name in ("llama", "transformer"):
        with pytest.raises(ConfigError, match=reason):
            build_backbone(load_config("tiny", [f"model.backbone={name}", f"model.attention={kind}"]).model)


def test_recurrent_backbones_have_no_attention_to_choose():
    with pytest.raises(ConfigError, match="the mamba backbone has no attention"):
        build_backbone(load_config("tiny", ["model.backbone=mamba", "model.attention=math"]).model)
    assert build_backbone(load_config("tiny", ["model.backbone=retnet"]).model).attention == "auto"


@pytest.mark.parametrize("kind", ["mem_efficient", "cudnn"])
def test_gpu_kernels_say_so_on_a_cpu(kind):
    torch.manual_seed(0)
    bb = build_backbone(load_config("tiny", ["model.backbone=transformer", f"model.attention={kind}"]).model)
    x = torch.randn(1, 4, 64)
    with pytest.raises(ConfigError, match=f"model.attention={kind} is one of torch's CUDA kernels"):
        run(bb.train(), x, torch.tensor([4]), True)  # training on a CPU with it: said
    torch.manual_seed(0)
    auto = build_backbone(load_config("tiny", ["model.backbone=transformer"]).model).eval()
    with torch.no_grad():  # a model trained with it still runs off a GPU: the same function, torch's kernel
        torch.testing.assert_close(
            run(bb.eval(), x, torch.tensor([4]), True).hidden, run(auto, x, torch.tensor([4]), True).hidden
        )


@pytest.mark.parametrize("name", ["llama", "mixtral", "transformer", "bitnet"])
def test_every_attention_choice_gives_the_same_output(name):
    """auto, sdpa, math and eager are the same function (the kernel changes, not the result)."""
    outs = {}
    x = torch.randn(2, 7, 64)
    for kind in ("auto", "sdpa", "math", "eager"):
        torch.manual_seed(0)
        bb = build_backbone(load_config("tiny", [*overrides(name), f"model.attention={kind}"]).model).eval()
        with torch.no_grad():
            outs[kind] = run(bb, x, torch.tensor([7, 4]), torch.tensor([True, False])).hidden
    for kind in ("sdpa", "math", "eager"):
        torch.testing.assert_close(outs[kind][0], outs["auto"][0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(outs[kind][1, :4], outs["auto"][1, :4], atol=1e-5, rtol=1e-4)


def test_attention_settings_of_older_configs_are_upgraded():
    old = load_config("tiny", ["model.attn_implementation=sdpa", "model.sdpa_kernel=efficient"]).model
    assert old.attention == "mem_efficient"
    assert load_config("tiny", ["model.attn_implementation=eager"]).model.attention == "eager"
    assert (
        load_config("tiny", ["model.attn_implementation=sdpa", "model.sdpa_kernel=auto"]).model.attention
        == "auto"
    )


def test_attention_mask_shape_and_rules():
    m = attention_mask(
        torch.tensor([3, 2]), torch.tensor([True, False]), 3, past=2, past_lengths=torch.tensor([2, 1])
    )
    assert m.shape == (2, 1, 3, 5)
    allowed = m[:, 0] == 0
    # seq 0: causal, cache of 2 real keys
    assert allowed[0, 0].tolist() == [True, True, True, False, False]
    assert allowed[0, 2].tolist() == [True, True, True, True, True]
    # seq 1: non-causal, one real cached key, two real new tokens, the third query is padding
    assert allowed[1, 0].tolist() == [True, False, True, True, False]
    assert allowed[1, 2].tolist() == [True, False, True, True, True]  # padding query: real keys and itself


@pytest.mark.parametrize("backbone_name", NAMES)
def test_gradient_checkpointing_gives_the_same_gradients(backbone_name):
    def grads(checkpointing: bool):
        torch.manual_seed(0)
        cfg = load_config(
            "tiny",
            [*overrides(backbone_name), f"model.gradient_checkpointing={checkpointing}"],
        ).model
        bb = build_backbone(cfg).train()
        if checkpointing and backbone_name in ("llama", "mixtral"):
            assert bb.model.is_activation_checkpointing
        torch.manual_seed(1)
        x = torch.randn(2, 7, 64)
        out = run(bb, x, torch.tensor([7, 4]), torch.tensor([True, False]))
        out.hidden.pow(2).mean().backward()
        return {n: p.grad.clone() for n, p in bb.named_parameters() if p.grad is not None}

    plain, ckpt = grads(False), grads(True)
    assert plain.keys() == ckpt.keys() and plain
    for n in plain:
        torch.testing.assert_close(plain[n], ckpt[n], atol=1e-5, rtol=1e-4)


def test_sdpa_kernel_choice_is_applied():
    cfg = load_config("tiny", ["model.backbone=transformer", "model.attention=math"]).model
    bb = build_backbone(cfg).eval()
    assert bb.attention == "math"
    x = torch.randn(1, 5, 64)
    torch.manual_seed(0)
    auto = build_backbone(load_config("tiny", ["model.backbone=transformer"]).model).eval()
    auto.load_state_dict(bb.state_dict())
    torch.testing.assert_close(
        run(bb, x, torch.tensor([5]), True).hidden, run(auto, x, torch.tensor([5]), True).hidden
    )
    from torch.nn.attention import SDPBackend

    seen = []
    original = torch.nn.functional.scaled_dot_product_attention

    def spy(*a, **k):
        seen.append(torch.backends.cuda.math_sdp_enabled() and not torch.backends.cuda.flash_sdp_enabled())
        return original(*a, **k)

    torch.nn.functional.scaled_dot_product_attention = spy
    try:
        run(bb, x, torch.tensor([5]), True)
    finally:
        torch.nn.functional.scaled_dot_product_attention = original
    assert seen and all(seen), SDPBackend.MATH  # only the math kernel was allowed inside the backbone


def test_growing_kv_cache_equals_concatenation_through_growth_forks_and_reorders(monkeypatch):
    """The buffer cache (`GrowingLayer`) gives the same hidden states as transformers' concatenating
    DynamicCache while it grows past its room; forks of a filled cache never write into the shared buffer
    (the original and a sibling stay as they were); a reordered (beam search) cache keeps decoding right."""
    from transformers import DynamicCache

    from valle_cli.backbones import hf

    torch.manual_seed(0)
    bb = build_backbone(load_config("tiny").model).eval()
    monkeypatch.setattr(hf.growing_layer_class(), "ROOM", 2)  # regrow every few steps
    x = torch.randn(2, 7, bb.model.config.hidden_size)
    steps = torch.randn(2, 9, bb.model.config.hidden_size)

    def run(cache, xs, start=7):
        outs = []
        for k in range(xs.shape[1]):
            pos = torch.full((xs.shape[0], 1), start + k)
            out = bb(xs[:, k : k + 1], None, pos, cache=cache, use_cache=True)
            cache = out.cache
            outs.append(out.hidden)
        return torch.cat(outs, 1), cache

    pos = torch.arange(7)[None].expand(2, 7)
    with torch.no_grad():
        plain = bb(x, None, pos, cache=DynamicCache(config=bb.model.config), use_cache=True).cache
        want, _ = run(plain, steps)
        grown = bb(x, None, pos, use_cache=True).cache
        assert isinstance(grown.layers[0], hf.growing_layer_class())
        before = [layer.keys.clone() for layer in grown.layers]
        a, _ = run(bb.fork_cache(grown), steps)
        b, _ = run(bb.fork_cache(grown), steps.flip(1))  # a sibling with other tokens
        again, _ = run(bb.fork_cache(grown), steps)
        torch.testing.assert_close(a, want)
        torch.testing.assert_close(again, want)  # the sibling did not touch the shared tensors
        assert not torch.allclose(a, b)
        assert all(torch.equal(layer.keys, k) for layer, k in zip(grown.layers, before, strict=True))
        # beam search: rows swapped mid-way
        _, cache = run(bb.fork_cache(grown), steps[:, :4])
        cache.reorder_cache(torch.tensor([1, 0]))
        rest, _ = run(cache, steps[:, 4:].flip(0), start=11)
        plain = bb(x, None, pos, cache=DynamicCache(config=bb.model.config), use_cache=True).cache
        _, plain = run(plain, steps[:, :4])
        plain.reorder_cache(torch.tensor([1, 0]))
        want_rest, _ = run(plain, steps[:, 4:].flip(0), start=11)
        torch.testing.assert_close(rest, want_rest)
