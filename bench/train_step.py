"""One training step (forward, backward, AdamW) per precision, on the shape of the original's comparison.

The side-by-side profile (research/performance.md) timed the original's training step on the small shape
(d 384, 6 layers) with a batch of 4 samples at 2.23 s, and valle's at 2.25 s (parity). The original cannot be
installed here (no internet), so this bench times valle's step in fp32 (the parity figure) and under bf16
autocast (`train.precision: bf16`, which now runs on CPUs with bf16 instructions) in the same process, in
interleaved rounds (the machine's speed drifts), on random weights and a fixed set of batches: 4 samples each
of 30-60 phonemes, a 3-6 s prompt and a 2-4 s response (8 levels, codebook 1024), levels drawn as training
draws them. Reports the median step per precision and the speed-up of each over fp32.

Usage:  python bench/train_step.py [--presets small] [--rounds 5] [--write]
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time

import torch
from report import command, write_section  # bench/ is on sys.path when run as a script

ORIGINAL = {"small": 2.23}  # research/performance.md: the original's step, seconds, on its measuring day


def batches(n: int, seed: int = 1) -> list:
    from valle_cli.model.valle import Sample

    g = torch.Generator().manual_seed(seed)

    def draw(lo: int, hi: int) -> int:
        return int(torch.randint(lo, hi, (1,), generator=g))

    out = []
    for _ in range(n):
        samples = []
        for _ in range(4):
            frames, prompt, text = draw(150, 300), draw(225, 450), draw(30, 60)
            samples.append(
                Sample(
                    torch.randint(3, 100, (text,), generator=g),
                    torch.randint(0, 1024, (8, prompt), generator=g),
                    torch.randint(0, 1024, (8, frames), generator=g),
                    draw(0, 8),
                    0,
                )
            )
        out.append(samples)
    return out


def step(model, opt, bf16: bool, batch) -> float:
    """One training step; its seconds."""
    t0 = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = model(batch)
    out.loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--presets", default="small")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()

    from valle_cli.config import load_config
    from valle_cli.model.valle import VALLE
    from valle_cli.train.trainer import cpu_has_bf16

    precisions = ["fp32", "bf16"] if cpu_has_bf16() else ["fp32"]
    rows = []
    for preset in args.presets.split(","):
        torch.manual_seed(0)
        cfg = load_config(preset, ["model.dropout=0.0"]).model
        base = VALLE(cfg, 100, 1024).train()
        models = {p: copy.deepcopy(base) for p in precisions}
        opts = {p: torch.optim.AdamW(m.parameters(), lr=1e-4) for p, m in models.items()}
        data = batches(args.rounds + 2)
        times: dict[str, list[float]] = {p: [] for p in precisions}

        for k, b in enumerate(data):
            for p in precisions:
                took = step(models[p], opts[p], p == "bf16", b)
                if k >= 2:  # the first two warm up
                    times[p].append(took)
        fp32 = statistics.median(times["fp32"])
        for p in precisions:
            med = statistics.median(times[p])
            orig = ORIGINAL.get(preset)
            rows.append(
                f"| {preset} | {p} | {med:.2f} | {fp32 / med:.2f}x | "
                + (f"{orig:.2f} s (valle fp32 then: 2.25 s) |" if orig else "- |")
            )
            print(rows[-1], flush=True)
    body = [
        f"Command: `{command('train_step.py')}`  ",
        f"Machine: {platform.machine()}, CPU ({torch.get_num_threads()} threads), torch {torch.__version__}. "
        "Random weights, batches of 4 samples (30-60 phonemes, 3-6 s prompts, 2-4 s responses, 8 levels), "
        f"forward + backward + AdamW, median of {args.rounds} interleaved rounds after 2 warm-up steps.",
        "",
        "| preset | precision | step s | vs fp32 | the original's step (another day) |",
        "|---|---|---|---|---|",
        *rows,
    ]
    print("\n".join(body))
    if args.write:
        write_section("Training step: precision", body)


if __name__ == "__main__":
    main()
