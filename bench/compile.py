"""Does `valle synth --compile` pay off? torch.compile of the backbone vs eager, per backbone.

Random-weight small-preset models, STOP suppressed, greedy: `--steps` AR steps after a 3 s prompt and ~50
phonemes, then the 7 NAR passes. Reports eager time, the first compiled call (compilation included), a later
compiled call, and whether the compiled model gave the same codes.

Usage:  python bench/compile.py [--preset small] [--backbones transformer,llama] [--steps 100] [--write]
"""

from __future__ import annotations

import argparse
import time

import torch
from report import command, write_section  # bench/ is on sys.path when run as a script


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--backbones", default="transformer,llama")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    from valle_cli.config import load_config
    from valle_cli.infer.engine import SamplingConfig, generate
    from valle_cli.model.valle import VALLE

    rows = []
    for backbone in args.backbones.split(","):
        torch.manual_seed(0)
        model = VALLE(load_config(args.preset, [f"model.backbone={backbone}"]).model, n_symbols=623).eval()
        with torch.no_grad():
            model.heads[0].bias[model.stop_id] = -1e4
        phonemes, prompt = torch.tensor([1, *range(10, 60), 2]), torch.randint(0, 1024, (8, 225))
        sampling = SamplingConfig(ar_temp=0.0, max_ar_steps=args.steps)

        def run(model=model, phonemes=phonemes, prompt=prompt, sampling=sampling):
            return generate(model, phonemes, prompt, sampling=sampling)

        run()
        eager_out, eager = timed(run)
        model.backbone.compile(dynamic=True)
        _, first = timed(run)
        out, later = timed(run)
        same = bool(torch.equal(out.codes, eager_out.codes))
        rows.append((backbone, eager, first, later, same))
        print(
            f"{backbone}: eager {eager:.2f} s, compiled first {first:.1f} s, then {later:.2f} s "
            f"({eager / later:.2f}x), same codes: {same}",
            flush=True,
        )
    if args.write:
        lines = [
            f"Command: `{command('compile.py')}`  ",
            f"{args.preset} preset, CPU, {torch.get_num_threads()} threads, {args.steps} AR steps + 7 NAR passes, greedy.",
            "",
            "| backbone | eager s | compiled, first call s | compiled, later calls s | speed-up | same codes |",
            "|---|---|---|---|---|---|",
            *(f"| {b} | {e:.2f} | {f:.1f} | {lt:.2f} | {e / lt:.2f}x | {s} |" for b, e, f, lt, s in rows),
            "",
            "Compilation costs tens of seconds once per process, so `--compile` pays off for long texts, "
            "`--batch` files and servers, not for one short sentence.",
        ]
        write_section("torch.compile", lines)


if __name__ == "__main__":
    main()
