"""Faults as users meet them (issue 15): Ctrl-C from a real terminal, SIGTERM to the whole process group (what
`timeout`, systemd and Slurm send), and the exit status a shell script sees afterwards."""

from __future__ import annotations

import json
import os
import pty
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from valle_cli.plot import read_metrics
from valle_cli.train.checkpoint import latest

from .conftest import cpu_seconds, default_sigint

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
        start_new_session=True, preexec_fn=default_sigint,
    )  # fmt: skip
    try:
        deadline = time.time() + HANG
        while (
            cpu_seconds(proc.pid) < 6
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
        default_sigint()

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


# -- hours of audio ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_hours(tmp_path_factory, speech_24k) -> Path:
    """A 2-hour FLAC (a sentence of speech, then silence: a few hundred KB on disk, 170 M samples decoded)."""
    import soundfile as sf

    wav, _ = speech_24k
    path = tmp_path_factory.mktemp("long") / "two-hours.flac"
    block = np.zeros(24_000 * 600, dtype=np.float32)
    with sf.SoundFile(path, "w", 24_000, 1, format="FLAC") as f:
        f.write(wav)
        for _ in range(12):
            f.write(block)
    return path


class _CountingRead:
    """soundfile.read, remembering the most frames any call returned."""

    def __init__(self, monkeypatch):
        import soundfile as sf

        self.most, real = 0, sf.read

        def read(*args, **kw):
            data, sr = real(*args, **kw)
            self.most = max(self.most, len(data))
            return data, sr

        monkeypatch.setattr(sf, "read", read)


def test_hours_of_audio_are_read_in_bounded_pieces_or_refused(two_hours, tiny_model, tmp_path, monkeypatch):
    """A 2-hour file: a prompt reads its first seconds, a span reads the span, limits refuse it from the
    header (no decoding), and `valle stt` names its limit before loading the model's work."""
    from valle_cli.audio.io import audio_seconds, load_audio
    from valle_cli.errors import AudioError

    assert audio_seconds(two_hours) == pytest.approx(7200 + 2.9, abs=1)
    reads = _CountingRead(monkeypatch)
    assert load_audio(two_hours, 16_000, end=3.0).size == 48_000
    assert load_audio(two_hours, 16_000, start=3600.0, end=3602.0, allow_silent=True).size == 32_000
    with pytest.raises(AudioError, match=r"is 2:00:0\d long; at most 30.0 s is read here") as info:
        load_audio(two_hours, 16_000, max_duration=(30.0, "cut it"))
    assert info.value.remedy == "cut it"
    assert reads.most <= 3 * 24_000  # nothing but the pieces asked for was decoded

    from valle_cli.infer.load import load_model
    from valle_cli.infer.synth import SynthOptions, synthesize

    out = synthesize(load_model(tiny_model), "Hello there.", [two_hours], SynthOptions(split_sentences=False))
    assert out.audio.size > 0 and reads.most <= 10 * 24_000  # the prompt's seconds, not two hours

    proc = subprocess.run(_valle("stt", str(two_hours), "--model", str(tiny_model), "--device", "cpu"),
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 1 and "transcribes at most" in proc.stderr and "sox" in proc.stderr, proc.stderr


def test_prepare_skips_an_hours_long_file_without_decoding_it(two_hours, tmp_path, monkeypatch):
    from valle_cli.prepare.discover import Source
    from valle_cli.prepare.pipeline import Job, _load

    src = Source(two_hours, "g", "s", "g/s/long", "Hello.", "sidecar", "en")
    reads = _CountingRead(monkeypatch)
    item = _load(Job(src, src.uid, src.text), 24_000, 0.5, 20.0)
    assert item.wav is None and "outside the duration range" in item.reason and reads.most == 0
    span = _load(Job(src, src.uid + "__000", "The little boat.", 0.0, 2.9), 24_000, 0.5, 20.0)
    assert span.wav is not None and span.wav.size == pytest.approx(2.9 * 24_000, abs=2)


def test_long_recordings_are_transcribed_in_windows_without_cutting_an_utterance(tmp_path):
    """`transcribe_file` on a 25-minute recording with 10-minute windows: every window is at most 10 minutes,
    segments come back in file time, none is cut at a window's edge, none is repeated."""
    import soundfile as sf

    from valle_cli.prepare.pipeline import transcribe_file

    sr = 16_000
    bursts = [(t, t + 4.0) for t in np.arange(5.0, 1500.0, 37.0)]  # 4 s of tone every 37 s
    path = tmp_path / "long.flac"
    wav = np.zeros(1500 * sr, dtype=np.float32)
    tone = (0.3 * np.sin(2 * np.pi * 220 * np.arange(4 * sr) / sr)).astype(np.float32)
    for a, _ in bursts:
        wav[int(a * sr) : int(a * sr) + len(tone)] = tone
    sf.write(path, wav, sr, format="FLAC")

    class Energy:
        """A real (if simple) transcriber: one segment per stretch of sound, named by where it starts."""

        def __init__(self):
            self.windows: list[float] = []

        def transcribe(self, w, rate, language):
            self.windows.append(len(w) / rate)
            hop = rate // 100  # 10 ms frames: loud where a frame's peak is
            frames = np.abs(w[: len(w) // hop * hop]).reshape(-1, hop).max(1)
            loud = frames > 0.05
            edges = np.flatnonzero(np.diff(np.concatenate([[0], loud.astype(np.int8), [0]])))
            return [
                type("Seg", (), {"start": a * hop / rate, "end": b * hop / rate, "text": "burst"})
                for a, b in zip(edges[::2], edges[1::2], strict=True)
            ]

    t = Energy()
    segs = transcribe_file(t, path, "en", window=600.0, margin=30.0)
    assert max(t.windows) <= 600.0 + 1e-6 and len(t.windows) >= 3
    assert len(segs) == len(bursts)
    for seg, (a, b) in zip(segs, bursts, strict=True):
        assert seg["start"] == pytest.approx(a, abs=0.01) and seg["end"] == pytest.approx(b, abs=0.01)


def _disk_full_cfg(dataset: Path, steps: int):
    from valle_cli.config import load_config

    return load_config(
        "tiny",
        [f"data.paths=[{dataset}]", "data.batch_size=2", "data.num_workers=0", f"train.steps={steps}",
         "train.save_every=2", "train.eval_every=100000", "train.keep_last=2"],
    )  # fmt: skip


@pytest.mark.parametrize("writer", ["torch.save", "safetensors"])
def test_a_full_disk_mid_save_is_one_line_keeps_the_last_checkpoint_and_the_rerun_resumes(
    dataset, tmp_path, monkeypatch, writer
):
    """Fault injection at the libraries' own writers, with the exceptions they raise on a full disk (measured
    on a 1 MB tmpfs): torch.save's zip writer a RuntimeError, safetensors a SafetensorError; neither is an
    OSError. The half-written file is really there when the error comes."""
    import safetensors.torch
    import torch

    from valle_cli.train.checkpoint import CheckpointError
    from valle_cli.train.trainer import Trainer

    run = tmp_path / "run"
    real_torch_save, real_save_file = torch.save, safetensors.torch.save_file

    def full_torch_save(obj, f, *a, **k):
        if "step-00000004" in str(f):
            Path(f).write_bytes(b"PK\x03\x04" + b"\0" * 4096)
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
        return real_torch_save(obj, f, *a, **k)

    def full_save_file(tensors, filename, metadata=None):
        if "step-00000004" in str(filename):
            Path(filename).write_bytes(b"\0" * 4096)
            raise safetensors.SafetensorError(
                "Error while serializing: I/O error: No space left on device (os error 28)"
            )
        return real_save_file(tensors, filename, metadata=metadata)

    if writer == "torch.save":
        monkeypatch.setattr(torch, "save", full_torch_save)
    else:
        monkeypatch.setattr(safetensors.torch, "save_file", full_save_file)
    with pytest.raises(CheckpointError) as caught:
        Trainer(_disk_full_cfg(dataset, 6), run).train()
    message = str(caught.value)
    said = "No space left on device" if writer == "safetensors" else "a short write (is the disk full?)"
    assert said in message and "MB free" in message and str(run) in message
    assert "a checkpoint takes" in message  # the space the user has to free
    assert "previous checkpoint is intact" in message and "\n" not in message
    assert "rerun the same command" in caught.value.remedy and caught.value.remedy not in caught.value.message
    assert not list(run.glob(".*.tmp")) and latest(run).name == "step-00000002"
    assert [r["step"] for r in read_metrics(run) if r.get("kind") == "train"] == [1, 2, 3, 4]
    with open(run / "metrics.jsonl", "a") as f:  # and a write cut short by the same full disk
        f.write('{"loss": 1.2, "step": 5, "ki')
    monkeypatch.undo()
    info = Trainer(_disk_full_cfg(dataset, 6), run).train()
    assert info.resumed_from.name == "step-00000002" and latest(run).name == "step-00000006"
    lines = (run / "metrics.jsonl").read_text().splitlines()
    steps = [r["step"] for r in map(json.loads, lines) if r.get("kind") == "train"]
    assert steps == [1, 2, 3, 4, 5, 6]  # steps 3-4 trained again, recorded once; the torn line gone


def test_a_killed_save_leaves_no_staging_folder_to_fill_the_disk(dataset, tmp_path):
    from valle_cli.train.checkpoint import staging_dir
    from valle_cli.train.trainer import Trainer

    run = tmp_path / "run"
    Trainer(_disk_full_cfg(dataset, 2), run).train()
    stale = staging_dir(run, 4)  # what a save killed halfway leaves
    stale.mkdir()
    (stale / "optimizer.pt").write_bytes(b"\0" * 100_000)
    Trainer(_disk_full_cfg(dataset, 4), run).train()
    assert not stale.exists() and latest(run).name == "step-00000004"


def _mount_tmpfs(folder: Path, size: int) -> bool:
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return False
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                          capture_output=True, timeout=60)  # fmt: skip
    return proc.returncode == 0


def test_training_on_a_really_full_disk(dataset, tmp_path):
    """A real full disk: a tmpfs with room for one checkpoint and a half. The second save cannot fit (the old
    checkpoint is pruned only after the new one is in place)."""
    probe = tmp_path / "probe"
    subprocess.run(_train_args(dataset, probe, "train.steps=1", "train.save_every=1"), check=True,
                   stdin=subprocess.DEVNULL, capture_output=True, timeout=HANG)  # fmt: skip
    one = sum(f.stat().st_size for f in latest(probe).rglob("*") if f.is_file())
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, int(one * 1.5) + 200_000):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        run = disk / "run"
        args = _train_args(dataset, run, "train.steps=4", "train.save_every=2", "train.keep_last=1")
        full = subprocess.run(args, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=HANG)
        assert full.returncode != 0
        err = full.stderr.strip().splitlines()
        said = [line for line in err if "No space left on device" in line]
        assert said and "MB free" in said[0] and "a checkpoint takes" in said[0], full.stderr[-3000:]
        assert "Traceback" not in full.stderr and "unexpected" not in full.stderr
        assert latest(run).name == "step-00000002" and not list(run.glob(".*.tmp"))
        subprocess.run(["mount", "-o", f"remount,size={one * 4}", str(disk)], check=True, timeout=60)
        again = subprocess.run(args, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=HANG)
        assert again.returncode == 0, again.stderr[-3000:]
        assert latest(run).name == "step-00000004"
        steps = [r["step"] for r in read_metrics(run) if r.get("kind") == "train"]
        assert steps == [1, 2, 3, 4]
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True, timeout=60)


def test_a_voice_upload_on_a_really_full_disk(tmp_path, caplog):
    """A server's voices on a tmpfs with room for the upload (16 kHz) but not for the stored voice (24 kHz),
    then for neither: the client gets a 507 that names no path, nothing is left behind, and once there is room
    the same upload works."""
    import io

    import soundfile as sf

    from valle_cli.serve.voices import VoiceError, VoiceStore

    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, 80 * 1024):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        store = VoiceStore(disk / "voices", disk / "tmp", max_seconds=30, max_voices=10)
        rng = np.random.default_rng(0)

        def clip(seconds: float) -> bytes:
            t = np.arange(int(seconds * 16000)) / 16000
            wav = 0.3 * np.sin(2 * np.pi * 180 * t) * (1 + 0.3 * rng.standard_normal(len(t)))
            buf = io.BytesIO()
            sf.write(buf, wav.astype(np.float32), 16000, format="WAV", subtype="PCM_16")
            return buf.getvalue()

        for data in (
            clip(2.0),
            clip(5.0),
        ):  # 64 KB fits, its 96 KB voice does not; 160 KB does not fit at all
            with pytest.raises(VoiceError) as e, caplog.at_level("ERROR", logger="valle.serve"):
                store.add("alice", data)
            assert (
                e.value.status == 507 and "disk is full" in e.value.message and str(disk) not in str(e.value)
            )
            said = caplog.text  # the operator's side: the path and the reason
            assert "could not store" in said and ("No space left" in said or "is the disk full?" in said), (
                said
            )
            assert not list((disk / "voices").iterdir()) and not list((disk / "tmp").iterdir())
            assert store.list() == []
        subprocess.run(["mount", "-o", "remount,size=2m", str(disk)], check=True, timeout=60)
        assert store.add("alice", clip(2.0)).name == "alice" and [v.name for v in store.list()] == ["alice"]
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True, timeout=60)


def test_synth_onto_a_really_full_disk_says_so_and_leaves_nothing(tmp_path):
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, 16 * 1024):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        out = disk / "out.wav"
        proc = subprocess.run([sys.executable, "-m", "valle_cli", "synth", "A sentence for a full disk, said slowly.",
                               "-o", str(out), "--seed", "1"], capture_output=True, text=True, timeout=HANG)  # fmt: skip
        assert proc.returncode != 0
        assert "is the disk full?" in proc.stderr and "MB free" in proc.stderr, proc.stderr[-2000:]
        assert "unexpected" not in proc.stderr and "Traceback" not in proc.stderr
        assert not list(disk.iterdir())
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True, timeout=60)
