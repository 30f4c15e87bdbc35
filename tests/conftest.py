"""Shared fixtures. Tests are offline and CPU-only and make all their audio themselves."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub from a test
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed")


def default_sigint() -> None:
    """In a child (preexec_fn): SIGINT as a terminal's foreground program has it. A test run started in the
    background (`cmd &` in a script) passes SIGINT on ignored, and programs rightly keep ignoring it then."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def cpu_seconds(pid: int) -> float:
    """CPU time a process has used: how far it got, whatever the machine's load."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of a process group. A zombie is not running: some container init
    processes never reap, and multiprocessing's resource tracker is never waited for."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            out.append(int(stat.parent.name))
    return out


def _has_mbrola(voice: str) -> bool:
    from valle_cli.audio.speech import mbrola_voices

    return voice in mbrola_voices()


@pytest.fixture(scope="session", autouse=True)
def _torch_threads():
    try:
        import torch

        torch.set_num_threads(2)
    except ImportError:
        pass


@pytest.fixture(scope="session")
def speech_24k():
    """A few seconds of espeak-ng speech at 24 kHz, with its text."""
    from valle_cli.audio.io import resample
    from valle_cli.audio.speech import say

    text = "The little boat sailed across the calm blue water."
    wav, sr = say(text, "espeak:en-us")
    return resample(wav, sr, 24_000), text


@pytest.fixture(scope="session")
def natural_speech():
    """Piper (or, without piper, mbrola/espeak) speech at its native rate: (wav, sr, text)."""
    from valle_cli.audio.speech import piper_available, say

    text = "Please bring me a cup of hot tea with milk."
    voice = "piper:joe" if piper_available() else ("mbrola:us1" if _has_mbrola("us1") else "espeak:en-us")
    wav, sr = say(text, voice)
    return wav.astype(np.float32), sr, text


@pytest.fixture(scope="session")
def dataset(tmp_path_factory):
    """A small two-speaker dataset prepared with the offline codec (training and control tests)."""
    import soundfile as sf

    from valle_cli.audio.speech import say
    from valle_cli.config import CodecConfig
    from valle_cli.prepare.pipeline import PrepareOptions, prepare

    from .corpus import SENTENCES

    root = tmp_path_factory.mktemp("train")
    for spk, voice in (("ann", "espeak:en-us+f3"), ("bo", "espeak:en-gb+m3")):
        folder = root / "voices" / "g" / spk
        folder.mkdir(parents=True)
        for i, text in enumerate(SENTENCES):
            wav, sr = say(text, voice, speed=170)
            sf.write(folder / f"{i}.wav", wav, sr)
            (folder / f"{i}.txt").write_text(text)
    out = root / "ds"
    prepare(
        PrepareOptions(
            voices=root / "voices", output=out, codec=CodecConfig(name="mel"), device="cpu", workers=1
        )
    )
    return out


@pytest.fixture(scope="session")
def pocketsphinx_site(tmp_path_factory):
    """plugins/valle-pocketsphinx installed for real (pip --target, no dependencies: pocketsphinx is in the dev
    extra) into a folder to put on PYTHONPATH; the test virtualenv itself is not changed."""
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("pocketsphinx")
    target = tmp_path_factory.mktemp("site")
    plugin = Path(__file__).resolve().parents[1] / "plugins" / "valle-pocketsphinx"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target",
         str(target), str(plugin)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return target


@pytest.fixture(scope="session")
def tiny_model(dataset, tmp_path_factory):
    """A tiny model after 30 steps of speech and stt training on `dataset` (its output is noise, but real
    output of a real model: what the serve and eval tests need)."""
    from valle_cli.config import load_config
    from valle_cli.train.trainer import Trainer

    run = tmp_path_factory.mktemp("tiny-model") / "run"
    cfg = load_config(
        "tiny",
        [f"data.paths=[{dataset}]", "data.batch_size=2", "train.steps=30", "train.stt_prob=0.5",
         "train.eval_every=100000", "train.save_every=100000"],
    )  # fmt: skip
    Trainer(cfg, run).train()
    return run


def valle_cli(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """`valle ARGS` in a fresh interpreter, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "valle_cli.cli.app", *args], capture_output=True, text=True, timeout=timeout
    )


def train_and_export(dataset, tmp_path, *sets: str) -> tuple:
    """`valle train tiny` on `dataset` for 3 steps with `--set`s, then `valle export`: (run folder, model file)."""
    run = tmp_path / "run"
    base = [f"data.paths=[{dataset}]", "data.batch_size=2", "data.val_fraction=0.2", "train.steps=3",
            "train.warmup_steps=1", f"train.out_dir={run}"]  # fmt: skip
    proc = valle_cli("train", "tiny", *[x for s in (*base, *sets) for x in ("--set", s)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "m.safetensors"
    proc = valle_cli("export", str(run), "-o", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run, out
