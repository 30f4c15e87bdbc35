"""The VALL-E model: the three things the original gets wrong (NAR without causal mask, summed embeddings of
all lower levels, plus the AR pass staying causal), losses, accuracy, padding, and the preset sizes."""

from __future__ import annotations

import pytest
import torch

from valle_cli.config import load_config
from valle_cli.model.valle import VALLE, Sample, count_parameters


def tiny(backbone: str = "llama", **kw) -> VALLE:
    torch.manual_seed(0)
    extra = ["model.backbone_options.n_experts=4"] if backbone == "mixtral" else []
    cfg = load_config("tiny", [f"model.backbone={backbone}", *extra]).model
    return VALLE(cfg, n_symbols=623, **kw).eval()


def sample(level: int = 0, fr: int = 12, fp: int = 9, seed: int = 0, task: str = "tts") -> Sample:
    g = torch.Generator().manual_seed(seed)
    return Sample(
        phonemes=torch.cat([torch.tensor([1]), torch.randint(4, 623, (7,), generator=g), torch.tensor([2])]),
        prompt=torch.randint(0, 1024, (8, fp), generator=g),
        response=torch.randint(0, 1024, (8, fr), generator=g),
        level=level,
        task=task,
    )


def hidden(model: VALLE, s: Sample) -> torch.Tensor:
    return model([s], return_hidden=True).hidden[0]


@pytest.mark.parametrize("backbone", ["llama", "mixtral", "transformer", "mamba", "retnet", "bitnet"])
def test_nar_positions_see_later_positions(backbone):
    """Position i of a NAR pass changes when a later response position changes (no causal mask)."""
    model = tiny(backbone)
    s = sample(level=3)
    t = sample(level=3)
    t.response = s.response.clone()
    t.response[0, -1] = (
        s.response[0, -1] + 1
    ) % 1024  # change the last frame (level 0 feeds level 3's input)
    a, b = hidden(model, s), hidden(model, t)
    first_response = len(model.prefix(s)[0])
    assert (a[first_response] - b[first_response]).abs().max() > 1e-4  # the first response frame noticed


@pytest.mark.parametrize("backbone", ["llama", "transformer", "mamba", "retnet"])
def test_ar_positions_do_not_see_the_future(backbone):
    model = tiny(backbone)
    s = sample(level=0)
    t = sample(level=0)
    t.response = s.response.clone()
    t.response[0, -1] = (s.response[0, -1] + 1) % 1024
    a, b = hidden(model, s), hidden(model, t)
    torch.testing.assert_close(a[:-1], b[:-1])  # only the position that reads the changed token moves
    assert (a[-1] - b[-1]).abs().max() > 1e-4


@pytest.mark.parametrize("level", [1, 2, 5, 7])
def test_nar_input_sums_every_lower_level(level):
    """The response input of level L includes levels 0..L-1 (the original drops L-1) and nothing above."""
    model = tiny()
    s = sample(level=level)
    base = model.response_in(s)[0]
    for q in range(8):
        t = sample(level=level)
        t.response = s.response.clone()
        t.response[q] = (t.response[q] + 1) % 1024
        changed = (model.response_in(t)[0] - base).abs().max() > 0
        assert bool(changed) == (q < level), (q, level)
    expected = sum(model.audio_emb[q](s.response[q]) for q in range(level))
    torch.testing.assert_close(base, expected)


def test_ar_targets_end_with_stop_and_inputs_start_with_start():
    model = tiny()
    s = sample(level=0, fr=5)
    _, tgt, head = model.response_in(s)
    assert head == 0 and tgt[-1] == model.stop_id and torch.equal(tgt[:-1], s.response[0])


def test_padding_in_a_batch_changes_nothing():
    model = tiny()
    short, long = sample(level=2, fr=6, seed=1), sample(level=0, fr=20, seed=2)
    alone = model([short])
    both = model([short, long])
    h_alone = model([short], return_hidden=True).hidden[0]
    h_both = model([short, long], return_hidden=True).hidden[0, : h_alone.shape[0]]
    torch.testing.assert_close(h_both, h_alone, atol=1e-5, rtol=1e-4)
    assert alone.counts == {"l2": 6} and both.counts == {"l2": 6, "l0": 21}


def test_losses_accuracy_and_learning():
    torch.manual_seed(0)
    model = tiny().train()
    batch = [sample(level=lv, seed=lv) for lv in range(8)] + [sample(task="stt", seed=9)]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = model(batch)
    assert set(first.accuracy) == {f"l{i}" for i in range(8)} | {"stt"}
    assert min(first.accuracy.values()) >= 0 and max(first.accuracy.values()) <= 1
    assert first.loss.item() == pytest.approx(first.losses["response"], rel=1e-5)
    for _ in range(40):
        out = model(batch)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert out.loss.item() < 0.5 * first.loss.item()
    assert out.accuracy["l0"] > first.accuracy["l0"]


def test_text_and_prompt_loss_weights_add_parts():
    model = tiny(loss_weights={"text": 0.5, "prompt": 0.25})
    out = model([sample(level=0)])
    assert set(out.losses) == {"response", "text", "prompt"}
    expected = out.losses["response"] + 0.5 * out.losses["text"] + 0.25 * out.losses["prompt"]
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)
    assert set(tiny()([sample(level=0)]).losses) == {"response"}  # default weights: response only


def test_mixtral_adds_router_loss_while_training():
    model = tiny("mixtral").train()
    out = model([sample(level=0), sample(level=4)])
    assert out.losses["aux"] > 0


def test_preset_sizes():
    for name, low, high in (("tiny", 0.1e6, 2e6), ("small", 5e6, 30e6), ("base", 180e6, 260e6)):
        cfg = load_config(name).model
        with torch.device("meta"):
            n = count_parameters(VALLE(cfg, n_symbols=623))
        assert low < n < high, (name, n)


def test_scheduled_sampling_feeds_own_guesses_and_keeps_the_targets():
    """p=1: every level-0 input frame is the model's guess (not the truth), the targets stay the truth;
    p=0 and NAR samples are left alone; a training forward with it on still learns."""
    model = tiny()
    batch = [sample(level=0, fr=40), sample(level=3, seed=1)]
    own = model.own_inputs(batch, 1.0, torch.Generator().manual_seed(0))
    assert own[1] is batch[1] and own[0].ar_inputs is not None
    assert (own[0].ar_inputs != batch[0].response[0]).float().mean() > 0.9  # 1025 classes: guesses differ
    assert torch.equal(own[0].response, batch[0].response)
    with torch.no_grad():
        a = hidden(model, batch[0])
        b = model(own[:1], return_hidden=True).hidden[0]
    n = len(a) - 41  # classic layout: START and the 40 frames (the last one predicts STOP)
    assert torch.allclose(a[: n + 1], b[: n + 1], atol=1e-5)  # up to START: the same inputs
    assert not torch.allclose(a[n + 1 :], b[n + 1 :], atol=1e-3)  # after it: the guesses
    assert model.own_inputs(batch, 0.0) is batch
    model.train()
    model.scheduled_sampling = 0.5
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = model(batch[:1]).loss.item()
    for _ in range(30):
        out = model(batch[:1])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert out.loss.item() < first
