"""The mamba, retnet and bitnet backbones through valle as users run them (`valle train --set
model.backbone=...`, export, load, decode), the rules recurrent backbones follow (a recurrent state of fixed
size, the NAR prefix that must not see the response, AR-only when there is no backward path), and plugins'
own settings (`model.backbone_options`) and capability flags."""

from __future__ import annotations

import pytest
import torch

from valle_cli import plugins
from valle_cli.backbones.base import (
    Backbone,
    BackboneOutput,
    Layout,
    attention_mask,
    build_backbone,
    layout,
    padded_mask,
)
from valle_cli.config import dump_config, load_config
from valle_cli.errors import ConfigError
from valle_cli.model.valle import VALLE

from .conftest import needs_espeak, train_and_export
from .conftest import valle_cli as valle


@needs_espeak
@pytest.mark.parametrize("name", ["mamba", "retnet", "bitnet"])
def test_train_export_load_and_decode_from_the_cli(name, dataset, tmp_path):
    from valle_cli.infer.engine import SamplingConfig, generate
    from valle_cli.infer.load import load_model

    run, out = train_and_export(dataset, tmp_path, f"model.backbone={name}")
    assert f"backbone: {name}" in (run / "config.yaml").read_text()
    loaded = load_model(out)
    model = loaded.model
    assert type(model.backbone).name == name
    g = torch.Generator().manual_seed(0)
    ph, prompt = (
        torch.tensor([1, 10, 20, 30, 2]),
        torch.randint(0, loaded.model.codebook_size, (8, 20), generator=g),
    )
    with torch.no_grad():
        model.heads[0].bias[model.stop_id] = -1e4  # run to the step limit
    sc = SamplingConfig(ar_temp=0.0, max_ar_steps=15)
    a = generate(model, ph, prompt, sampling=sc, use_cache=True)
    b = generate(model, ph, prompt, sampling=sc, use_cache=False)
    assert a.codes.shape == (8, 15) and torch.equal(a.codes, b.codes)


@pytest.mark.parametrize("name", ["mamba", "retnet"])
def test_the_recurrent_state_does_not_grow(name):
    """A decoding step of a recurrent backbone reads a state of fixed size, however long the sequence."""
    torch.manual_seed(0)
    bb = build_backbone(load_config("tiny", [f"model.backbone={name}"]).model).eval()

    def size(state) -> int:
        if name == "retnet":
            return sum(t.numel() for t in state.states)
        layers = [d for layer in state.inner.layers for d in vars(layer).values() if isinstance(d, dict)]
        return sum(t.numel() for d in layers for t in d.values() if torch.is_tensor(t))

    with torch.no_grad():
        x = torch.randn(1, 5, 64)
        out = bb(x, attention_mask(torch.tensor([5]), True, 5), torch.arange(5)[None], use_cache=True,
                 layout=layout(torch.tensor([5]), True, 5))  # fmt: skip
        cache, sizes = out.cache, []
        for t in range(5, 60):
            valid = torch.ones(1, t + 1, dtype=torch.bool)
            out = bb(torch.randn(1, 1, 64), padded_mask(valid, 1), torch.tensor([[t]]), cache=cache,
                     use_cache=True, layout=Layout(valid[:, -1:], torch.tensor([True])))  # fmt: skip
            cache = out.cache
            sizes.append(size(cache))
    assert cache.get_seq_length() == 60
    assert sizes[0] > 0 and len(set(sizes)) == 1


@pytest.mark.parametrize("name", ["mamba", "retnet", "llama"])
def test_a_level0_nar_prefix_does_not_see_the_response(name):
    """Non-causal rows with a prefix (level0 nar): the text and prompt positions must not read the response
    (their hidden states predict durations before any frame exists); the response reads everything."""
    torch.manual_seed(0)
    bb = build_backbone(load_config("tiny", [f"model.backbone={name}"]).model).eval()
    x = torch.randn(1, 12, 64)
    y = x.clone()
    y[0, 9] += 1.0  # a response position
    lengths, split = torch.tensor([12]), torch.tensor([6])
    pos = torch.arange(12)[None]
    t = torch.arange(12)
    mask = attention_mask(lengths, False, 12)
    hide = (t[:, None] < 6) & (t[None, :] >= 6)
    mask = mask.masked_fill(hide[None, None], torch.finfo(mask.dtype).min)
    lay = layout(lengths, False, 12, split)
    with torch.no_grad():
        a = bb(x, mask, pos, layout=lay).hidden
        b = bb(y, mask, pos, layout=lay).hidden
    torch.testing.assert_close(a[0, :6], b[0, :6])  # the prefix did not see position 9
    assert (a[0, 6:9] - b[0, 6:9]).abs().max() > 1e-4  # earlier response positions did


