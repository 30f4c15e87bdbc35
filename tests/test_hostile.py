"""Faults as users meet them (issue 15): Ctrl-C from a real terminal, SIGTERM to the whole process group (what
`timeout`, systemd and Slurm send), and the exit status a shell script sees afterwards."""

from __future__ import annotations

import os
import pty
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from valle_cli.plot import read_metrics
from valle_cli.train.checkpoint import latest

HANG = 600  # seconds: only catches hangs, never a slow machine


def _valle(*args: str) -> list[str]:
    return [sys.executable, "-m", "valle_cli", *args]


def _train_args(dataset: Path, run: Path, *extra: str) -> list[str]:
    sets = [f"data.paths=[{dataset}]", "data.batch_size=2", "data.num_workers=1", "train.steps=100000",
            "train.save_every=100000", "train.eval_every=100000", *extra]  # fmt: skip
    return _valle("train", "tiny", "-o", str(run), *(a for s in sets for a in ("--set", s)))


def _train_steps(run: Path) -> list[int]:
    if not (run / "metrics.jsonl").is_file():
        return []
    return [
        r["step"] for r in read_metrics(run) if r.get("kind") == "train"
    ]  # a line being written is skipped


def _wait_for_steps(proc, run: Path, n: int) -> None:
    deadline = time.time() + HANG
    while len(_train_steps(run)) < n:
        assert proc.poll() is None, "training ended before it was interrupted"
        assert time.time() < deadline, "no training steps: hung?"
        time.sleep(0.2)


def _default_sigint() -> None:
    """In a child: SIGINT as a terminal's foreground program has it. A test run started in the background
    (`cmd &` in a script) passes SIGINT on ignored, and programs rightly keep ignoring it then."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_an_interrupted_verb_says_so_and_exits_with_the_signals_status(tiny_model, tmp_path, sig, code):
    """`valle synth ... ; echo $?` printed 0 and nothing after Ctrl-C: scripts went on as if it had worked."""
    lines = tmp_path / "lines.txt"
    lines.write_text(
        "A word or two.\n" * 2000
    )  # minutes of work for any model: it is interrupted long before
    proc = subprocess.Popen(
        _valle("synth", "--batch", str(lines), "--model", str(tiny_model), "-o", str(tmp_path / "out")),
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True, preexec_fn=_default_sigint,
    )  # fmt: skip
    try:
        deadline = time.time() + HANG
        while (
            _cpu_seconds(proc.pid) < 6
        ):  # past start-up, into the verb (the CPU time does not depend on load)
            assert proc.poll() is None, proc.communicate()[1]
            assert time.time() < deadline
            time.sleep(0.1)
        os.killpg(proc.pid, sig)
        _, err = proc.communicate(timeout=HANG)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == code, err
    assert f"interrupted ({sig.name})" in err and "Traceback" not in err
    assert len(list((tmp_path / "out").glob("*.wav"))) < 2000


def test_sigterm_to_the_process_group_saves_the_run_and_it_resumes(dataset, tmp_path):
    """Loader workers share the trainer's process group at first; a group SIGTERM used to kill them first and
    the trainer crashed ("DataLoader worker exited unexpectedly") without saving."""
    run = tmp_path / "run"
    proc = subprocess.Popen(
        _train_args(dataset, run), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True,
    )  # fmt: skip
    try:
        _wait_for_steps(proc, run, 3)
        os.killpg(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=HANG)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 143, out
    assert "interrupted (SIGTERM)" in out and "rerun the same command to resume" in out
    assert "Traceback" not in out and "worker" not in out.lower()
    saved = latest(run)
    assert saved is not None and saved.name == f"step-{max(_train_steps(run)):08d}"
    step = int(saved.name.split("-")[1])
    again = subprocess.run(
        _train_args(dataset, run, f"train.steps={step + 2}"), stdin=subprocess.DEVNULL, capture_output=True,
        text=True, timeout=HANG,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert f"resumed from {saved}" in again.stderr + again.stdout
    assert latest(run).name == f"step-{step + 2:08d}"


def test_training_in_a_terminal_runs_takes_commands_and_stops_on_ctrl_c(dataset, tmp_path):
    """README's `valle train` at a terminal: it deadlocked at step 0 (a forked loader worker inherited the lock
    of the stdin reader); tests ran with stdin from /dev/null and never saw it. Here stdin is a real
    pseudo-terminal that is the process's controlling terminal, and Ctrl-C is typed into it."""
    import fcntl
    import termios

    run = tmp_path / "run"
    master, slave = pty.openpty()

    def controlling_terminal() -> None:
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)
        _default_sigint()

    proc = subprocess.Popen(
        _train_args(dataset, run), stdin=slave, stdout=slave, stderr=slave, preexec_fn=controlling_terminal,
        env={**os.environ, "COLUMNS": "120"},
    )  # fmt: skip
    os.close(slave)
    screen: list[bytes] = []

    def read() -> None:
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:  # the terminal closed: the process and its children are gone
                return
            if not data:
                return
            screen.append(data)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        _wait_for_steps(proc, run, 2)
        os.write(master, b"status\n")
        deadline = time.time() + HANG
        while b"running: step" not in b"".join(screen):
            assert time.time() < deadline, b"".join(screen).decode(errors="replace")[-2000:]
            time.sleep(0.1)
        os.write(master, b"\x03")  # Ctrl-C: the terminal sends SIGINT to its foreground process group
        proc.wait(timeout=HANG)
    finally:
        if proc.poll() is None:
            proc.kill()
        reader.join(timeout=10)
        os.close(master)
    text = b"".join(screen).decode(errors="replace")
    assert proc.returncode == 130, text[-2000:]
    assert "interrupted (SIGINT)" in text and "Traceback" not in text
    assert latest(run).name == f"step-{max(_train_steps(run)):08d}"
