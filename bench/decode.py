"""Decoding speed per preset: KV-cached vs uncached AR steps at several context lengths, the bare backbone's
single-token forward, NAR passes, codec decoding, real-time factor and streaming's time to first audio.

Random-weight models (speed does not depend on the weights) with STOP suppressed. For each context length L
(text + prompt + response so far):
- cached step: one step of the engine (`ar_tokens`: backbone with KV cache, level-0 head, sampler, bookkeeping)
  with L tokens in the cache;
- bare step: the backbone alone on one token with the same cache (the floor the engine's overhead adds to);
- uncached step: the whole L-token sequence through the backbone, as the original does every step.
Then, for a 3 s prompt and ~50 phonemes: the 7 NAR passes and the codec decode for a 4 s response, the real-time
factor of the whole generation (AR + NAR + codec) / audio seconds, and the time to the first audio chunk when
streaming (default `StreamSettings`).

Then one row per backbone (`--backbones`, at the `--backbone-preset` shape): the cached step at growing
lengths (attention backbones read a KV cache that grows with L; the recurrent ones, mamba and retnet, a state
of fixed size, so their step should not grow) and the uncached step at the shortest length.

And layer skip (`--layer-skip-preset`, transformer backbone): the cached step when every step exits after
layer k (thresholds set so that it always does) for each k, against the full step: the most an early exit
can save at that depth. Whether a trained model is confident that early is another question (see the
section's note).

Usage:  python bench/decode.py [--presets tiny,small,base] [--lengths 300,600,900]
                               [--backbones llama,mamba,...] [--backbone-lengths 300,900,1800]
                               [--layer-skip-preset small] [--group-sizes 1,2,4] [--write]

And grouped codes (VALL-E 2, `model.group_size` G; `--group-sizes`, the `--layer-skip-preset` shape): AR steps
per second of audio (75 / G) and the measured time to make 4 s of level 0.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from report import command, machine, write_section  # bench/ is on sys.path when run as a script

PHONEMES = torch.tensor([1, *range(10, 60), 2])  # ~50 phonemes: a sentence
PROMPT_FRAMES = 225  # 3 s


def build(preset: str, backbone: str | None = None):
    from valle_cli.config import load_config
    from valle_cli.model.valle import VALLE

    torch.manual_seed(0)
    model = VALLE(
        load_config(preset, [f"model.backbone={backbone}"] if backbone else []).model, n_symbols=623
    )
    model.eval()
    with torch.no_grad():
        model.heads[0].bias[model.stop_id] = -1e4
    return model


def request_of_length(model, length: int):
    """A request whose AR prefix (header, text, prompt, START) is `length` tokens long."""
    from valle_cli.infer.engine import Request

    prompt_frames = length - len(PHONEMES) - 7  # header 4, separators 2, START 1
    g = torch.Generator().manual_seed(0)
    return Request(PHONEMES, torch.randint(0, 1024, (model.n_levels, prompt_frames), generator=g))


def per_step(fn, n: int) -> float:
    """Median seconds of n calls of fn (after one warm-up)."""
    fn()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.inference_mode()
def steps_at(model, length: int, n_cached: int, n_uncached: int) -> dict:
    from valle_cli.backbones.base import Layout, padded_mask
    from valle_cli.infer.engine import SamplingConfig, ar_decoder, ar_tokens

    req = request_of_length(model, length)
    # the engine's own step: next() on the token generator runs logits + sampling, and the feed of the last one
    gen = ar_tokens(model, [req], SamplingConfig(ar_temp=0.0, max_ar_steps=10_000))
    next(gen)  # prefill
    cached = per_step(lambda: next(gen), n_cached)
    # the bare backbone on one token, with a cache of the same length (masks made outside the timing)
    dec = ar_decoder(model, [req])
    dec.logits()
    d = model.cfg.d_model
    x = torch.randn(1, 1, d)
    state = {"cache": dec.cache, "pos": dec.cache.get_seq_length()}
    assert state["pos"] == length
    masks = {}
    one = Layout(torch.ones(1, 1, dtype=torch.bool), torch.ones(1, dtype=torch.bool))

    def bare():
        s = state["pos"]
        mask = masks.get(s)
        if mask is None:
            mask = masks[s] = padded_mask(torch.ones(1, s + 1, dtype=torch.bool), 1)
        out = model.backbone(x, mask, torch.tensor([[s]]), cache=state["cache"], use_cache=True, layout=one)
        state["cache"], state["pos"] = out.cache, s + 1

    for s in range(length, length + n_cached + 2):  # masks for every step, made before timing
        masks[s] = padded_mask(torch.ones(1, s + 1, dtype=torch.bool), 1)
    bare_s = per_step(bare, n_cached)
    full = ar_decoder(model, [req], use_cache=False)
    uncached = per_step(full.logits, n_uncached) if n_uncached else None
    return {"cached": cached, "bare": bare_s, "uncached": uncached}


@torch.inference_mode()
def generation(model, codec, response_frames: int) -> dict:
    from valle_cli.infer.engine import NarItem, Request, SamplingConfig, generate
    from valle_cli.infer.stream import ChunkDecoder, stream_codes

    g = torch.Generator().manual_seed(0)
    req = Request(PHONEMES, torch.randint(0, 1024, (model.n_levels, PROMPT_FRAMES), generator=g))
    sc = SamplingConfig(ar_temp=0.0, max_ar_steps=response_frames)
    t0 = time.perf_counter()
    out = generate(model, req.phonemes, req.prompt, sampling=sc)
    gen_s = time.perf_counter() - t0
    from valle_cli.infer.engine import nar_fill

    only0 = out.codes.clone()
    only0[1:] = 0
    nar_s = per_step(lambda: nar_fill(model, [NarItem(req, only0)], sc), 2)
    codec_s = per_step(lambda: codec.decode(out.codes[None]), 2)
    t0 = time.perf_counter()
    dec = ChunkDecoder(codec)
    first = None
    for chunk in stream_codes(model, req, sc):
        if dec.push(chunk.codes, chunk.last).size and first is None:
            first = time.perf_counter() - t0
    stream_total = time.perf_counter() - t0
    audio = response_frames / 75
    return {
        "nar": nar_s,
        "codec": codec_s,
        "rtf": (gen_s + codec_s) / audio,
        "first_audio": first,
        "stream_rtf": stream_total / audio,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", default="tiny,small,base", help="none: only the other tables")
    ap.add_argument("--lengths", default="300,600,900")
    ap.add_argument("--steps", type=int, default=20, help="cached/bare steps timed per length")
    ap.add_argument("--uncached-steps", type=int, default=3)
    ap.add_argument("--response-seconds", type=float, default=4.0)
    ap.add_argument("--backbones", default="llama,mixtral,transformer,bitnet,mamba,retnet")
    ap.add_argument("--backbone-preset", default="small")
    ap.add_argument("--backbone-lengths", default="300,900,1800")
    ap.add_argument("--layer-skip-preset", default="small", help="none skips the layer-skip rows")
    ap.add_argument("--layer-skip-length", type=int, default=600)
    ap.add_argument("--group-sizes", default="1,2,4", help="none skips the grouped-code rows")
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    from valle_cli.codecs.base import build_codec

    codec = build_codec("mel", "cpu")
    lengths = [int(v) for v in args.lengths.split(",")]
    rows, gens = [], []
    for preset in [p for p in args.presets.split(",") if p and p != "none"]:
        model = build(preset)
        for length in lengths:
            r = steps_at(model, length, args.steps, args.uncached_steps)
            rows.append((preset, length, r))
            print(
                f"{preset} L={length}: cached {r['cached'] * 1e3:.1f} ms/step ({1 / r['cached']:.1f} steps/s), "
                f"bare backbone {r['bare'] * 1e3:.1f} ms ({r['cached'] / r['bare']:.2f}x), "
                f"uncached {r['uncached'] * 1e3:.0f} ms ({r['uncached'] / r['cached']:.1f}x slower)",
                flush=True,
            )
        g = generation(model, codec, int(args.response_seconds * 75))
        gens.append((preset, g))
        print(
            f"{preset}: NAR {g['nar']:.2f} s, codec {g['codec']:.2f} s, RTF {g['rtf']:.2f}, "
            f"streaming first audio {g['first_audio']:.2f} s (RTF {g['stream_rtf']:.2f})",
            flush=True,
        )
        del model
    per_backbone = backbone_rows(args)
    if args.write and per_backbone:
        write_section("Decoding speed per backbone", per_backbone)
    skipping = layer_skip_rows(args)
    if args.write and skipping:
        write_section("Layer skip: what an early exit saves", skipping)
    groups = group_rows(args)
    if args.write and groups:
        write_section("Grouped codes (VALL-E 2): AR steps per second of audio", groups)
    if args.write and rows:
        lines = [
            f"Command: `{command('decode.py')}`  ",
            machine() + "fp32, random weights, batch 1, greedy. L = tokens before the step (text + prompt + "
            "response so far). Cached = one engine step (KV-cached backbone + head + sampler + bookkeeping); "
            "bare = the backbone alone on one token with the same cache; uncached = the whole sequence again, "
            "as the original does every step. Medians.",
            "",
            "| preset | L | cached ms/step | steps/s | bare backbone ms | cached / bare | uncached ms/step | "
            "uncached / cached |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for preset, length, r in rows:
            lines.append(
                f"| {preset} | {length} | {r['cached'] * 1e3:.1f} | {1 / r['cached']:.1f} | {r['bare'] * 1e3:.1f} | "
                f"{r['cached'] / r['bare']:.2f}x | {r['uncached'] * 1e3:.0f} | {r['uncached'] / r['cached']:.1f}x |"
            )
        secs = args.response_seconds
        lines += [
            "",
            f"Whole generation of {secs:g} s of audio after a 3 s prompt and ~50 phonemes (mel codec): the 7 NAR "
            "passes, the codec decode, the real-time factor (AR + NAR + codec time / audio time; < 1 is faster "
            "than real time) and streaming's time to the first audio chunk (default settings: a 36-frame first chunk, "
            "then chunks doubling up to 225 frames, 8 frames of lookahead).",
            "",
            "| preset | NAR s | codec decode s | RTF | streaming: first audio s | streaming RTF |",
            "|---|---|---|---|---|---|",
        ]
        for preset, g in gens:
            lines.append(
                f"| {preset} | {g['nar']:.2f} | {g['codec']:.2f} | {g['rtf']:.2f} | {g['first_audio']:.2f} | "
                f"{g['stream_rtf']:.2f} |"
            )
        write_section("Decoding speed (valle synth)", lines)


def backbone_rows(args) -> list[str]:
    """The per-backbone table (markdown lines), printing as it goes."""
    names = [b for b in args.backbones.split(",") if b and b != "none"]
    if not names:
        return []
    lengths = [int(v) for v in args.backbone_lengths.split(",")]
    table = []
    for name in names:
        model = build(args.backbone_preset, name)
        cached = []
        for length in lengths:
            r = steps_at(model, length, args.steps, args.uncached_steps if length == lengths[0] else 0)
            cached.append(r)
        growth = cached[-1]["cached"] / cached[0]["cached"]
        print(
            f"{name}: cached ms/step "
            + ", ".join(f"L={n}: {r['cached'] * 1e3:.1f}" for n, r in zip(lengths, cached, strict=True))
            + f" (x{growth:.2f} from L={lengths[0]} to {lengths[-1]}); uncached at L={lengths[0]}: "
            f"{cached[0]['uncached'] * 1e3:.0f} ms",
            flush=True,
        )
        table.append((name, cached, growth))
        del model
    lines = [
        f"Command: `{command('decode.py')}`  ",
        machine()
        + f"fp32, random weights, the `{args.backbone_preset}` shape (d_model, layers, heads) with each backbone, "
        "batch 1, greedy. Cached = one engine step with L tokens already read (a KV cache for attention "
        "backbones, a fixed-size state for mamba and retnet); growth = the step at the longest L over the step "
        "at the shortest. Medians.",
        "",
        "| backbone | "
        + " | ".join(f"cached ms/step, L={n}" for n in lengths)
        + f" | growth | uncached ms/step, L={lengths[0]} |",
        "|---|" + "---|" * (len(lengths) + 2),
    ]
    for name, cached, growth in table:
        lines.append(
            f"| {name} | "
            + " | ".join(f"{r['cached'] * 1e3:.1f}" for r in cached)
            + f" | {growth:.2f}x | {cached[0]['uncached'] * 1e3:.0f} |"
        )
    lines += [
        "",
        "Mamba and retnet read a state of fixed size, so their cached step does not grow with L; the attention "
        "backbones read a KV cache that does. Their uncached pass is the whole sequence: mamba's is slow on a CPU "
        "because transformers' reference scan loops over time (the mamba-ssm kernels replace it on a GPU); it is "
        "what training pays per layer, not what decoding pays per step.",
    ]
    return lines


@torch.inference_mode()
def layer_skip_rows(args) -> list[str]:
    """Cached step time with every step exiting after layer k, for each k, against the full step."""
    from valle_cli.infer.engine import SamplingConfig, ar_tokens

    if args.layer_skip_preset in ("", "none"):
        return []
    model = build(args.layer_skip_preset, "transformer")
    n_layers = len(model.backbone.layers)
    req = request_of_length(model, args.layer_skip_length)

    def step_ms(sc) -> float:
        gen = ar_tokens(model, [req], sc)
        next(gen)  # prefill
        return per_step(lambda: next(gen), args.steps) * 1e3

    full = step_ms(SamplingConfig(ar_temp=0.0, max_ar_steps=10_000))
    rows = []
    for k in range(1, n_layers):
        sc = SamplingConfig(ar_temp=0.0, max_ar_steps=10_000, layer_skip=True, layer_skip_exit_layer=k, layer_skip_min_layer=k,
                            layer_skip_entropy=1e9, layer_skip_varentropy=1e9)  # fmt: skip
        ms = step_ms(sc)
        rows.append((k, ms))
        print(
            f"layer skip: exit after {k}/{n_layers}: {ms:.1f} ms/step (full {full:.1f}, {full / ms:.2f}x)",
            flush=True,
        )
    never = step_ms(SamplingConfig(ar_temp=0.0, max_ar_steps=10_000, layer_skip=True, layer_skip_entropy=0.0))
    print(
        f"layer skip on, never confident: {never:.1f} ms/step ({never / full:.2f}x the full step)", flush=True
    )
    lines = [
        f"Command: `{command('decode.py')}`  ",
        machine()
        + f"fp32, random weights, the `{args.layer_skip_preset}` shape with the transformer backbone, batch 1, "
        f"L = {args.layer_skip_length}. Every step forced to exit after layer k (confidence thresholds set "
        "out of reach), against the plain cached step; 'never confident' pays the exit checks and never exits. "
        "Medians.",
        "",
        f"| exit after layer | of {n_layers} | ms/step | speed-up over the full step |",
        "|---|---|---|---|",
    ]
    lines += [f"| {k} | {n_layers} | {ms:.1f} | {full / ms:.2f}x |" for k, ms in rows]
    lines += [
        f"| full (no layer skip) | {n_layers} | {full:.1f} | 1.00x |",
        f"| layer skip on, never confident | {n_layers} | {never:.1f} | {full / never:.2f}x |",
        "",
        "An exit after layer k runs k layers, one extra norm + level-0 head per layer checked, and the keys "
        "and values of the skipped layers (their k/v projections only). The saving is real only if a model is "
        "confident that early often enough: each check that does not exit costs a head projection. The "
        "original reports no tangible speed-up from its layer skip; a model trained with `train.layer_skip` "
        "is what decides it, and none is shipped yet.",
    ]
    return lines


@torch.inference_mode()
def group_rows(args) -> list[str]:
    """Level-0 generation of 4 s (300 frames) with G codes per AR step, for each G."""
    from valle_cli.config import load_config
    from valle_cli.infer.engine import SamplingConfig, ar_tokens
    from valle_cli.model.valle import VALLE

    sizes = [int(g) for g in args.group_sizes.split(",") if g and g != "none"]
    preset = "small" if args.layer_skip_preset in ("", "none") else args.layer_skip_preset
    frames = 300
    rows = []
    for g in sizes:
        torch.manual_seed(0)
        model = VALLE(load_config(preset, [f"model.group_size={g}"]).model, n_symbols=623).eval()
        for head in [model.heads[0], *getattr(model, "group_heads", [])]:
            head.bias[model.stop_id] = -1e4
        req = request_of_length(model, 300)
        sc = SamplingConfig(ar_temp=0.0, max_ar_steps=frames)
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            made = sum(1 for _ in ar_tokens(model, [req], sc))
            times.append(time.perf_counter() - t0)
        assert made == frames
        secs = statistics.median(times)
        steps = -(-frames // g)
        rows.append((g, steps, secs))
        print(
            f"group size {g}: {steps} AR steps for 4 s ({75 / g:g} per second of audio), level 0 in {secs:.2f} s "
            f"({secs / 4:.3f} s per second of audio)",
            flush=True,
        )
    if not rows:
        return []
    base = rows[0][2]
    lines = [
        f"Command: `{command('decode.py')}`  ",
        machine()
        + f"fp32, random weights, the `{preset}` shape, batch 1, greedy, 4 s of level 0 (300 frames) after a "
        "300-token prefix. Medians of 3.",
        "",
        "| group size G | AR steps per second of audio | AR steps for 4 s | level 0 for 4 s, s | speed-up |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {g} | {75 / g:g} | {steps} | {secs:.2f} | {base / secs:.2f}x |" for g, steps, secs in rows]
    lines += [
        "",
        "Each AR step costs about the same whatever G (one backbone pass; G small heads), so level 0 gets about "
        "G times faster; the NAR levels and the codec are unchanged. What grouping costs in quality is a "
        "training question (VALL-E 2 reports G = 2 as the best trade-off).",
    ]
    return lines


if __name__ == "__main__":
    main()
