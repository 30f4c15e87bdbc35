"""Layer skip (LayerSkip's early exit, the original's --layer-skip): a cached AR step that stops after a
confident layer reads exactly that layer's output, the layers it skipped still get this position's keys,
the training loss reaches every earlier layer, and what cannot skip layers says so."""

from __future__ import annotations

import pytest
import torch

from valle_cli.config import load_config
from valle_cli.errors import ConfigError, ValleError
from valle_cli.infer.engine import Request, SamplingConfig, ar_decoder, generate
from valle_cli.model.valle import VALLE

from .conftest import needs_espeak
from .test_model import sample


def model(backbone: str = "transformer", *extra: str) -> VALLE:
    torch.manual_seed(0)
    cfg = load_config("tiny", [f"model.backbone={backbone}", "model.n_layers=4", *extra]).model
    m = VALLE(cfg, n_symbols=623).eval()
    with torch.no_grad():
        m.heads[0].bias[m.stop_id] = -1e4
    return m


def inputs():
    g = torch.Generator().manual_seed(1)
    return torch.tensor([1, 10, 20, 30, 2]), torch.randint(0, 1024, (8, 30), generator=g)


@pytest.mark.parametrize("name", ["transformer", "bitnet"])
@pytest.mark.parametrize("exit_layer", [1, 2, 3])
def test_an_exit_reads_that_layers_output_and_fills_the_skipped_layers(name, exit_layer):
    """Always confident, exiting after layer k: every step's output is layer k's output of the full sequence
    (layers up to k never read a propagated key), and every layer's cache keeps growing by one per step."""
    m = model(name)
    ph, prompt = inputs()
    sc = SamplingConfig(ar_temp=0.0, max_ar_steps=8, layer_skip=True, layer_skip_exit_layer=exit_layer, layer_skip_min_layer=exit_layer,
                        layer_skip_entropy=1e9, layer_skip_varentropy=1e9)  # fmt: skip
    with torch.no_grad():
        dec = ar_decoder(m, [Request(ph, prompt)], True, sc)
        outs = [dec.logits()]  # the prefill runs every layer
        for t in [5, 6, 7, 8, 9]:
            dec.feed(torch.tensor([t]))
            outs.append(dec.logits())
        assert dec.early_exit.layers == [exit_layer] * 5
        lengths = {k.shape[2] for k in dec.cache.keys}
        assert len(dec.cache.keys) == 4 and len(lengths) == 1
        # the same tokens, recomputed in one pass: layer k's output at each position
        x = torch.cat([dec.prefixes[0], m.audio_emb[0](torch.tensor([5, 6, 7, 8, 9]))])[None]
        n = x.shape[1]
        from valle_cli.backbones.base import attention_mask

        _, early = m.backbone.forward_layers(
            x, attention_mask(torch.tensor([n]), True, n), torch.arange(n)[None]
        )
        want = m.heads[0](early[exit_layer - 1][0, -5:])
    torch.testing.assert_close(torch.stack([o[0, 0] for o in outs[1:]]), want, atol=1e-4, rtol=1e-4)
    assert lengths == {n}


def test_never_confident_is_the_full_model():
    m = model()
    ph, prompt = inputs()
    plain = generate(m, ph, prompt, sampling=SamplingConfig(ar_temp=0.0, max_ar_steps=12))
    skip = SamplingConfig(ar_temp=0.0, max_ar_steps=12, layer_skip=True, layer_skip_entropy=0.0)
    assert torch.equal(generate(m, ph, prompt, sampling=skip).codes, plain.codes)


def test_the_training_loss_reaches_every_earlier_layer():
    m = model()
    m.train()
    m.layer_skip = 0.5
    out = m([sample(level=0), sample(level=3, seed=1)])
    assert "early_exit" in out.losses and out.losses["early_exit"] > 0
    out.loss.backward()
    first = m.backbone.layers[0].gate_proj.weight.grad
    assert first is not None and first.abs().sum() > 0
    m.zero_grad()
    m.layer_skip = 0.0
    assert "early_exit" not in m([sample(level=0)]).losses


