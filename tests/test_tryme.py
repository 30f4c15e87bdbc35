"""`valle train --try-me`: prepare + train + KV-cached synthesis on one utterance; the model must reproduce it."""

from __future__ import annotations

import os
import subprocess
import sys

import soundfile as sf

from .conftest import needs_espeak

HANG = 3600  # seconds: try-me runs a fixed number of steps; this only catches a hang, never a loaded machine


@needs_espeak
def test_try_me_memorizes_and_reproduces_the_utterance(tmp_path):
    out = tmp_path / "try"
    proc = subprocess.run(
        [sys.executable, "-m", "valle_cli.cli.app", "train", "--try-me", "-o", str(out)],
        capture_output=True,
        text=True,
        timeout=HANG,
        env={**os.environ, "COLUMNS": "200"},
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "stopped by itself" in proc.stderr
    line = next(x for x in proc.stderr.splitlines() if "per RVQ" in x)
    matches = [int(v.rstrip("%")) for v in line.split("level: ")[1].split()]
    assert len(matches) == 8 and min(matches) >= 95, line  # a model that learned reproduces the tokens
    wav, sr = sf.read(out / "try-me.wav")
    assert sr == 24_000 and len(wav) / sr > 1.5


def test_try_me_audio_needs_text(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "valle_cli.cli.app", "train", "--try-me", "--audio", str(tmp_path / "x.wav")],
        capture_output=True,
        text=True,
        timeout=HANG,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 1 and "--audio needs --text" in proc.stderr