def test_mamba_without_a_backward_path_is_an_ar_only_model():
    with pytest.raises(ConfigError, match="cannot run the non-causal NAR passes"):
        VALLE(
            load_config("tiny", ["model.backbone=mamba", "model.backbone_options.bidirectional=false"]).model,
            623,
        )
    cfg = load_config("tiny", ["model.backbone=mamba", "model.backbone_options={bidirectional: false}",
                               "model.n_levels=1"]).model  # fmt: skip
    model = VALLE(cfg, 623)
    assert model.backbone.backward_mixers is None


class _CausalOnly(Backbone):
    """A backbone that declares it cannot run non-causal rows (and returns an aux loss it did not declare)."""

    name = "causal-only"
    supports_noncausal = False

    def __init__(self, d: int):
        super().__init__()
        self.proj = torch.nn.Linear(d, d)

    @classmethod
    def from_config(cls, cfg):
        return cls(cfg.d_model)

    def forward(self, inputs_embeds, attention_mask, position_ids, cache=None, use_cache=False):
        h = self.proj(inputs_embeds).cumsum(1)
        return BackboneOutput(h, None, h.mean())


def test_capability_flags_are_enforced():
    from .test_model import sample

    with plugins.overridden("backbone", add={"causal-only": _CausalOnly}):
        with pytest.raises(ConfigError, match="causal-only backbone cannot run the non-causal NAR passes"):
            VALLE(load_config("tiny", ["model.backbone=causal-only"]).model, 623)
        model = VALLE(load_config("tiny", ["model.backbone=causal-only", "model.n_levels=1"]).model, 623)
        s = sample(level=0)
        s.prompt, s.response = s.prompt[:1], s.response[:1]
        with pytest.raises(ValueError, match="aux_loss without has_aux_loss"):
            model([s])


def test_backbone_options_are_checked_by_the_plugin():
    cfg = load_config("tiny", ["model.backbone=mamba", "model.backbone_options.state_size=4"])
    assert cfg.model.backbone_options == {
        "state_size": 4,
        "conv_kernel": 4,
        "expand": 2,
        "bidirectional": True,
    }
    assert "state_size: 4" in dump_config(cfg)
    with pytest.raises(ConfigError, match="did you mean 'model.backbone_options.state_size'"):
        load_config("tiny", ["model.backbone=mamba", "model.backbone_options.state_sise=4"])
    with pytest.raises(ConfigError, match="must be an integer"):
        load_config("tiny", ["model.backbone=mamba", "model.backbone_options.expand=wide"])
    with pytest.raises(ConfigError, match="must be positive"):
        load_config("tiny", ["model.backbone=mamba", "model.backbone_options.conv_kernel=0"])
    with pytest.raises(ConfigError, match="the llama plugin has no options"):
        load_config("tiny", ["model.backbone_options.n_experts=4"])
    with pytest.raises(ConfigError, match="experts_per_token <= n_experts"):
        load_config("tiny", ["model.backbone=mixtral", "model.backbone_options.experts_per_token=9"])


def test_mixtral_settings_of_older_configs_move_into_its_options(tmp_path):
    """Configs, runs and exports written before backbone_options still load."""
    cfg = load_config("tiny", ["model.backbone=mixtral", "model.n_experts=4"])
    assert cfg.model.backbone_options["n_experts"] == 4
    old = tmp_path / "old.yaml"
    old.write_text("preset: tiny\nmodel:\n  backbone: llama\n  n_experts: 8\n  experts_per_token: 2\n")
    assert load_config(old).model.backbone_options == {}
    with pytest.raises(ConfigError, match="model.backbone_options.n_experts"):
        load_config("tiny", ["model.n_experts=4"])