def test_what_cannot_skip_layers_says_so():
    ph, prompt = inputs()
    sc = SamplingConfig(max_ar_steps=4, layer_skip=True)
    with pytest.raises(ValleError, match="backbone that can stop early; this model's is llama"):
        generate(model("llama"), ph, prompt, sampling=sc)
    with pytest.raises(ValleError, match="this model has 4 layers"):
        generate(
            model(),
            ph,
            prompt,
            sampling=SamplingConfig(max_ar_steps=4, layer_skip=True, layer_skip_exit_layer=4),
        )
    with pytest.raises(ValleError, match="leave the cache on"):
        generate(model(), ph, prompt, sampling=sc, use_cache=False)
    with pytest.raises(ConfigError, match="classic autoregressive level 0"):
        load_config("tiny", ["train.layer_skip=0.5", "model.alignment=pointer"])
    with pytest.raises(ValleError, match="add --layer-skip"):
        SamplingConfig(layer_skip_entropy=2.0)
    with pytest.raises(ConfigError, match="model.n_layers is 1"):
        load_config("tiny", ["train.layer_skip=0.5", "model.backbone=transformer", "model.n_layers=1"])
    with pytest.raises(ConfigError, match="use one of them"):
        load_config("tiny", ["train.layer_skip=0.5", "train.guided_attention=1.0"])


def test_synth_refuses_layer_skip_for_a_model_that_cannot(tmp_path):
    """The shipped default model (llama, parallel level 0): refused before any work, with the remedy."""
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "valle_cli.cli.app", "synth", "hello", "--layer-skip", "-o", str(tmp_path / "a.wav")],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode != 0 and "--layer-skip" in proc.stderr and "Traceback" not in proc.stderr, (
        proc.stderr
    )
    assert not (tmp_path / "a.wav").exists()


@needs_espeak
def test_training_with_layer_skip_logs_the_early_exit_loss(dataset, tmp_path):
    import json

    from valle_cli.train.trainer import Trainer

    from .test_train import config

    run = tmp_path / "run"
    Trainer(
        config(dataset, "train.steps=2", "model.backbone=transformer", "train.layer_skip=0.5"), run
    ).train()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r for r in records if any("early_exit" in k for k in r)]
    assert losses, records[:2]
    with pytest.raises(ConfigError, match="exit early, and llama cannot"):  # said when the config loads
        Trainer(config(dataset, "train.steps=1", "train.layer_skip=0.5"), tmp_path / "r2")


@needs_espeak
def test_train_with_layer_skip_then_synthesize_with_it_from_the_cli(dataset, tmp_path):
    from .conftest import train_and_export, valle_cli

    _, out = train_and_export(dataset, tmp_path, "model.backbone=transformer", "train.layer_skip=0.5")
    wav = tmp_path / "a.wav"
    proc = valle_cli("synth", "Hello.", "--model", str(out), "-o", str(wav), "--seed", "1", "--max-ar-steps", "40",
                     "--layer-skip", "--layer-skip-exit-layer", "1", "--layer-skip-entropy", "9", "--layer-skip-varentropy", "99")  # fmt: skip
    assert proc.returncode == 0 and wav.exists(), proc.stderr[-3000:]
    proc = valle_cli(
        "synth", "Hello.", "--model", str(out), "-o", str(wav), "--layer-skip", "--layer-skip-exit-layer", "2"
    )
    assert proc.returncode != 0 and "this model has 2 layers" in proc.stderr, proc.stderr[-2000:]


def test_confidence_is_entropy_and_varentropy_of_every_row():
    from valle_cli.infer.engine import EarlyExit
    from valle_cli.infer.sampling import entropy_varentropy

    logits = torch.tensor([[6.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    (h0, v0), (h1, _) = entropy_varentropy(logits[0]), entropy_varentropy(logits[1])
    assert h0 < 0.1 and abs(h1 - torch.log(torch.tensor(4.0))) < 1e-5
    ex = EarlyExit(lambda h: h, 1, 1, entropy=0.2, varentropy=1.0)
    assert ex.confident(logits[:1, None]) == (h0 < 0.2 and v0 < 1.0)
    assert not ex.confident(logits[:, None])  # one unsure row keeps the whole batch going
    assert not EarlyExit(lambda h: h, 1, 1, entropy=0.2, varentropy=v0 * 0.5).confident(logits[:1, None])
