"""Inference threads: one per core other programs leave free (valle_cli/threads.py), with the user's say."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from valle_cli import threads


def test_one_thread_per_free_core_and_never_none():
    assert threads.choose(2, busy=0) == 2
    assert threads.choose(2, busy=1) == 1
    assert threads.choose(2, busy=5) == 1
    assert threads.choose(8, busy=2.4) == 6
    assert threads.choose(4, busy=0.6) == 3


def test_a_busy_process_is_counted():
    """A process spinning on a core shows up in the instantaneous count at once (no 1-minute lag)."""
    before = threads.busy_cores()
    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        during = threads.busy_cores(samples=9)
    finally:
        spin.kill()
    assert during >= min(before, 8) + 0.5 or during >= 1, (before, during)


@pytest.mark.parametrize(("env", "want"), [({"VALLE_THREADS": "1"}, 1), ({"OMP_NUM_THREADS": "1"}, 1)])
def test_the_user_decides_when_they_say(env, want):
    code = "from valle_cli import threads; import torch; print(threads.apply(), torch.get_num_threads())"
    clean = {k: v for k, v in os.environ.items() if k not in ("VALLE_THREADS", "OMP_NUM_THREADS")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**clean, **env},
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [str(want), str(want)]


def test_the_server_reads_the_free_cores_before_every_job_on_its_worker():
    import asyncio
    import threading

    from valle_cli.serve.jobs import JobQueue

    seen = []
    queue = JobQueue(size=2, timeout=60, before_job=lambda: seen.append(threading.current_thread().name))

    async def two_jobs():
        a = await queue.run(lambda job: threading.current_thread().name)
        b = await queue.run(lambda job: threading.current_thread().name)
        return a, b

    a, b = asyncio.run(two_jobs())
    assert seen == [a, b] and a.startswith("valle-generate")
    import torch

    before = torch.get_num_threads()
    try:
        n = threads.per_job()
        assert 1 <= n <= threads.cores() and torch.get_num_threads() == n
    finally:
        torch.set_num_threads(before)
