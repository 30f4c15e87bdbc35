"""`model.prefix: shared`: the level marker sits after the text and prompt, which attend only to themselves, so
inference runs them once per request and every pass (AR, each NAR level, level-0 masked passes) runs only
its own positions after that cache. The passes agree with the training layout; caches fork without growing
the shared one; what cannot run it is refused; train, export and speak from the CLI."""

from __future__ import annotations

import pytest
import torch

from valle_cli.config import load_config
from valle_cli.errors import ConfigError
from valle_cli.infer.engine import (
    Request,
    SamplingConfig,
    _nar_pass,
    generate,
    generate_batch,
    shared_prefix,
)
from valle_cli.infer.stream import StreamSettings, stream_codes
from valle_cli.model.valle import IGNORE, VALLE, Sample, frame_symbols

from .conftest import needs_espeak, train_and_export, valle_cli


def shared(*sets: str, backbone: str = "llama") -> VALLE:
    torch.manual_seed(0)
    cfg = load_config("tiny", [f"model.backbone={backbone}", "model.prefix=shared", *sets]).model
    return VALLE(cfg, n_symbols=623).eval()


def request(seed: int = 1, symbols: int = 5, frames: int = 30) -> Request:
    g = torch.Generator().manual_seed(seed)
    ph = torch.randint(4, 623, (symbols,), generator=g)
    ph[0], ph[-1] = 1, 2
    return Request(ph, torch.randint(0, 1024, (8, frames), generator=g))


def test_classic_stays_the_default_and_old_configs_load_as_it():
    assert load_config("tiny").model.prefix == "classic"
    m = VALLE(load_config("tiny").model, n_symbols=623)
    assert not m.shared and m.text_start == 4
    assert shared().text_start == 3


