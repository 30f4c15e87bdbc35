"""AR decoding speed: KV-cached vs full recomputation (what the original does), per preset, on this machine.

Random-weight models (speed does not depend on the weights) with STOP suppressed so every run decodes exactly
`--steps` AR tokens, then the 7 NAR passes. Reports AR steps per second with and without the cache, the
speed-up, and the real-time factor of the whole generation (frames / 75 per second of audio).

Usage:  python bench/infer.py [--presets tiny,small,base] [--steps 150] [--prompt-seconds 3] [--write]
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
from report import command, write_section  # bench/ is on sys.path when run as a script


def measure(preset: str, steps: int, prompt_frames: int, cache: bool) -> float:
    from valle_cli.config import load_config
    from valle_cli.infer.engine import SamplingConfig, generate
    from valle_cli.model.valle import VALLE

    torch.manual_seed(0)
    model = VALLE(load_config(preset).model, n_symbols=623).eval()
    with torch.no_grad():
        model.heads[0].bias[model.stop_id] = -1e4
    phonemes = torch.tensor([1, *range(10, 60), 2])  # ~50 phonemes: a sentence
    prompt = torch.randint(0, 1024, (8, prompt_frames))
    t0 = time.perf_counter()
    out = generate(
        model, phonemes, prompt, sampling=SamplingConfig(ar_temp=0.0, max_ar_steps=steps), use_cache=cache
    )
    assert out.ar_steps == steps
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", default="tiny,small,base")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--prompt-seconds", type=float, default=3.0)
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    frames = int(args.prompt_seconds * 75)
    rows = []
    for preset in args.presets.split(","):
        cached = measure(preset, args.steps, frames, True)
        full = measure(preset, args.steps, frames, False)
        audio = args.steps / 75
        rows.append((preset, cached, full))
        print(
            f"{preset}: cached {cached:.2f} s, no cache {full:.2f} s ({full / cached:.1f}x); "
            f"RTF {cached / audio:.2f} vs {full / audio:.2f}",
            flush=True,
        )
    if args.write:
        device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
        lines = [
            f"Command: `{command('infer.py')}`  ",
            f"Machine: {platform.machine()}, {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"fp32. Random weights, STOP suppressed: {args.steps} AR steps ({args.steps / 75:.1f} s of audio) after "
            f"a {args.prompt_seconds:g} s prompt and ~50 phonemes, then 7 NAR passes. RTF = time / audio duration.",
            "",
            "| preset | with KV cache s | without cache s | speed-up | RTF cached | RTF uncached |",
            "|---|---|---|---|---|---|",
        ]
        for preset, cached, full in rows:
            audio = args.steps / 75
            lines.append(
                f"| {preset} | {cached:.2f} | {full:.2f} | {full / cached:.1f}x | {cached / audio:.2f} | "
                f"{full / audio:.2f} |"
            )
        write_section("AR decoding speed", lines)


if __name__ == "__main__":
    main()
