"""VALL-E 2's grouped code modeling (`model.group_size` G): one AR step reads and predicts G level-0 codes.
The training layout and decoding agree; every inference path takes it (samplers, repetition-aware sampling,
beam search, batches, streaming, continuation, speech-to-text); `max_ar_steps` still counts frames; what
acts per frame is refused; train, export and speak from the CLI."""

from __future__ import annotations

import pytest
import torch

from valle_cli.config import load_config
from valle_cli.errors import ConfigError
from valle_cli.infer.engine import Request, SamplingConfig, ar_decoder, generate, generate_batch
from valle_cli.model.valle import IGNORE, VALLE, Sample

from .conftest import needs_espeak, train_and_export, valle_cli


def grouped(g: int, stop_bias: float | None = -1e4) -> VALLE:
    torch.manual_seed(0)
    m = VALLE(load_config("tiny", [f"model.group_size={g}"]).model, n_symbols=623).eval()
    if stop_bias is not None:
        with torch.no_grad():
            for head in [m.heads[0], *getattr(m, "group_heads", [])]:
                head.bias[m.stop_id] = stop_bias
    return m


def request(seed: int = 1, frames: int = 30) -> Request:
    g = torch.Generator().manual_seed(seed)
    return Request(torch.tensor([1, 10, 20, 30, 2]), torch.randint(0, 1024, (8, frames), generator=g))


@pytest.mark.parametrize(("frames", "g"), [(7, 2), (8, 2), (9, 4), (8, 4)])
def test_the_layout_ends_with_stop_in_the_slot_after_the_last_frame(frames, g):
    m = grouped(g)
    r0 = torch.arange(frames)
    inp, tgt = m.grouped_level0(r0)
    n = frames // g + 1
    assert inp.shape == (n, 64) and tgt.shape == (n, g)
    flat = tgt.flatten()
    assert flat[:frames].tolist() == r0.tolist() and int(flat[frames]) == m.stop_id
    assert bool((flat[frames + 1 :] == IGNORE).all())
    # inputs: START in every slot, then the whole groups before the last position
    want = torch.cat([torch.full((1, g), m.start_id), r0[: (n - 1) * g].view(n - 1, g)])
    torch.testing.assert_close(inp, m.level0_embed(want))


@pytest.mark.parametrize("g", [2, 3])
def test_decoding_agrees_with_the_training_layout(g):
    """Greedy codes, scored teacher-forced by the training forward, are each one's argmax (STOP included)."""
    m = grouped(g, stop_bias=None)
    req = request()
    with torch.no_grad():
        for bias in torch.linspace(0.0, 4.0, 81).tolist():  # stop after a few frames
            for head in [m.heads[0], *m.group_heads]:
                head.bias[m.stop_id] = bias
            out = generate(m, req.phonemes, req.prompt, sampling=SamplingConfig(ar_temp=0.0, max_ar_steps=60))
            if out.stopped and out.codes.shape[1] >= 3:
                break
        assert out.stopped and out.codes.shape[1] >= 3
        s = Sample(req.phonemes, req.prompt, out.codes, 0)
        batch = m.assemble([s])
        h = m([s], return_hidden=True).hidden[0]
        _, start, tgt, _, _ = next(t for t in batch.targets if t[4] == "response")
        pred = m.level0_logits(h[start : start + len(tgt)]).argmax(-1)
    scored = tgt != IGNORE
    assert torch.equal(pred[scored], tgt[scored])


@pytest.mark.parametrize("g", [2, 4])
def test_cache_batches_and_step_limit_count_frames(g):
    m = grouped(g)
    req, other = request(1), request(2, frames=12)
    sc = SamplingConfig(ar_temp=0.0, max_ar_steps=15)
    a = generate(m, req.phonemes, req.prompt, sampling=sc, use_cache=True)
    b = generate(m, req.phonemes, req.prompt, sampling=sc, use_cache=False)
    assert a.codes.shape == (8, 15) and not a.stopped and torch.equal(a.codes, b.codes)
    both = generate_batch(m, [req, other], sc)
    assert torch.equal(both[0].codes, a.codes)
    assert torch.equal(both[1].codes, generate_batch(m, [other], sc)[0].codes)


def test_a_stop_in_the_middle_of_a_group_ends_there():
    m = grouped(3)
    with torch.no_grad():
        m.group_heads[0].bias[m.stop_id] = 1e4  # slot 1 always says STOP
    req = request()
    out = generate(m, req.phonemes, req.prompt, sampling=SamplingConfig(ar_temp=0.0, max_ar_steps=50))
    assert out.stopped and out.codes.shape[1] == 1  # slot 0's code, then STOP


