"""Speech on a busy machine: how `valle synth`'s generation slows when other processes take the cores.

Each configuration runs in a fresh process (OpenMP reads its settings once): it loads a model, generates one
sentence twice (the first is a warm-up) and reports the second's wall time and CPU time (user + system of
the process). Around it, `--busy N` processes spin on N cores. Configurations: torch intra-op threads (1 or 2)
(1, 2, or auto: what `valle synth` picks, one per core not busy, valle_cli/threads.py) and OpenMP's wait
policy (ACTIVE: idle threads spin; PASSIVE: they sleep). A fair result slows down at most
in proportion to the CPU the others take; CPU time that grows under load is threads spinning at barriers.

Usage:  python bench/contention.py [--model valle-default] [--busy 0,1,2] [--threads 1,2,auto] [--write]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from report import command, machine, write_section  # bench/ is on sys.path when run as a script

TEXT = "The quick brown fox jumps over the lazy dog, and then it runs away."

CHILD = """
import json, resource, sys, time, torch
if sys.argv[2] == "auto":
    from valle_cli import threads
    threads.apply()  # what valle synth does
else:
    torch.set_num_threads(int(sys.argv[2]))
from valle_cli.infer.load import load_model
from valle_cli.infer.synth import SynthOptions, synthesize
from valle_cli.infer.engine import SamplingConfig
loaded = load_model(sys.argv[1])
sc = SamplingConfig(ar_temp=0.0, seed=0)
def once():
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    out = synthesize(loaded, sys.argv[3], [], SynthOptions(), sc, "cpu")
    r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    return t1 - t0, cpu, len(out.audio) / out.sample_rate
once()
wall, cpu, audio = once()
print(json.dumps({"wall": wall, "cpu": cpu, "audio": audio}))
"""


def spin(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def run(model: str, threads: int, policy: str) -> dict:
    env = {**os.environ, "OMP_WAIT_POLICY": policy}
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, model, str(threads), TEXT], capture_output=True, text=True, env=env,
        timeout=1800,
    )  # fmt: skip
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="valle-default")
    ap.add_argument("--busy", default="0,1,2")
    ap.add_argument("--threads", default="1,2,auto")
    ap.add_argument("--policies", default="ACTIVE,PASSIVE")
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    rows = []
    for busy in [int(b) for b in args.busy.split(",")]:
        spinners = spin(busy)
        time.sleep(1.0)
        try:
            for threads in args.threads.split(","):
                for policy in args.policies.split(","):
                    r = run(args.model, threads, policy)
                    rows.append((busy, threads, policy, r))
                    print(f"busy {busy}, threads {threads}, {policy}: wall {r['wall']:.2f} s, cpu {r['cpu']:.2f} s, "
                          f"RTF {r['wall'] / r['audio']:.2f}", flush=True)  # fmt: skip
        finally:
            for p in spinners:
                p.kill()
    if not args.write:
        return
    idle = {(t, p): r for b, t, p, r in rows if b == 0}
    lines = [
        f"Command: `{command('contention.py')}`  ",
        machine()
        + f"fp32, model {args.model}, greedy, one sentence ({rows[0][3]['audio']:.1f} s of audio), the "
        "second of two generations in a fresh process per row; `busy` processes spin on that many cores.",
        "",
        "| busy cores | torch threads | OMP_WAIT_POLICY | wall s | CPU s | RTF | wall / idle wall |",
        "|---|---|---|---|---|---|---|",
    ]
    for busy, threads, policy, r in rows:
        base = idle.get((threads, policy))
        ratio = f"{r['wall'] / base['wall']:.2f}x" if base else "-"
        lines.append(
            f"| {busy} | {threads} | {policy} | {r['wall']:.2f} | {r['cpu']:.2f} | {r['wall'] / r['audio']:.2f} | {ratio} |"
        )
    lines += [
        "",
        "`auto` is what `valle synth`, `stt` and `serve` do (one thread per core that other programs leave free, "
        "counted when they start; `VALLE_THREADS=N` overrides). Torch's default, one spinning thread per core, "
        "collapses when another program takes a core; OpenMP's PASSIVE wait policy avoids that too but costs "
        "on an idle machine, so it is not set.",
    ]
    write_section("Speech on a busy machine", lines)


if __name__ == "__main__":
    main()
