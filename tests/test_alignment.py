"""Alignment: the dataset's own aligner (monotonic search, forward-sum loss, durations written by prepare),
the phoneme-pointer model (training targets, decoding that ends past EOS, the NAR's frame map, streaming),
the text gap and alignment plots of training, `valle plot --alignment`, and the eval's duration error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch

from valle_cli.config import load_config
from valle_cli.infer.engine import Request, SamplingConfig, generate
from valle_cli.infer.stream import StreamSettings, stream_codes
from valle_cli.model.valle import (
    VALLE,
    Sample,
    frame_symbols,
    stretch_durations,
    swapped_text,
    wrong_text,
)
from valle_cli.prepare.align import (
    Aligner,
    auto_steps,
    beta_binomial_prior,
    forward_sum_loss,
    monotonic_search,
    train_aligner,
)

from .conftest import needs_espeak


def test_monotonic_search_recovers_a_path_and_covers_every_symbol():
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = int(rng.integers(1, 12))
        d = rng.integers(1, 6, size=n)
        path = np.repeat(np.arange(n), d)
        logp = rng.normal(-6, 1, size=(len(path), n))
        logp[np.arange(len(path)), path] = 0.0
        assert np.array_equal(monotonic_search(logp), d)
    flat = monotonic_search(np.zeros((9, 9)))  # no evidence at all: still one frame each
    assert np.array_equal(flat, np.ones(9))
    with pytest.raises(ValueError, match="cannot hold"):
        monotonic_search(np.zeros((3, 4)))


@needs_espeak
def test_aligner_reads_codecs_with_fewer_levels(dataset):
    """A 1.5 kbps codec has 2 RVQ levels: the aligner reads those (it reads 4 when there are more)."""
    from valle_cli.data.dataset import open_dataset
    from valle_cli.prepare.align import durations_for

    ds = open_dataset(dataset)

    class TwoLevels:
        def __getattr__(self, name):
            return getattr(ds, name)

        def codes(self, i):
            return ds.codes(i)[:2]

    model = train_aligner(TwoLevels(), steps=3)
    assert model.levels == 2
    d = durations_for(model, TwoLevels(), [0, 1])
    assert int(d[0].sum()) == ds.frames(0)


def test_guided_attention_prefers_the_diagonal():
    from valle_cli.model.valle import GuidedAttention

    f, n = 12, 6
    diag = torch.zeros(1, 2, 40, 40)
    anti = torch.zeros(1, 2, 40, 40)
    start, text = 20, 4  # response positions 20..31, text symbols at 4..9
    for t in range(f):
        diag[0, :, start + t, text + t * n // f] = 1.0
        anti[0, :, start + t, text + n - 1 - t * n // f] = 1.0
    g = GuidedAttention(1.0, 0.4, layers=(0,), heads=2)
    rows = [(0, start, f, n)]
    assert g.loss([diag], rows) < 0.05 < 0.5 < g.loss([anti], rows)


@needs_espeak
def test_guided_attention_refuses_what_it_cannot_run(dataset, tmp_path):
    from valle_cli.train.trainer import Trainer, TrainingError

    cfg = load_config(
        "tiny",
        [f"data.paths=[{dataset}]", "train.guided_attention=1.0", "model.gradient_checkpointing=true"],
    )
    with pytest.raises(TrainingError, match="gradient_checkpointing"):
        Trainer(cfg, tmp_path / "run")


def test_prior_and_forward_sum_loss():
    prior = beta_binomial_prior(torch.tensor([6]), torch.tensor([30]), 8, 32)[0]
    assert torch.allclose(prior[:30, :6].sum(-1), torch.ones(30), atol=1e-5)
    assert prior[:30, 6:].sum() == 0 and prior[30:].sum() == 0
    assert prior[0].argmax() == 0 and prior[29].argmax() == 5  # the diagonal
    # a monotonic attention scores a lower loss than one that runs backwards
    n, t = 5, 20
    path = np.repeat(np.arange(n), 4)
    good = torch.full((1, t, n), -8.0)
    good[0, torch.arange(t), torch.from_numpy(path)] = 0.0
    bad = good.flip(-1)
    lens = torch.tensor([n]), torch.tensor([t])
    assert forward_sum_loss(good.log_softmax(-1), *lens) < forward_sum_loss(bad.log_softmax(-1), *lens) - 1


def test_duration_helpers():
    assert frame_symbols(torch.tensor([2, 1, 3])).tolist() == [0, 0, 1, 2, 2, 2]
    for frames in (5, 17, 40):
        d = stretch_durations(torch.tensor([3, 1, 5, 2, 4]), frames)
        assert int(d.sum()) == frames and int(d.min()) >= 1
    with pytest.raises(ValueError):
        stretch_durations(torch.tensor([1, 1, 1]), 2)
    assert auto_steps(10) == 100 and auto_steps(3650) == 1500 and auto_steps(1000) == 500


@needs_espeak
def test_prepare_writes_durations_and_they_survive_hdf5_and_reindex(dataset, tmp_path):
    import shutil

    from valle_cli.data.dataset import open_dataset
    from valle_cli.data.hdf5 import folder_to_hdf5
    from valle_cli.data.merge import reindex

    ds = open_dataset(dataset)
    assert ds.has_durations and (dataset / "aligner.safetensors").is_file()
    for i in range(len(ds)):
        d = ds.phoneme_durations(i)
        assert d is not None and len(d) == len(ds.phonemes(i)) + 2
        assert int(d.sum()) == ds.frames(i) and int(d.min()) >= 1
    h5 = folder_to_hdf5(dataset, tmp_path / "d.h5")
    hd = open_dataset(h5)
    assert hd.has_durations and np.array_equal(hd.phoneme_durations(3), ds.phoneme_durations(3))
    hd.close()
    # a reindex of the same utterances keeps the durations (they still describe them); one that changes the
    # index drops them, and aligns again
    copy = tmp_path / "copy"
    shutil.copytree(dataset, copy)
    reindex(copy, align=False)
    assert open_dataset(copy).has_durations
    gone = sorted((copy / "utterances").rglob("*.npy"))[0]
    gone.unlink()
    gone.with_suffix(".json").unlink()  # an utterance deleted by hand
    reindex(copy, align=False)
    assert not open_dataset(copy).has_durations
    reindex(copy)
    assert open_dataset(copy).has_durations


@needs_espeak
def test_aligner_learns_on_real_speech(dataset):
    """The forward-sum loss falls as the aligner trains on the test corpus."""
    from valle_cli.data.dataset import open_dataset
    from valle_cli.prepare.align import _batch

    ds = open_dataset(dataset)
    idx = list(range(min(8, len(ds))))

    def loss(model):
        text, audio, tl, fl = _batch(ds, idx, 1, 2, model.levels)
        with torch.no_grad():
            return float(forward_sum_loss(model(text, audio, tl, fl), tl, fl))

    torch.manual_seed(0)
    fresh = Aligner(len(ds.header["symbols"]["symbols"]), int(ds.header["codec"]["codebook_size"]))
    trained = train_aligner(ds, steps=150)
    assert loss(trained) < loss(fresh) - 0.2


@pytest.fixture(scope="module")
def pointer_model():
    torch.manual_seed(0)
    return VALLE(load_config("tiny", ["model.alignment=pointer"]).model, n_symbols=623).eval()


def _sample(level: int, durations, seed: int = 0) -> Sample:
    g = torch.Generator().manual_seed(seed)
    d = torch.tensor(durations)
    ph = torch.randint(4, 623, (len(d),), generator=g)
    ph[0], ph[-1] = 1, 2
    f = int(d.sum())
    return Sample(ph, torch.randint(0, 1024, (8, 20), generator=g), torch.randint(0, 1024, (8, f), generator=g),
                  level, frame_symbols=frame_symbols(d))  # fmt: skip


def test_pointer_model_targets_and_wrong_text(pointer_model):
    s = _sample(0, [2, 3, 1, 4, 2])
    assert pointer_model.pointer_targets(s).tolist() == [0, 1, 0, 0, 1, 1, 0, 0, 0, 1, 0, 1]
    batch = pointer_model.assemble([s, _sample(3, [1, 1, 2])])
    parts = [(b, part) for b, _, _, _, part in batch.targets]
    assert parts == [(0, "response"), (0, "pointer"), (1, "response")]  # the pointer trains on the AR only
    # F inputs for F level-0 targets (no STOP position): the end of speech is the pointer's
    assert len(batch.targets[0][2]) == 12 and int(batch.lengths[0]) == 4 + 5 + 1 + 20 + 1 + 12
    out = pointer_model([s, _sample(3, [1, 1, 2])])
    assert "pointer" in out.losses and 0 <= out.accuracy["ptr"] <= 1
    with pytest.raises(ValueError, match="frame_symbols"):
        pointer_model([Sample(s.phonemes, s.prompt, s.response, 0)])
    right, wrong = wrong_text([s, _sample(0, [3, 3, 3, 3, 3, 3, 3, 3], 1), _sample(0, [1, 1, 1], 2)])
    assert len(right) == len(wrong) == 2  # 3 frames cannot hold the first transcript's 5 symbols
    for r, w in zip(right, wrong, strict=True):
        assert len(w.frame_symbols) == r.response.shape[1] and torch.equal(w.response, r.response)
    assert torch.equal(wrong[0].phonemes, right[1].phonemes)


def test_swapped_text_keeps_boundaries_and_changes_identities():
    a, b = _sample(0, [2, 3, 1, 4, 2], 0), _sample(0, [1, 2, 2, 1, 3, 1, 1, 2], 1)
    swapped = swapped_text([a, b])
    assert len(swapped) == 2
    for own, other, sw in ((a, b, swapped[0]), (b, a, swapped[1])):
        assert len(sw.phonemes) == len(own.phonemes) and torch.equal(sw.frame_symbols, own.frame_symbols)
        assert sw.phonemes[0] == 1 and sw.phonemes[-1] == 2  # BOS and EOS stay
        assert set(sw.phonemes[1:-1].tolist()) <= set(other.phonemes[1:-1].tolist())
        assert torch.equal(sw.response, own.response)
    # resampled in order: the 3 inner symbols of a spread over b's 6 inner positions
    assert swapped[1].phonemes[1:-1].tolist() == [a.phonemes[i].item() for i in (1, 1, 2, 2, 3, 3)]
    classic = Sample(a.phonemes, a.prompt, a.response, 0)
    assert swapped_text([classic, classic]) == [] and swapped_text([a]) == []


def test_pointer_decoding_ends_past_eos_and_maps_every_frame(pointer_model):
    ph = torch.tensor([1, 10, 20, 30, 40, 2])
    prompt = torch.randint(0, 1024, (8, 25), generator=torch.Generator().manual_seed(3))
    for temp in (0.0, 1.0):
        sc = SamplingConfig(ar_temp=temp, max_ar_steps=800, seed=2)
        out = generate(pointer_model, ph, prompt, sampling=sc)
        fs = out.frame_symbols
        assert out.codes.shape == (8, len(fs)) and len(fs) < 800
        assert fs[0] == 0 and fs[-1] == len(ph) - 1  # from BOS through EOS
        steps = torch.diff(fs)
        assert set(steps.tolist()) <= {0, 1}  # the pointer stays or moves one symbol
        assert torch.bincount(fs).max() <= 100  # no symbol held past MAX_SYMBOL_FRAMES

    def biased(stay: float):
        with torch.no_grad():
            saved = pointer_model.pointer_head.bias.clone()
            pointer_model.pointer_head.bias[:] = torch.tensor([stay, -stay])
        try:
            return generate(
                pointer_model, ph, prompt, sampling=SamplingConfig(ar_temp=0.0, max_ar_steps=2000)
            )
        finally:
            with torch.no_grad():
                pointer_model.pointer_head.bias[:] = saved

    moving = biased(-50.0)  # moves at every frame: one frame per symbol, and it ended by itself
    assert moving.stopped and moving.frame_symbols.tolist() == list(range(len(ph)))
    stuck = biased(50.0)  # never moves by itself: moved by force, so speech still ends, but not "stopped"
    assert not stuck.stopped and stuck.codes.shape[1] == 100 * len(ph)


def test_pointer_stream_matches_whole_generation(pointer_model):
    req = Request(torch.tensor([1, *range(10, 22), 2]), torch.randint(0, 1024, (8, 30)))
    sc = SamplingConfig(ar_temp=1.0, top_k=40, max_ar_steps=600, seed=4)
    whole = generate(pointer_model, req.phonemes, req.prompt, sampling=sc)
    chunks = list(
        stream_codes(pointer_model, req, sc, StreamSettings(chunk_frames=100, max_chunk_frames=10_000))
    )
    streamed = torch.cat([c.codes for c in chunks], 1)
    assert torch.equal(streamed[0], whole.codes[0])
    one = list(
        stream_codes(pointer_model, req, sc, StreamSettings(chunk_frames=100_000, max_chunk_frames=100_000))
    )
    assert torch.equal(one[0].codes, whole.codes)  # the NAR saw the same frame map


def test_pointer_models_refuse_what_they_cannot_do_yet(pointer_model):
    from valle_cli.errors import ValleError

    ph, prompt = torch.tensor([1, 10, 2]), torch.randint(0, 1024, (8, 10))
    with pytest.raises(ValleError, match="continuing audio"):
        generate(pointer_model, ph, prompt, prefix=torch.randint(0, 1024, (8, 5)))
    with pytest.raises(ValleError, match="beam search"):
        generate(pointer_model, ph, prompt, sampling=SamplingConfig(beam_width=2))


@needs_espeak
def test_training_logs_the_text_gap_and_plots_alignment(dataset, tmp_path):
    from valle_cli.train.trainer import Trainer

    for alignment in ("none", "pointer"):
        run = tmp_path / alignment
        cfg = load_config(
            "tiny",
            [f"data.paths=[{dataset}]", "data.batch_size=4", "data.val_fraction=0.3", "train.steps=2",
             "train.eval_every=2", "train.save_every=2", f"model.alignment={alignment}"],
        )  # fmt: skip
        Trainer(cfg, run).train()
        evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        evals = [r for r in evals if r.get("kind") == "eval"]
        assert evals and "text_gap" in evals[-1] and np.isfinite(evals[-1]["text_gap"])
        assert evals[-1]["text_gap"] == pytest.approx(
            evals[-1]["loss.wrong_text"] - evals[-1]["loss.right_text"]
        )
        assert ("acc.ptr" in evals[-1]) == (alignment == "pointer")
        assert ("identity_gap" in evals[-1]) == (alignment == "pointer")  # the boundaries' control
        assert (run / "alignment" / "step-00000002.png").stat().st_size > 5000
        from valle_cli.infer.load import _read

        meta = _read(run)[1]  # classic models omit the key, so older valle versions still load them
        assert ("alignment" in meta["config"]["model"]) == (alignment == "pointer")


@needs_espeak
def test_pointer_training_needs_durations(dataset, tmp_path):
    import shutil

    from valle_cli.train.trainer import Trainer, TrainingError

    bare = tmp_path / "bare"
    shutil.copytree(dataset, bare)
    for name in ("durations", "duration_offsets"):
        (bare / "index" / f"{name}.npy").unlink()
    cfg = load_config("tiny", [f"data.paths=[{bare}]", "model.alignment=pointer"])
    with pytest.raises(TrainingError, match="valle dataset align"):
        Trainer(cfg, tmp_path / "run")
    proc = subprocess.run(
        [sys.executable, "-m", "valle_cli", "dataset", "align", str(bare), "--steps", "20"],
        capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "aligned" in proc.stderr
    Trainer(cfg, tmp_path / "run")  # now it starts


@needs_espeak
def test_plot_alignment_of_a_model(tiny_model, speech_24k, tmp_path):
    import soundfile as sf

    ref = tmp_path / "ref.wav"
    sf.write(ref, speech_24k[0], 24_000)
    out = tmp_path / "align.png"
    proc = subprocess.run(
        [sys.executable, "-m", "valle_cli", "plot", "--alignment", str(tiny_model), "--text", "Good morning.",
         "--ref", str(ref), "-o", str(out), "--max-ar-steps", "120"],
        capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL, env={**os.environ},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert out.stat().st_size > 5000 and "focus" in proc.stderr
    proc = subprocess.run(
        [sys.executable, "-m", "valle_cli", "plot", "--alignment", str(tiny_model)],
        capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.returncode != 0 and "--text" in proc.stderr


def test_speech_seconds_trims_silence():
    from valle_cli.metrics import speech_seconds

    sr = 16_000
    tone = 0.5 * np.sin(np.arange(sr) * 2 * np.pi * 220 / sr)
    wav = np.concatenate([np.zeros(sr // 2), tone, np.zeros(sr)])
    assert speech_seconds(wav, sr) == pytest.approx(1.0, abs=0.03)
    assert speech_seconds(np.zeros(sr), sr) == 0.0


def test_forced_durations_hold_each_symbol_that_long(pointer_model):
    from valle_cli.errors import ValleError
    from valle_cli.infer.engine import generate_batch

    ph = torch.tensor([1, 10, 20, 30, 2])
    prompt = torch.randint(0, 1024, (8, 25), generator=torch.Generator().manual_seed(3))
    durations = torch.tensor([2, 3, 1, 7, 2])
    out = generate_batch(pointer_model, [Request(ph, prompt, durations=durations)], SamplingConfig(seed=0))[0]
    assert out.stopped and torch.bincount(out.frame_symbols).tolist() == durations.tolist()
    assert out.codes.shape == (8, int(durations.sum()))
    for bad in (torch.tensor([2, 3, 1, 7]), torch.tensor([2, 3, 0, 7, 2])):
        with pytest.raises(ValleError, match="durations must give at least 1 frame"):
            generate_batch(pointer_model, [Request(ph, prompt, durations=bad)])


def test_greedy_pointer_moves_at_the_mean_duration(pointer_model):
    """The move head gives a per-frame hazard: with a constant 0.2 the mean duration is 5 frames, and greedy
    decoding holds every symbol 5 frames (comparing 0.2 itself with 1/2 never moved)."""
    import math

    ph = torch.tensor([1, 10, 20, 30, 2])
    prompt = torch.randint(0, 1024, (8, 25), generator=torch.Generator().manual_seed(3))
    head = pointer_model.pointer_head
    with torch.no_grad():
        saved = head.weight.clone(), head.bias.clone()
        head.weight.zero_()
        head.bias[:] = torch.tensor([0.0, math.log(0.25)])  # softmax: move = 0.25 / 1.25 = 0.2
    try:
        out = generate(pointer_model, ph, prompt, sampling=SamplingConfig(ar_temp=0.0, max_ar_steps=800))
    finally:
        with torch.no_grad():
            head.weight.copy_(saved[0])
            head.bias.copy_(saved[1])
    assert out.stopped and torch.bincount(out.frame_symbols).tolist() == [5] * len(ph)


@pytest.fixture(scope="module")
def nar0_model():
    torch.manual_seed(0)
    cfg = load_config("tiny", ["model.alignment=pointer", "model.level0=nar"]).model
    return VALLE(cfg, n_symbols=623).eval()


def test_level0_nar_refuses_options_of_an_autoregressive_level0():
    from valle_cli.errors import ConfigError

    assert load_config("tiny", ["model.level0=nar"]).model.alignment == "none"  # NAR-len (test_nar_len.py)
    nar = ["model.alignment=pointer", "model.level0=nar"]
    for extra in ("train.scheduled_sampling=0.5", "train.input_dropout=0.2", "train.loss_weights.text=1"):
        with pytest.raises(ConfigError, match="act on an autoregressive level 0"):
            load_config("tiny", [*nar, extra])


def test_level0_nar_masks_scores_masked_frames_and_hides_the_response_from_the_prefix(nar0_model):
    s = _sample(0, [2, 3, 1, 4, 2])
    batch = nar0_model.assemble([s, _sample(3, [1, 1, 2])])
    parts = [(b, part) for b, _, _, _, part in batch.targets]
    assert parts == [(0, "response"), (0, "duration"), (1, "response")]  # no pointer head: a duration head
    assert not bool(batch.causal[0])  # level 0 is a non-causal pass
    assert batch.targets[1][2].tolist() == pytest.approx(
        torch.log1p(torch.tensor([2.0, 3, 1, 4, 2])).tolist()
    )
    pre = 4 + 5 + 1 + 20 + 1
    assert batch.prefix_only.tolist() == [pre, 0]
    mask = nar0_model.attention_mask(batch)
    hidden = torch.finfo(mask.dtype).min
    assert (mask[0, 0, :pre, pre:] == hidden).all() and (mask[0, 0, :pre, :pre] == 0).all()
    assert (mask[0, 0, pre:, :] == 0).all()  # the frames see everything
    assert (mask[1, 0, :, : int(batch.lengths[1])] == 0).all()  # a NAR level-3 row is not limited
    # eval mode: every frame masked and scored; training: a random share, only those scored
    assert (batch.targets[0][2] == s.response[0]).all()
    nar0_model.train()
    try:
        torch.manual_seed(1)
        shares = []
        for _ in range(20):
            tgt = nar0_model.assemble([s]).targets[0][2]
            scored = tgt != -100
            assert (tgt[scored] == s.response[0][scored]).all()
            shares.append(int(scored.sum()))
        assert min(shares) >= 1 and len(set(shares)) > 1
    finally:
        nar0_model.eval()
    out = nar0_model([s])
    assert out.counts["l0"] == 12 and "dur" in out.level_loss and out.losses["duration"] >= 0
    # the prefix cannot see the response: its hidden states do not change with the response's codes
    other = Sample(
        s.phonemes, s.prompt, torch.randint(0, 1024, s.response.shape), 0, frame_symbols=s.frame_symbols
    )
    h1 = nar0_model([s], return_hidden=True).hidden[0, :pre]
    h2 = nar0_model([other], return_hidden=True).hidden[0, :pre]
    assert torch.allclose(h1, h2, atol=1e-5)


def test_level0_nar_generates_by_durations_in_parallel(nar0_model):
    from valle_cli.errors import ValleError
    from valle_cli.infer.engine import generate_batch, predict_durations

    ph = torch.tensor([1, 10, 20, 30, 40, 2])
    prompt = torch.randint(0, 1024, (8, 25), generator=torch.Generator().manual_seed(3))
    predicted = predict_durations(nar0_model, [Request(ph, prompt)])[0]
    assert predicted.shape == ph.shape and int(predicted.min()) >= 1
    for temp in (0.0, 1.0):
        out = generate(nar0_model, ph, prompt, sampling=SamplingConfig(ar_temp=temp, seed=2, level0_steps=4))
        assert out.stopped and out.ar_steps == 4
        assert torch.equal(out.frame_symbols, frame_symbols(predicted))
        assert out.codes.shape == (8, int(predicted.sum())) and int(out.codes.max()) < 1024
    forced = torch.tensor([1, 3, 2, 5, 1, 2])
    a, b = generate_batch(
        nar0_model,
        [
            Request(ph, prompt, durations=forced),
            Request(ph[:4].clone().index_fill_(0, torch.tensor([3]), 2), prompt),
        ],
        SamplingConfig(ar_temp=1.0, seed=5),
    )
    assert torch.equal(a.frame_symbols, frame_symbols(forced)) and b.frame_symbols[-1] == 3
    alone = generate_batch(
        nar0_model, [Request(ph, prompt, durations=forced)], SamplingConfig(ar_temp=1.0, seed=5)
    )
    assert torch.equal(alone[0].codes, a.codes)  # a row does not depend on its batch
    capped = generate_batch(
        nar0_model, [Request(ph, prompt, durations=forced)], SamplingConfig(max_ar_steps=len(ph) + 2)
    )[0]
    assert not capped.stopped and capped.codes.shape[1] == len(ph) + 2
    with pytest.raises(ValleError, match="beam search"):
        generate(nar0_model, ph, prompt, sampling=SamplingConfig(beam_width=2))
    for ar_only in ({"repetition_penalty": 1.3}, {"entropix": True}, {"dry_multiplier": 1.0}):
        with pytest.raises(ValleError, match="autoregressive level 0"):  # they would do nothing here
            generate(nar0_model, ph, prompt, sampling=SamplingConfig(**ar_only))
    with pytest.raises(ValleError, match="continuing audio"):
        generate(nar0_model, ph, prompt, prefix=torch.randint(0, 1024, (8, 5)))
    with pytest.raises(ValleError, match="level0_steps"):
        SamplingConfig(level0_steps=0)


def test_level0_nar_learns_a_sample_and_speaks_it_back(nar0_model):
    import copy

    model = copy.deepcopy(nar0_model).train()
    s = _sample(0, [1, 3, 2, 4, 1], seed=7)
    samples = [s, replace(s, level=1), replace(s, level=2)]
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(150):
        opt.zero_grad()
        model(samples).loss.backward()
        opt.step()
    model.eval()
    out = generate(model, s.phonemes, s.prompt, sampling=SamplingConfig(ar_temp=0.0, level0_steps=3))
    assert torch.equal(out.frame_symbols, s.frame_symbols)  # the duration head learned the timing
    assert (out.codes[0] == s.response[0]).float().mean() > 0.9


def test_level0_nar_stream_releases_the_whole_generation(nar0_model):
    from valle_cli.infer.engine import generate_batch

    ph = torch.tensor([1, *range(10, 22), 2])
    req = Request(ph, torch.randint(0, 1024, (8, 30)), durations=torch.full((14,), 9))
    sc = SamplingConfig(ar_temp=1.0, top_k=40, seed=4)
    forced = generate_batch(nar0_model, [req], sc)[0]
    chunks = list(stream_codes(nar0_model, req, sc, StreamSettings(chunk_frames=20, max_chunk_frames=50)))
    assert [c.last for c in chunks] == [False] * (len(chunks) - 1) + [True] and len(chunks) > 2
    assert [c.start for c in chunks] == [0, *np.cumsum([c.codes.shape[1] for c in chunks])[:-1].tolist()]
    assert torch.equal(torch.cat([c.codes for c in chunks], 1), forced.codes)


def test_an_unchanged_dataset_keeps_its_aligner_and_a_changed_one_trains_again(dataset, tmp_path):
    import shutil

    from valle_cli.prepare.align import align_dataset

    root = tmp_path / "ds"
    shutil.copytree(dataset, root)
    first = align_dataset(root, steps=12)
    assert not first.get("reused") and first["aligned"] > 0
    durations = (root / "index" / "durations.npy").read_bytes()
    again = align_dataset(root, steps=12)  # a repeated `valle prepare`: nothing new
    assert again["reused"] and again["aligned"] == first["aligned"] and again["loss"] == first["loss"]
    assert (root / "index" / "durations.npy").read_bytes() == durations
    assert not align_dataset(root, steps=13).get("reused")  # other settings: trained again
    phonemes = np.load(root / "index" / "phonemes.npy")
    phonemes[[0, 1]] = phonemes[[1, 0]]  # a transcript corrected since
    np.save(root / "index" / "phonemes.npy", phonemes)
    assert not align_dataset(root, steps=13).get("reused")
    (root / "aligner.json").write_text("{not json")  # a damaged stamp is not trusted
    assert not align_dataset(root, steps=13).get("reused")
