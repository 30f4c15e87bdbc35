"""NAR-len against the AR: the time to make RVQ level 0 as the response grows.

Random-weight models of one shape (default `small`, llama backbone), batch 1, greedy: the classic AR
(KV-cached, STOP suppressed so it runs exactly the asked number of frames) against the NAR-len model
(`model.level0: nar` without the pointer; its length head set to give the same number of frames) with
`--level0-steps` demasking passes. The AR's cost grows with every frame (one backbone step each, over a
growing cache); NAR-len's is a few passes over the whole sequence. Writes a figure and a table.

Usage:  python bench/nar_len.py [--preset small] [--seconds 1,2,4,8] [--level0-steps 8] [--write]
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
from report import ROOT, command, machine, write_section  # bench/ is on sys.path when run as a script

PHONEMES = torch.tensor([1, *range(10, 60), 2])  # ~50 phonemes
PROMPT_FRAMES = 225  # 3 s at 75 frames/s


def build(preset: str, nar: bool):
    from valle_cli.config import load_config
    from valle_cli.model.valle import VALLE

    torch.manual_seed(0)
    model = VALLE(load_config(preset, ["model.level0=nar"] if nar else []).model, n_symbols=623).eval()
    with torch.no_grad():
        model.heads[0].bias[model.stop_id] = -1e4  # the AR runs to the step limit
    return model


@torch.inference_mode()
def level0_seconds(model, frames: int, steps: int, repeats: int) -> float:
    """Median wall time of making level 0 for `frames` frames."""
    from valle_cli.infer.engine import Request, SamplingConfig, ar_tokens, nar_level0

    g = torch.Generator().manual_seed(0)
    req = Request(PHONEMES, torch.randint(0, 1024, (model.n_levels, PROMPT_FRAMES), generator=g))
    sc = SamplingConfig(ar_temp=0.0, max_ar_steps=frames, level0_steps=steps)
    if model.nar0:
        model.length_head.weight.zero_()
        model.length_head.bias.fill_(math.log1p(frames))
        run = lambda: nar_level0(model, [req], sc)  # noqa: E731
    else:
        run = lambda: sum(1 for _ in ar_tokens(model, [req], sc))  # noqa: E731
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--seconds", default="1,2,4,8")
    ap.add_argument("--level0-steps", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    seconds = [float(s) for s in args.seconds.split(",")]
    ar, nar = build(args.preset, False), build(args.preset, True)
    rows = []
    for sec in seconds:
        frames = int(sec * 75)
        a = level0_seconds(ar, frames, args.level0_steps, args.repeats)
        n = level0_seconds(nar, frames, args.level0_steps, args.repeats)
        rows.append((sec, frames, a, n))
        print(f"{sec:g} s ({frames} frames): AR {a:.2f} s, NAR-len {n:.2f} s ({a / n:.1f}x)", flush=True)
    if not args.write:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
    ax.plot([r[0] for r in rows], [r[2] for r in rows], "o-", label="AR (KV-cached, one step per frame)")
    ax.plot([r[0] for r in rows], [r[3] for r in rows], "s-", label=f"NAR-len ({args.level0_steps} passes)")
    ax.set_xlabel("audio made (s)")
    ax.set_ylabel("time to make level 0 (s)")
    ax.set_title(f"Level 0: AR vs NAR-len ({args.preset} shape, CPU, {torch.get_num_threads()} threads)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    figure = ROOT / "docs" / "nar-len-speed.png"
    fig.savefig(figure)
    print(f"wrote {figure}")
    lines = [
        f"Command: `{command('nar_len.py')}`  ",
        machine()
        + f"fp32, random weights, the `{args.preset}` shape, batch 1, greedy, ~50 phonemes and a 3 s prompt. "
        "Time to make RVQ level 0 only (the NAR levels and the codec cost the same for both). Medians of "
        f"{args.repeats}.",
        "",
        f"![level 0: AR vs NAR-len]({Path(figure).relative_to(ROOT / 'docs')})",
        "",
        "| audio | frames | AR s | NAR-len s | AR / NAR-len |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {sec:g} s | {frames} | {a:.2f} | {n:.2f} | {a / n:.1f}x |" for sec, frames, a, n in rows]
    lines += [
        "",
        "The AR pays one backbone step per frame; NAR-len pays its passes over the whole sequence (their cost "
        "grows with the length, but there are only a few). What NAR-len gives up is the AR's frame-by-frame "
        "conditioning; whether a NAR-len model speaks as well is a training question this table does not "
        "answer.",
    ]
    write_section("NAR-len against the AR: decode speed", lines)


if __name__ == "__main__":
    main()