def test_bitnet_runs_ternary_weights_and_refuses_lora():
    from valle_cli.backbones.transformer import BitLinear
    from valle_cli.model.lora import apply_lora

    torch.manual_seed(0)
    model = VALLE(load_config("tiny", ["model.backbone=bitnet"]).model, 623)
    layer = model.backbone.layers[0].attn.q_proj
    assert isinstance(layer, BitLinear)
    x = torch.randn(3, 64)
    w = layer.weight
    scale = w.abs().mean()
    ternary = (w / scale).round().clamp(-1, 1)
    xs = 127.0 / x.abs().amax(-1, keepdim=True)
    want = ((x * xs).round() / xs) @ (ternary * scale).T
    torch.testing.assert_close(layer(x), want)
    with torch.no_grad():  # inference rounds the weight once and reuses it until the weight changes
        torch.testing.assert_close(layer(x), want)
        first = layer._frozen[1]
        layer(x)
        assert layer._frozen[1] is first
        layer.weight.mul_(2.0)
        torch.testing.assert_close(layer(x), want * 2, rtol=1e-4, atol=1e-4)
        layer.weight.div_(2.0)
    assert set(ternary.unique().tolist()) <= {-1.0, 0.0, 1.0}
    layer(x).sum().backward()  # straight-through: the latent weights learn
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    with pytest.raises(ConfigError, match="ternary"):
        apply_lora(model, 4, 8.0, 0.0, ["q_proj"])


def test_lora_on_mamba_names_its_layers():
    from valle_cli.model.lora import apply_lora

    model = VALLE(load_config("tiny", ["model.backbone=mamba"]).model, 623)
    with pytest.raises(ConfigError, match=r"some of \['in_proj'\]"):
        apply_lora(model, 4, 8.0, 0.0, ["q_proj"])
    with pytest.raises(ConfigError, match="reads the weights of x_proj, dt_proj and out_proj directly"):
        apply_lora(model, 4, 8.0, 0.0, ["in_proj", "out_proj"])
    assert apply_lora(model, 4, 8.0, 0.0, ["in_proj"])
    # and the config says so when it loads, before any training
    sets = [
        "model.backbone=mamba",
        "train.lora.rank=4",
        "train.init_from=x",
        "train.lora.targets=[in_proj,out_proj]",
    ]
    with pytest.raises(ConfigError, match="cannot be adapted in the mamba backbone"):
        load_config("tiny", sets)
    with pytest.raises(ConfigError, match="LoRA cannot adapt the bitnet backbone"):
        load_config("tiny", ["model.backbone=bitnet", "train.lora.rank=4", "train.init_from=x"])


def test_training_options_the_backbone_cannot_serve_are_refused_when_the_config_loads():
    with pytest.raises(ConfigError, match="exit early, and llama cannot"):
        load_config("tiny", ["train.layer_skip=0.5"])
    with pytest.raises(ConfigError, match="retnet does not report it"):
        load_config("tiny", ["model.backbone=retnet", "train.guided_attention=1.0"])
    with pytest.raises(ConfigError, match="more codes per step than makes sense"):
        load_config("tiny", ["model.group_size=100000"])
    with pytest.raises(ConfigError, match="did you mean 'sdpa'"):
        load_config("tiny", ["model.attention=SDPA"])


def test_alignment_plots_say_a_recurrent_backbone_has_no_attention(tmp_path):
    model = VALLE(load_config("tiny", ["model.backbone=mamba"]).model, 623)
    with pytest.raises(NotImplementedError, match="mamba backbone does not report its attention"):
        model.backbone.attention_maps(torch.randn(1, 3, 64), None, torch.arange(3)[None])


def test_plugins_lists_the_new_backbones_and_their_options():
    proc = valle("plugins", "--kind", "backbone", "--options")
    assert proc.returncode == 0, proc.stderr
    for name in ("mamba", "retnet", "bitnet"):
        row = [ln for ln in proc.stdout.splitlines() if f" {name} " in ln]
        assert row and "yes" in row[0], proc.stdout
    assert "model.backbone_options" in proc.stdout and "state_size: 16" in proc.stdout
    assert "n_experts: 8" in proc.stdout and "decay_start: 5.0" in proc.stdout


def test_a_backbone_refuses_what_it_cannot_run_when_the_config_loads():
    """`valle config` already says it (the backbone's check_config), before any model is built."""
    proc = valle(
        "config",
        "tiny",
        "--set",
        "model.backbone=mamba",
        "--set",
        "model.backbone_options.bidirectional=false",
    )
    assert proc.returncode != 0 and "bidirectional is false" in proc.stderr and "Traceback" not in proc.stderr
    ok = valle("config", "tiny", "--set", "model.backbone=mamba", "--set", "model.backbone_options.bidirectional=false",
               "--set", "model.n_levels=1")  # fmt: skip
    assert ok.returncode == 0, ok.stderr
