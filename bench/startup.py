"""Where `valle synth` spends its time before and after the generation: one sentence with the shipped model in
a fresh process, timed at every line it prints (the first says which model; the next comes once the model is
loaded; the last reports the generation's own time), then to its exit; and the heaviest imports of loading
the model (`python -X importtime`).

Usage:  python bench/startup.py [--runs 3] [--write]
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from report import command, machine, write_section  # bench/ is on sys.path when run as a script

TEXT = "The birch canoe slid on the smooth planks."


def one_run(out: Path) -> dict:
    valle = Path(sys.executable).with_name("valle")
    t0 = time.perf_counter()
    proc = subprocess.Popen([str(valle), "synth", TEXT, "-o", str(out), "--seed", "1"], stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True)  # fmt: skip
    marks = []
    for line in proc.stderr:
        if line.strip():
            marks.append((time.perf_counter() - t0, line.strip()))
    proc.wait()
    end = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"valle synth failed:\n{marks}")
    generation = float(re.search(r"audio in ([\d.]+) s", marks[-1][1]).group(1))
    return {
        "first": marks[0][0],
        "loaded": marks[1][0],
        "report": marks[-1][0],
        "exit": end,
        "gen": generation,
    }


def heavy_imports(n: int = 6) -> list[tuple[float, str]]:
    """The top-level packages whose import (with what they import) costs the most while loading the model."""
    code = "from valle_cli.infer.load import default_model, load_model; load_model(default_model()[0])"
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True, check=True
    )
    costs: dict[str, float] = {}
    for line in proc.stderr.splitlines():
        m = re.match(r"import time:\s+\d+ \|\s+(\d+) \| (\s*)(\S+)", line)
        if m and len(m.group(2)) <= 1:  # top level (with its own imports)
            name = m.group(3).split(".")[0]
            costs[name] = costs.get(name, 0.0) + int(m.group(1)) / 1e6
    return [(s, k) for s, k in sorted(((s, k) for k, s in costs.items()), reverse=True)[:n] if s >= 0.05]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        one_run(Path(tmp) / "warm.wav")  # the page cache and Python's bytecode cache
        runs = [one_run(Path(tmp) / f"{i}.wav") for i in range(args.runs)]
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    imports = heavy_imports()
    for k, v in med.items():
        print(f"{k}: {v:.2f} s")
    for s, k in imports:
        print(f"import {k}: {s:.2f} s")
    if args.write:
        lines = [
            f"Command: `{command('startup.py')}`  ",
            machine()
            + f'`valle synth "{TEXT}" -o out.wav --seed 1` with the shipped model, a fresh process, '
            f"random voice; medians of {args.runs} after a warm-up run.",
            "",
            "| first line (which model) | model loaded (next line) | generation (as reported) | report line | exit |",
            "|---|---|---|---|---|",
            f"| {med['first']:.2f} s | {med['loaded']:.2f} s | {med['gen']:.2f} s | {med['report']:.2f} s | "
            f"{med['exit']:.2f} s |",
            "",
            "Heaviest imports while loading the model (`python -X importtime`, cumulative, top-level packages): "
            + ", ".join(f"{k} {s:.2f} s" for s, k in imports)
            + " (valle_cli's own includes torch).",
            "",
            "Before the first line: Python, torch and the CLI. Between it and the next: transformers' llama "
            "modules (imported by the backbone) and the model. After the report: writing the file and the "
            "interpreter's shutdown. `valle serve` pays all of it once; a backbone that does not import "
            "transformers at inference would save the largest part.",
        ]
        write_section("Startup: valle synth", lines)


if __name__ == "__main__":
    main()
