"""Which training method makes the AR read its text soonest: short runs compared by the text gap.

Every method trains the default model's recipe (recipes/default-model/config.yaml) on the same prepared
dataset from scratch, with an evaluation every `--eval-every` steps, and is stopped (the live `quit`
command on stdin) after the evaluation at `--steps`. The text gap is the held-out level-0 loss with other
utterances' transcripts minus the loss with the right ones (train/trainer.py): 0 means the model ignores its
text. Runs resume: a method whose run folder already holds the evaluation at `--steps` is only read. Each
run also leaves its alignment plots in RUN/alignment/.

Usage:  python bench/alignment.py --dataset DIR [--work DIR] [--steps 450] [--eval-every 150]
                                  [--methods classic,pointer,...] [--write]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

from report import ROOT, command, write_section  # bench/ is on sys.path when run as a script

METHODS = {  # name -> (overrides, what it is); the recipe itself now trains a pointer model with an AR-first phase
    "classic": (
        ["model.alignment=none", "train.ar_only_steps=0"],
        "VALL-E as published: the text only in the prefix, attention must find its place",
    ),
    "classic-drop": (
        ["model.alignment=none", "train.ar_only_steps=0", "train.input_dropout=0.5"],
        "classic + level-0 input dropout 0.5 (Tacotron's prenet)",
    ),
    "guided-drop": (
        [
            "model.alignment=none",
            "train.ar_only_steps=0",
            "train.input_dropout=0.5",
            "train.guided_attention=1.0",
        ],
        "classic + input dropout + guided-attention loss (DC-TTS, sigma 0.4, 2 heads x 2 middle layers)",
    ),
    "pointer": (
        ["model.alignment=pointer", "train.ar_only_steps=0"],
        "phoneme pointer (VALL-E R): each frame gets its symbol; levels drawn 3:1:...:1 from the start",
    ),
    "pointer-drop": (
        ["model.alignment=pointer", "train.ar_only_steps=0", "train.input_dropout=0.5"],
        "phoneme pointer + input dropout 0.5",
    ),
    "pointer-ar-only": (
        ["model.alignment=pointer", "train.level_weights=[1,0,0,0,0,0,0,0]"],
        "phoneme pointer, every sample trains level 0 (the first phase of `train.ar_only_steps`)",
    ),
    "pointer-nar0": (
        ["model.alignment=pointer", "model.level0=nar", "train.ar_only_steps=0"],
        "phoneme pointer with a parallel level 0 (masked passes over frames laid out by a duration head)",
    ),
}


def evals(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("kind") == "eval":
            out = [e for e in out if e["step"] < rec["step"]] + [rec]
    return out


def train(name: str, overrides: list[str], args) -> float:
    """Train until the evaluation at args.steps; returns the wall seconds of this call."""
    run = args.work / name
    cmd = [sys.executable, "-m", "valle_cli", "train", str(ROOT / "recipes" / "default-model" / "config.yaml"),
           "-o", str(run), "--set", f"data.paths=[{args.dataset}]", "--set", f"train.eval_every={args.eval_every}",
           "--set", f"train.save_every={args.eval_every}"]  # fmt: skip
    for o in overrides:
        cmd += ["--set", o]
    t0 = time.time()
    with open(args.work / f"{name}.log", "a") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT, text=True)
        try:
            while proc.poll() is None:
                if any(e["step"] >= args.steps for e in evals(run)):
                    proc.stdin.write("quit\n")  # the live command: it saves and stops
                    proc.stdin.flush()
                    proc.wait(timeout=600)
                    break
                time.sleep(5)
        finally:
            if proc.poll() is None:
                proc.terminate()
                proc.wait()
    if proc.returncode not in (0, None):
        raise SystemExit(f"{name}: valle train exited {proc.returncode}; see {args.work / f'{name}.log'}")
    return time.time() - t0


def seconds_per_step(run: Path, upto: int) -> float | None:
    """Median wall time between consecutive training records (evaluation time excluded)."""
    times = []
    last = None
    for line in (run / "metrics.jsonl").read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("kind") == "train" and rec["step"] <= upto:
            if last is not None and rec["step"] == last[0] + 1:
                times.append(rec["time"] - last[1])
            last = (rec["step"], rec["time"])
    times.sort()
    return times[len(times) // 2] if times else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--dataset", type=Path, required=True, help="A dataset made by recipes/default-model/run.sh."
    )
    ap.add_argument("--work", type=Path, default=Path.home() / "valle-bench-alignment", help="Run folders.")
    ap.add_argument("--steps", type=int, default=450)
    ap.add_argument("--eval-every", type=int, default=150)
    ap.add_argument(
        "--methods", default=",".join(METHODS), help=f"Comma-separated, of: {', '.join(METHODS)}."
    )
    ap.add_argument("--write", action="store_true", help="Write the section into docs/benchmarks.md.")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; known: {', '.join(METHODS)}")
    rows = []
    for name in names:
        run = args.work / name
        if not any(e["step"] >= args.steps for e in evals(run)):
            print(f"{name}: training to step {args.steps} ...", flush=True)
            train(name, METHODS[name][0], args)
        ev = {e["step"]: e for e in evals(run)}
        marks = [s for s in sorted(ev) if s <= args.steps]
        sps = seconds_per_step(run, args.steps)
        rows.append((name, marks, ev, sps))
        print(
            name,
            {s: round(ev[s].get("text_gap", float("nan")), 3) for s in marks},
            f"{sps:.2f} s/step" if sps else "",
        )
    marks = sorted({s for _, m, _, _ in rows for s in m})
    head = (
        "| method | s/step | "
        + " | ".join(f"gap @{s}" for s in marks)
        + f" | acc l0 @{args.steps} | pointer acc |"
    )
    body = [
        f"Command: `{command('alignment.py')}`  ",
        f"Machine: {platform.machine()}, {platform.processor() or 'cpu'}, 2 cores; the default model's recipe "
        f"(d 256, 6 layers, 10.8 M parameters; up to 3000 tokens per batch) on its 3.1 h corpus, from scratch. "
        "Text gap = held-out level-0 cross-entropy with other utterances' transcripts minus with the right "
        "ones (nats; 0 = the text is ignored). Same steps for every method; s/step is the median step time "
        "(methods differ by a few percent; the evaluations are excluded).",
        "",
        head,
        "|---|---|" + "---|" * len(marks) + "---|---|",
    ]
    for name, _, ev, sps in rows:
        cells = [f"{ev[s]['text_gap']:+.3f}" if s in ev and "text_gap" in ev[s] else "-" for s in marks]
        last = ev.get(args.steps) or ev[max(ev)]
        ptr = f"{last['acc.ptr']:.3f}" if "acc.ptr" in last else "-"
        body.append(
            f"| {name} | {sps or 0:.2f} | " + " | ".join(cells) + f" | {last['acc.l0']:.3f} | {ptr} |"
        )
    body += [
        "",
        *(f"- **{n}**: {METHODS[n][1]} (`{' '.join(METHODS[n][0]) or 'recipe as is'}`)" for n in names),
    ]
    print("\n".join(body))
    if args.write:
        write_section("Alignment methods: short runs", body)


if __name__ == "__main__":
    main()