@pytest.mark.parametrize("backbone", ["llama", "transformer"])
def test_the_prefix_is_the_same_in_every_pass_and_never_sees_the_response(backbone):
    m = shared(backbone=backbone)
    req = request()
    g = torch.Generator().manual_seed(2)
    codes = torch.randint(0, 1024, (8, 12), generator=g)
    other = torch.randint(0, 1024, (8, 17), generator=g)
    rows = [Sample(req.phonemes, req.prompt, codes, level) for level in range(8)]
    rows.append(Sample(req.phonemes, req.prompt, other, 0))  # another response, another length
    with torch.no_grad():
        h = m(rows, return_hidden=True).hidden
    n = len(m.prefix(rows[0])[0])
    for row in range(1, len(rows)):
        torch.testing.assert_close(h[row, :n], h[0, :n], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backbone", ["llama", "transformer"])
def test_a_pass_after_the_shared_prefix_equals_the_training_forward(backbone):
    """Two requests with prefixes and responses of different lengths (left-padded prefix, right-padded
    responses): each NAR level's and a level-0 row's hidden states match the training layout's."""
    m = shared(backbone=backbone)
    reqs = [request(1, symbols=5, frames=30), request(2, symbols=9, frames=22)]
    g = torch.Generator().manual_seed(3)
    responses = [torch.randint(0, 1024, (8, 14), generator=g), torch.randint(0, 1024, (8, 9), generator=g)]
    with torch.inference_mode():
        past = shared_prefix(m, reqs)
        for level in (1, 4, 7):
            samples = [Sample(r.phonemes, r.prompt, c, level) for r, c in zip(reqs, responses, strict=True)]
            hidden, starts = _nar_pass(m, samples, past)
            batch = m.assemble(samples)
            want = m.backbone(batch.inputs_embeds, m.attention_mask(batch), batch.position_ids).hidden
            wstarts = [s for _, s, _, _, part in batch.targets if part == "response"]
            for b, c in enumerate(responses):
                n = c.shape[1]
                torch.testing.assert_close(
                    hidden[b, starts[b] : starts[b] + n],
                    want[b, wstarts[b] : wstarts[b] + n],
                    atol=1e-4,
                    rtol=1e-4,
                )
        # one row of the pair, picked out of the shared prefix's batch
        samples = [Sample(reqs[1].phonemes, reqs[1].prompt, responses[1], 2)]
        hidden, starts = _nar_pass(m, samples, past, rows=[1])
        batch = m.assemble(samples)
        want = m.backbone(batch.inputs_embeds, m.attention_mask(batch), batch.position_ids).hidden
        ws = next(s for _, s, _, _, part in batch.targets if part == "response")
        torch.testing.assert_close(
            hidden[0, starts[0] : starts[0] + 9], want[0, ws : ws + 9], atol=1e-4, rtol=1e-4
        )


@pytest.mark.parametrize("sets", [[], ["model.group_size=2"], ["model.backbone=transformer"]])
def test_greedy_decoding_is_the_argmax_of_the_training_forward_at_every_level(sets):
    m = shared(*sets)
    req = request()
    heads0 = [m.heads[0], *getattr(m, "group_heads", [])]
    with torch.no_grad():
        for bias in torch.linspace(0.0, 6.0, 121).tolist():  # stop after a few frames
            for head in heads0:
                head.bias[m.stop_id] = bias
            out = generate(m, req.phonemes, req.prompt, sampling=SamplingConfig(ar_temp=0.0, max_ar_steps=60))
            if out.stopped and out.codes.shape[1] >= 3:
                break
        assert out.stopped and out.codes.shape[1] >= 3
        for level in range(m.n_levels):
            s = Sample(req.phonemes, req.prompt, out.codes, level)
            batch = m.assemble([s])
            h = m([s], return_hidden=True).hidden[0]
            _, start, tgt, head, _ = next(t for t in batch.targets if t[4] == "response")
            logits = m.head_for(head)(h[start : start + len(tgt)])
            if level:
                logits = logits[..., : m.codebook_size]
            pred = logits.argmax(-1)
            scored = tgt != IGNORE
            assert torch.equal(pred[scored], tgt[scored]), f"level {level}"


def test_pointer_and_parallel_level0_models_share_their_prefix_too():
    sc = SamplingConfig(ar_temp=0.0, max_ar_steps=80)
    reqs = [request(1), request(2, symbols=8, frames=20)]
    for sets in (
        ["model.alignment=pointer"],
        ["model.alignment=pointer", "model.level0=nar"],
        ["model.level0=nar"],
    ):
        m = shared(*sets)
        batched = generate_batch(m, reqs, sc)
        for r, b in zip(reqs, batched, strict=True):
            alone = generate_batch(m, [r], sc)[0]
            assert torch.equal(alone.codes, b.codes), sets
            assert b.codes.shape[0] == 8 and b.codes.shape[1] >= 1
    # the level0-nar pointer model's durations come from the shared prefix's pass: the training forward's
    m = shared("model.alignment=pointer", "model.level0=nar")
    from valle_cli.infer.engine import predict_durations

    with torch.inference_mode():
        d = predict_durations(m, reqs, shared_prefix(m, reqs))
        for r, got in zip(reqs, d, strict=True):
            s = Sample(r.phonemes, r.prompt, torch.zeros(8, int(got.sum()), dtype=torch.long), 0,
                       frame_symbols=frame_symbols(got))  # fmt: skip
            batch = m.assemble([s])
            h = m.backbone(batch.inputs_embeds, m.attention_mask(batch), batch.position_ids).hidden[0]
            t0 = m.text_start
            want = m.durations(h[t0 : t0 + len(r.phonemes)]).round().long().clamp(1, 100)
            assert torch.equal(want, got)


def test_stream_matches_whole_generation():
    m = shared()
    with torch.no_grad():
        m.heads[0].bias[m.stop_id] = -1e4
    req = request()
    sc = SamplingConfig(ar_temp=1.0, top_k=40, max_ar_steps=120, seed=4)
    whole = generate(m, req.phonemes, req.prompt, sampling=sc)
    one = list(stream_codes(m, req, sc, StreamSettings(chunk_frames=100_000, max_chunk_frames=100_000)))
    assert torch.equal(one[0].codes, whole.codes)
    chunks = list(stream_codes(m, req, sc, StreamSettings(chunk_frames=20, max_chunk_frames=40)))
    assert len(chunks) > 2 and torch.equal(torch.cat([c.codes for c in chunks], 1)[0], whole.codes[0])


@pytest.mark.parametrize("backbone", ["llama", "transformer"])
def test_a_forked_cache_grows_alone(backbone):
    m = shared(backbone=backbone)
    with torch.inference_mode():
        past = shared_prefix(m, [request()])
        n = past.cache.get_seq_length()
        fork = past.fork(m.backbone)
        x = torch.randn(1, 3, 64)
        pos = torch.arange(n, n + 3)[None]
        mask = torch.zeros(1, 1, 3, n + 3)
        m.backbone(x, mask, pos, cache=fork, use_cache=True)
        assert fork.get_seq_length() == n + 3 and past.cache.get_seq_length() == n
        two = past.fork(m.backbone, [0, 0])  # rows picked or repeated
        m.backbone(
            x.expand(2, -1, -1), mask.expand(2, -1, -1, -1), pos.expand(2, -1), cache=two, use_cache=True
        )
        assert past.cache.get_seq_length() == n


def test_what_cannot_share_a_prefix_is_refused():
    for backbone in ("mamba", "retnet"):
        with pytest.raises(ConfigError, match="model.prefix: shared"):
            load_config("tiny", [f"model.backbone={backbone}", "model.prefix=shared"])
    with pytest.raises(ConfigError, match="nothing to predict"):
        load_config("tiny", ["model.prefix=shared", "train.loss_weights.text=1"])
    with pytest.raises(ConfigError, match="classic"):
        load_config("tiny", ["model.prefix=sharde"])


@needs_espeak
def test_train_export_and_speak_from_the_cli(dataset, tmp_path):
    _, out = train_and_export(dataset, tmp_path, "model.prefix=shared")
    for extra in ([], ["--stream"], ["--beam-width", "2"]):
        wav = tmp_path / f"a{len(extra)}.wav"
        proc = valle_cli("synth", "Hello.", "--model", str(out), "-o", str(wav), "--seed", "1",
                         "--max-ar-steps", "40", *extra)  # fmt: skip
        assert proc.returncode == 0 and wav.exists(), proc.stderr[-3000:]
