"""NAR-len (the original's later non-autoregressive level 0): `model.level0: nar` without the pointer. A
length head at the separator before the response predicts the frame count; level 0 is demasked in
parallel passes over that many frames; the prefix never sees the response; train, export and speak from the
CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch

from valle_cli.config import load_config
from valle_cli.errors import ValleError
from valle_cli.infer.engine import Request, SamplingConfig, generate, generate_batch, predict_lengths
from valle_cli.model.valle import IGNORE, VALLE, Sample

from .conftest import needs_espeak, train_and_export, valle_cli


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return VALLE(load_config("tiny", ["model.level0=nar"]).model, n_symbols=623).eval()


def sample(frames: int = 20, seed: int = 0, level: int = 0) -> Sample:
    g = torch.Generator().manual_seed(seed)
    return Sample(torch.tensor([1, 5, 6, 7, 2]), torch.randint(0, 1024, (8, 9), generator=g),
                  torch.randint(0, 1024, (8, frames), generator=g), level)  # fmt: skip


def test_the_length_is_a_target_at_the_last_prefix_position(model):
    s = sample(frames=20)
    batch = model.assemble([s])
    (_, start, tgt, head, _), *_ = [t for t in batch.targets if t[4] == "length"]
    pre, _, _ = model.prefix(s)
    assert start == len(pre) - 1 and head == "length" and torch.allclose(tgt, torch.tensor([math.log1p(20)]))
    response = next(t for t in batch.targets if t[4] == "response")
    assert bool((response[2] != IGNORE).all())  # in eval mode every frame is masked, and scored
    assert not hasattr(model, "frame_text_emb") and not hasattr(model, "duration_head")
    # the prefix (where the length is read) does not see the response
    other = sample(frames=20, seed=1)
    other = Sample(s.phonemes, s.prompt, other.response, 0)
    with torch.no_grad():
        a = model([s], return_hidden=True).hidden[0, : len(pre)]
        b2 = model([other], return_hidden=True).hidden[0, : len(pre)]
    torch.testing.assert_close(a, b2)


def test_training_scores_the_length_and_the_masked_frames():
    torch.manual_seed(0)
    m = VALLE(load_config("tiny", ["model.level0=nar"]).model, n_symbols=623).train()
    out = m([sample(frames=30), sample(level=2, seed=3)])
    assert {"response", "length"} <= set(out.losses) and "len" in out.accuracy
    out.loss.backward()
    assert m.length_head.weight.grad.abs().sum() > 0


def test_generation_follows_the_predicted_length(model):
    s = sample()
    with torch.no_grad():
        want = predict_lengths(model, [Request(s.phonemes, s.prompt)])[0]
        out = generate(model, s.phonemes, s.prompt, sampling=SamplingConfig(ar_temp=0.0, level0_steps=4))
    assert out.codes.shape == (8, want) and out.stopped and out.frame_symbols is None and out.ar_steps == 4
    cut = generate(model, s.phonemes, s.prompt, sampling=SamplingConfig(ar_temp=0.0, max_ar_steps=want - 2))
    assert cut.codes.shape == (8, want - 2) and not cut.stopped
    # in a batch, each row gets its own length and the same codes as alone
    t = sample(seed=5)
    reqs = [Request(s.phonemes, s.prompt), Request(torch.tensor([1, 9, 2]), t.prompt[:, :4])]
    sc = SamplingConfig(ar_temp=0.0, level0_steps=4)
    batched = generate_batch(model, reqs, sc)
    for r, g in zip(reqs, batched, strict=True):
        assert torch.equal(g.codes, generate_batch(model, [r], sc)[0].codes)


def test_nar_len_cannot_continue_audio_and_says_so(model):
    s = sample()
    with pytest.raises(ValleError, match="not available for models with a parallel level 0"):
        generate_batch(model, [Request(s.phonemes, s.prompt, prefix=s.response[:, :5])])


@needs_espeak
def test_train_export_and_speak_from_the_cli(dataset, tmp_path):
    run, out = train_and_export(dataset, tmp_path, "model.level0=nar")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("loss.length" in r for r in rows), rows[0]
    wav = tmp_path / "a.wav"
    proc = valle_cli(
        "synth", "Hello.", "--model", str(out), "-o", str(wav), "--seed", "1", "--max-ar-steps", "60"
    )
    assert proc.returncode == 0 and wav.exists(), proc.stderr[-3000:]