def test_samplers_and_repetition_aware_sampling_reproduce_with_a_seed():
    m = grouped(2)
    req = request()
    for extra in ({"top_k": 20}, {"ras_window": 10, "ras_threshold": 0.1}, {"repetition_penalty": 1.3},
                  {"top_nsigma": 1.0}, {"entropix": True}):  # fmt: skip
        sc = SamplingConfig(ar_temp=1.0, max_ar_steps=20, seed=3, **extra)
        a = generate(m, req.phonemes, req.prompt, sampling=sc)
        b = generate(m, req.phonemes, req.prompt, sampling=sc)
        assert a.codes.shape == (8, 20) and torch.equal(a.codes, b.codes), extra


def test_beam_search_over_groups():
    from valle_cli.infer.beam import beam_search

    m = grouped(2, stop_bias=None)
    req = request()
    with torch.no_grad():
        for head in [m.heads[0], *m.group_heads]:
            head.bias[m.stop_id] = 1.5

    def logprob(codes: list[int]) -> float:
        dec = ar_decoder(m, [req])
        seq, total = [*codes, m.stop_id], 0.0
        for k in range(0, len(seq), 2):
            lp = dec.logits()[0].float().log_softmax(-1)  # (G, V)
            total += sum(float(lp[j, t]) for j, t in enumerate(seq[k : k + 2]))
            dec.feed(torch.tensor([seq[k : k + 2] + [m.start_id] * (2 - len(seq[k : k + 2]))]))
        return total

    with torch.inference_mode():
        greedy = generate(m, req.phonemes, req.prompt, sampling=SamplingConfig(ar_temp=0.0, max_ar_steps=40))
        one, stopped1 = beam_search(ar_decoder(m, [req]), 1, 40, m.stop_id, 0.0)
        assert stopped1 and one == greedy.codes[0].tolist()
        four, stopped4 = beam_search(ar_decoder(m, [req]), 4, 40, m.stop_id, 0.0)
        assert stopped4 and logprob(four) >= logprob(one) - 1e-4
        sc = SamplingConfig(beam_width=4, max_ar_steps=40, beam_length_norm=0.0)
        assert generate_batch(m, [req], sc)[0].codes[0].tolist() == four
        capped, _ = beam_search(ar_decoder(m, [req]), 3, 5, m.stop_id, 0.0)
        assert len(capped) <= 5


def test_streaming_continuation_and_stt_take_grouped_models():
    from valle_cli.infer.stream import StreamSettings, stream_codes
    from valle_cli.infer.stt import transcribe_codes

    m = grouped(2)
    req = request()
    sc = SamplingConfig(ar_temp=0.0, max_ar_steps=40)
    whole = generate(m, req.phonemes, req.prompt, sampling=sc)
    chunks = list(stream_codes(m, req, sc, StreamSettings(chunk_frames=10, lookahead=3, growth=1)))
    assert torch.equal(torch.cat([c.codes for c in chunks], 1)[0], whole.codes[0])
    # continuation from an odd number of frames: whole groups are fed, the response follows the prefix
    cont = Request(req.phonemes, req.prompt, prefix=whole.codes[:, :7])
    out = generate_batch(m, [cont], SamplingConfig(ar_temp=0.0, max_ar_steps=10))[0]
    assert out.codes.shape == (8, 10)
    ids, _ = transcribe_codes(m, whole.codes, bos_id=1, eos_id=2, max_symbols=5)
    assert len(ids) <= 5


def test_what_acts_per_frame_is_refused():
    with pytest.raises(ConfigError, match="groups the codes of an autoregressive level 0"):
        load_config("tiny", ["model.group_size=2", "model.alignment=pointer"])
    with pytest.raises(ConfigError, match="groups the codes of an autoregressive level 0"):
        load_config("tiny", ["model.group_size=2", "model.level0=nar"])
    for extra in ("train.scheduled_sampling=0.2", "train.input_dropout=0.1", "train.loss_weights.prompt=1"):
        with pytest.raises(ConfigError, match="acts? on one level-0 code per step"):
            load_config("tiny", ["model.group_size=2", extra])
    with pytest.raises(ConfigError, match="model.group_size must be positive"):
        load_config("tiny", ["model.group_size=0"])


@needs_espeak
def test_train_export_and_speak_from_the_cli(dataset, tmp_path):
    _, out = train_and_export(dataset, tmp_path, "model.group_size=2")
    for extra in ([], ["--beam-width", "2"], ["--stream"]):
        wav = tmp_path / f"a{len(extra)}.wav"
        proc = valle_cli("synth", "Hello.", "--model", str(out), "-o", str(wav), "--seed", "1",
                         "--max-ar-steps", "40", *extra)  # fmt: skip
        assert proc.returncode == 0 and wav.exists(), proc.stderr[-3000:]
