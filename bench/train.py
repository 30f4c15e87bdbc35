"""Training throughput: tokens/s and peak memory for the tiny, small and base presets, and 1 vs 2 DDP
processes, on this machine (CPU unless a GPU is present).

Builds a small dataset offline (espeak-ng voices, the offline mel codec), then runs `valle train` for a fixed
number of steps per configuration in a fresh process and reads tokens/s from the run's metrics.jsonl (the
mean over the steps after the first two, which include start-up) and the peak resident memory of the
process (of rank 0 under torchrun).

Usage:  python bench/train.py [--steps 12] [--presets tiny,small,base] [--write]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from report import command, write_section  # bench/ is on sys.path when run as a script


def make_dataset(root: Path) -> Path:
    import soundfile as sf

    from valle_cli.assets import sentences
    from valle_cli.audio.speech import say
    from valle_cli.config import CodecConfig
    from valle_cli.prepare.pipeline import PrepareOptions, prepare

    for spk, voice in (("a", "espeak:en-us+f3"), ("b", "espeak:en-gb+m3"), ("c", "espeak:en-us+m7")):
        folder = root / "voices" / "g" / spk
        folder.mkdir(parents=True)
        for i, text in enumerate(sentences("train")[:16]):
            wav, sr = say(text, voice)
            sf.write(folder / f"{i}.wav", wav, sr)
            (folder / f"{i}.txt").write_text(text)
    out = root / "ds"
    prepare(
        PrepareOptions(
            voices=root / "voices", output=out, codec=CodecConfig(name="mel"), device="cpu", workers=1
        )
    )
    return out


def run(cmd: list[str], run_dir: Path, env: dict) -> dict:
    wrapped = [
        sys.executable,
        "-c",
        "import resource, subprocess, sys; p = subprocess.run(sys.argv[1:]); "
        "print('MAXRSS', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
        "sys.exit(p.returncode)",
        *cmd,
    ]
    t0 = time.time()
    proc = subprocess.run(wrapped, capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r.get("kind") == "train"]
    steady = rows[2:] or rows
    dt = steady[-1]["time"] - steady[0]["time"] if len(steady) > 1 else 0
    tokens = steady[-1]["tokens"] - steady[0]["tokens"] if len(steady) > 1 else steady[0]["tokens"]
    rss = int(re.search(r"MAXRSS (\d+)", proc.stderr).group(1)) / 1024  # KiB -> MiB
    return {
        "tokens_per_s": tokens / dt if dt else float("nan"),
        "peak_rss_mb": rss,
        "wall_s": time.time() - t0,
        "steps": len(rows),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--presets", default="tiny,small,base")
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ds = make_dataset(Path(tmp))
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(os.cpu_count() or 1))}
        common = [
            "--set",
            f"data.paths=[{ds}]",
            "--set",
            f"train.steps={args.steps}",
            "--set",
            "data.batch_size=4",
            "--set",
            "train.eval_every=100000",
            "--set",
            "train.save_every=100000",
            "--set",
            "data.num_workers=0",
            "--set",
            "data.min_duration=0.5",
            "--set",
            "train.precision=fp32",
        ]
        for preset in args.presets.split(","):
            out = Path(tmp) / f"run-{preset}"
            r = run(
                [sys.executable, "-m", "valle_cli.cli.app", "train", preset, "-o", str(out), *common],
                out,
                env,
            )
            rows.append({"setup": f"{preset}, 1 process", **r})
            print(rows[-1], flush=True)
        for nproc in (1, 2):
            out = Path(tmp) / f"run-ddp{nproc}"
            threads = max(1, (os.cpu_count() or 2) // nproc)
            cmd = (
                [
                    sys.executable,
                    "-m",
                    "torch.distributed.run",
                    "--nproc-per-node",
                    str(nproc),
                    "--master-port",
                    "29555",
                    "-m",
                    "valle_cli.cli.app",
                    "train",
                    "small",
                    "-o",
                    str(out),
                    *common,
                    "--set",
                    "train.backend=ddp",
                ]
                if nproc > 1
                else [sys.executable, "-m", "valle_cli.cli.app", "train", "small", "-o", str(out), *common]
            )
            r = run(cmd, out, {**env, "OMP_NUM_THREADS": str(threads)})
            rows.append(
                {"setup": f"small, DDP {nproc} process{'es' if nproc > 1 else ''} x {threads} threads", **r}
            )
            print(rows[-1], flush=True)
    if args.write:
        write_figures(args, rows)


def write_figures(args, rows) -> None:
    import torch

    cmd = command("train.py")
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    lines = [
        f"Command: `{cmd}`  ",
        f"Machine: {platform.machine()}, {device}, torch {torch.__version__}. Offline mel codec, batches of 4 "
        f"utterances (2-4 s each, prompts 3-6 s), fp32, {args.steps} steps per row; tokens/s counts scored "
        "response tokens over the steps after the first two. Peak memory: the process's maximum resident set "
        "(rank 0's under torchrun).",
        "",
        "| setup | tokens/s | peak RSS MB | wall s |",
        "|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['setup']} | {r['tokens_per_s']:.0f} | {r['peak_rss_mb']:.0f} | {r['wall_s']:.0f} |"
        )
    write_section("Training throughput", lines)


if __name__ == "__main__":
    main()
