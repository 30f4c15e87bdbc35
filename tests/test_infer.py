"""Inference: KV-cached AR decoding gives exactly the tokens of full recomputation; NAR fills every level;
samplers do what their names say."""

from __future__ import annotations

import pytest
import torch

from valle_cli.config import load_config
from valle_cli.infer.engine import SamplingConfig, generate
from valle_cli.infer.sampling import filter_logits, pick
from valle_cli.model.valle import VALLE


@pytest.fixture(params=["llama", "transformer"])
def model(request):
    torch.manual_seed(0)
    cfg = load_config("tiny", [f"model.backbone={request.param}"]).model
    m = VALLE(cfg, n_symbols=623).eval()
    with torch.no_grad():
        m.heads[0].bias[m.stop_id] = -1e4  # a random model may stop at once; make it run to max steps
    return m


def inputs():
    g = torch.Generator().manual_seed(1)
    return torch.tensor([1, 10, 20, 30, 2]), torch.randint(0, 1024, (8, 30), generator=g)


def test_cached_ar_equals_full_recomputation(model):
    ph, prompt = inputs()
    sc = SamplingConfig(ar_temp=0.0, max_ar_steps=25)
    a = generate(model, ph, prompt, sampling=sc, use_cache=True)
    b = generate(model, ph, prompt, sampling=sc, use_cache=False)
    assert a.ar_steps == 25 and not a.stopped
    assert torch.equal(a.codes[0], b.codes[0])
    assert torch.equal(a.codes, b.codes)


def test_nar_fills_every_level_and_seed_reproduces(model):
    ph, prompt = inputs()
    sc = SamplingConfig(ar_temp=1.0, nar_temp=1.0, max_ar_steps=12, seed=5)
    a = generate(model, ph, prompt, sampling=sc)
    b = generate(model, ph, prompt, sampling=sc)
    assert a.codes.shape == (8, 12) and int(a.codes.max()) < 1024
    assert torch.equal(a.codes, b.codes)
    c = generate(
        model, ph, prompt, sampling=SamplingConfig(ar_temp=1.0, nar_temp=1.0, max_ar_steps=12, seed=6)
    )
    assert not torch.equal(a.codes, c.codes)


def test_stop_token_ends_generation():
    torch.manual_seed(0)
    m = VALLE(load_config("tiny").model, n_symbols=623).eval()
    with torch.no_grad():
        m.heads[0].bias[m.stop_id] = 1e4
    out = generate(m, *inputs(), sampling=SamplingConfig(ar_temp=0.0))
    assert out.stopped and out.codes.shape == (8, 0)


def test_samplers():
    logits = torch.tensor([1.0, 3.0, 2.0, 0.0])
    assert int(pick(logits, 0.0)) == 1
    kept = filter_logits(logits, top_k=2)
    assert torch.isinf(kept[[0, 3]]).all() and torch.isfinite(kept[[1, 2]]).all()
    p = logits.softmax(-1)  # [0.09, 0.64, 0.24, 0.03]
    nucleus = filter_logits(logits, top_p=0.7)
    assert torch.isfinite(nucleus[[1, 2]]).all() and torch.isinf(nucleus[[0, 3]]).all(), p
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([pick(logits, 1.0, generator=g) for _ in range(2000)])
    freq = torch.bincount(draws, minlength=4).float() / 2000
    torch.testing.assert_close(freq, p, atol=0.04, rtol=0)
    cold = torch.stack([pick(logits, 0.1, generator=g) for _ in range(200)])
    assert (cold == 1).float().mean() > 0.99
