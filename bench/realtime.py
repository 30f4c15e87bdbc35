"""Real time on this machine: whole generation of a sentence (AR, NAR passes, codec) and streaming's time to
the first audio, per model layout, for the targets of issue 18 (base preset RTF < 1, small <= 0.2; first
audio <= 250 ms small, <= 1 s base).

Random-weight models (speed does not depend on the weights) with STOP suppressed, so every row makes exactly
`--seconds` of audio after a 3 s prompt and ~50 phonemes, greedy. A configuration is `preset` or
`preset:key=value+key=value` with model settings (`prefix=shared`, `group_size=2`, ...) and `dtype=bf16` or
`dtype=int8` (what `valle synth --dtype` does). Each row:
- AR s: level 0 (`ar_tokens`, KV cache);
- NAR s: the 7 NAR passes (`nar_fill`) over the finished level 0 (for shared-prefix models: the prefix pass once,
  then one pass over the response per level);
- codec s: decoding the codes to audio (mel: Griffin-Lim);
- RTF: (AR + NAR + codec) / audio seconds, measured as one `generate` call plus the codec decode;
- first audio s: `stream_codes` + `ChunkDecoder` with default settings until the first audio samples.
Medians of `--repeats` runs, after one warm-up.

Usage:  python bench/realtime.py [--configs small,small:prefix=shared,base,base:prefix=shared] [--seconds 4]
                                 [--codec mel|vocos:random|encodec:random] [--write]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from report import command, machine, write_section  # bench/ is on sys.path when run as a script

PHONEMES = torch.tensor([1, *range(10, 60), 2])  # ~50 phonemes: a sentence
PROMPT_FRAMES = 225  # 3 s


def build(config: str):
    from valle_cli.config import load_config
    from valle_cli.model.valle import VALLE

    preset, _, sets = config.partition(":")
    pairs = dict(kv.split("=", 1) for kv in sets.split("+") if kv)
    dtype = pairs.pop("dtype", "fp32")
    torch.manual_seed(0)
    model = VALLE(
        load_config(preset, [f"model.{k}={v}" for k, v in pairs.items()]).model, n_symbols=623
    ).eval()
    with torch.no_grad():
        for head in [model.heads[0], *getattr(model, "group_heads", [])]:
            head.bias[model.stop_id] = -1e4
    from valle_cli.model.quant import set_dtype

    set_dtype(model, dtype)
    return model


def build_bench_codec(name: str):
    """A codec by name; `vocos:random` / `encodec:random`: that architecture with random weights (decoding
    speed does not depend on them, and pretrained weights cannot be fetched offline), 6 kbps = 8 levels."""
    base, _, variant = name.partition(":")
    if variant == "random":
        from valle_cli.codecs.encodec_codec import EncodecCodec
        from valle_cli.codecs.vocos_codec import VocosCodec

        kinds = {"vocos": VocosCodec, "encodec": EncodecCodec}
        if base not in kinds:
            raise SystemExit(f"--codec {name}: random weights are built for {', '.join(kinds)} only")
        return kinds[base](bandwidth=6.0, pretrained=False).eval()
    from valle_cli.codecs.base import build_codec

    return build_codec(name, "cpu")


def timed(fn, repeats: int) -> tuple[float, object]:
    """(median seconds of `repeats` calls after a warm-up, the last result)."""
    out = fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


@torch.inference_mode()
def measure(model, codec, frames: int, repeats: int) -> dict:
    from valle_cli.infer.engine import NarItem, Request, SamplingConfig, ar_tokens, generate, nar_fill
    from valle_cli.infer.stream import ChunkDecoder, stream_codes

    g = torch.Generator().manual_seed(0)
    req = Request(PHONEMES, torch.randint(0, 1024, (model.n_levels, PROMPT_FRAMES), generator=g))
    sc = SamplingConfig(ar_temp=0.0, max_ar_steps=frames)
    whole_s, out = timed(lambda: generate(model, req.phonemes, req.prompt, sampling=sc), repeats)
    assert out.codes.shape[1] == frames
    ar_s, _ = timed(lambda: sum(1 for _ in ar_tokens(model, [req], sc)), repeats)
    only0 = out.codes.clone()
    only0[1:] = 0
    nar_s, _ = timed(lambda: nar_fill(model, [NarItem(req, only0)], sc), repeats)
    codec_s, _ = timed(lambda: codec.decode(out.codes[None].to(codec.device)), repeats)

    def first_audio() -> float:
        t0 = time.perf_counter()
        dec = ChunkDecoder(codec)
        for chunk in stream_codes(model, req, sc):
            if dec.push(chunk.codes, chunk.last).size:
                return time.perf_counter() - t0
        raise AssertionError("the stream gave no audio")

    first_s, _ = timed(first_audio, repeats)
    audio = frames / 75
    return {"ar": ar_s, "nar": nar_s, "codec": codec_s, "rtf": (whole_s + codec_s) / audio, "first": first_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", default="small,small:prefix=shared,base,base:prefix=shared")
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--codec", default="mel")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    codec = build_bench_codec(args.codec)
    frames = int(args.seconds * 75)
    rows = []
    for config in [c for c in args.configs.split(",") if c]:
        rows.append((config, measure(build(config), codec, frames, args.repeats)))
        r = rows[-1][1]
        print(
            f"{config}: AR {r['ar']:.2f} s, NAR {r['nar']:.2f} s, codec {r['codec']:.2f} s, RTF {r['rtf']:.2f}, "
            f"first audio {r['first']:.2f} s",
            flush=True,
        )
    if args.write:
        from valle_cli.infer.stream import StreamSettings

        st = StreamSettings()
        lines = [
            f"Command: `{command('realtime.py')}`  ",
            machine()
            + f"fp32 unless a row says dtype (int8, int4: `valle synth --dtype`), random weights, batch 1, greedy, {args.seconds:g} s of audio after a 3 s prompt "
            f"and ~50 phonemes, {args.codec} codec. RTF = (AR + NAR + codec) / audio seconds (one `generate` call "
            "plus the codec decode); first audio: streaming with default settings "
            f"({st.chunk_frames}-frame first chunk, {st.lookahead} frames of lookahead). Medians of {args.repeats} "
            "after a warm-up.",
            "",
            "| model | AR s | NAR s (7 passes) | codec s | RTF | streaming: first audio s |",
            "|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {c} | {r['ar']:.2f} | {r['nar']:.2f} | {r['codec']:.2f} | {r['rtf']:.2f} | {r['first']:.2f} |"
            for c, r in rows
        ]
        write_section(
            "Real time on 2 CPU cores" + ("" if args.codec == "mel" else f" ({args.codec} codec)"), lines
        )


if __name__ == "__main__":
    main()
