"""How many threads inference uses: the cores other programs leave free.

torch's default is one intra-op thread per core, with OpenMP threads that spin while they wait. On a busy
machine that is the worst choice: with one of two cores taken by another program, two spinning threads made
generation 3.2x slower and burnt 2.4x the CPU, while one thread lost nothing (docs/benchmarks.md, "Speech on a
busy machine"). So `valle synth`, `stt` and `serve` count the runnable tasks of the machine when they start
(`/proc/loadavg`'s instantaneous count, sampled a few times; the 1-minute load average elsewhere) and use one
thread per core that is not busy, at least one; `valle serve` reads it again before every job (`per_job`).
`VALLE_THREADS=N` (or torch's `OMP_NUM_THREADS`) decides instead.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path


def cores() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def busy_cores(samples: int = 5, interval: float = 0.02) -> float:
    """Other programs' runnable tasks now (ours excluded): the median of a few reads of /proc/loadavg's
    running count, or the 1-minute load average where there is no /proc."""
    path = Path("/proc/loadavg")
    counts = []
    for k in range(samples):
        try:
            running = int(path.read_text().split()[3].split("/")[0])
        except (OSError, ValueError, IndexError):
            return max(0.0, os.getloadavg()[0] - 1) if hasattr(os, "getloadavg") else 0.0
        counts.append(running - 1)  # this process is running while it reads
        if k + 1 < samples:
            time.sleep(interval)
    return max(0.0, statistics.median(counts))


def choose(n_cores: int | None = None, busy: float | None = None) -> int:
    """Threads for inference: one per core that is not busy, at least one."""
    n = n_cores or cores()
    taken = busy_cores() if busy is None else busy
    return max(1, min(n, int(n - taken + 0.5)))


def per_job() -> int:
    """`apply` for a server's worker before each job: the free cores now (three quick reads, about 10 ms)."""
    return apply(samples=3, interval=0.005)


def apply(samples: int = 5, interval: float = 0.02) -> int:
    """Set torch's intra-op threads for an inference command (see the module); returns how many."""
    import torch

    if os.environ.get("VALLE_THREADS", "").strip():
        n = int(os.environ["VALLE_THREADS"])
        if n < 1:
            raise ValueError(f"VALLE_THREADS must be a positive number, got {n}")
    elif os.environ.get("OMP_NUM_THREADS", "").strip():
        return torch.get_num_threads()
    else:
        n = choose(busy=busy_cores(samples, interval))
    if n != torch.get_num_threads():
        torch.set_num_threads(n)
    return n
