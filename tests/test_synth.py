"""`valle synth` with a model trained here (the try-me model): memorized text comes back at its length, lines
join into one file, bad input gets one clear line."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from .conftest import needs_espeak

pytestmark = needs_espeak
TEXT = "The little boat sailed across the calm blue water."


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from valle_cli.train.tryme import try_me

    out = tmp_path_factory.mktemp("tryme")
    report = try_me(out, TEXT, steps=400)
    assert min(report.level_match) > 0.95
    return out, report


def synth(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "valle_cli.cli.app", "synth", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "COLUMNS": "200"},
        stdin=subprocess.DEVNULL,
    )


def test_synth_speaks_the_memorized_sentence(trained, tmp_path):
    out, report = trained
    ref = out / "voices" / "try-me" / "speaker" / "utterance.wav"
    wav_path = tmp_path / "a.wav"
    proc = synth(TEXT, "--ref", str(ref), "--model", str(out / "run"), "--ar-temp", "0", "-o", str(wav_path))
    assert proc.returncode == 0, proc.stderr
    wav, sr = sf.read(wav_path)
    assert sr == 24_000 and abs(len(wav) / sr - report.frames / 75) < 0.05  # the utterance's own length
    assert "hit --max-ar-steps" not in proc.stderr
    two = tmp_path / "two.wav"
    proc = synth(
        f"{TEXT}\n\n{TEXT}", "--ref", str(ref), "--model", str(out / "run"), "--ar-temp", "0", "-o", str(two)
    )
    assert proc.returncode == 0, proc.stderr
    both, _ = sf.read(two)
    assert "2 line(s)" in proc.stderr
    assert abs(len(both) - (2 * len(wav) + 0.25 * sr)) < 10  # both lines and one gap, in one file
    np.testing.assert_allclose(both[: len(wav)], wav, atol=1e-3)


@pytest.mark.parametrize(
    "args, message",
    [
        (["   ", "--ref", "REF"], "the text is empty"),
        (["Bonjour", "-l", "fr", "--ref", "REF"], "not trained on language 'fr'"),
        (["Hello"], "no reference audio given"),
        (["Hello", "--ref", "SHORT"], "at least 1 s is needed"),
        (["Hello", "--ref", "REF", "-o", "/no/such/folder/x.wav"], "does not exist"),
        (["Hello", "--ref", "/no/such.wav"], "does not exist"),
    ],
)
def test_bad_input_is_one_clear_line(trained, tmp_path, args, message):
    out, _ = trained
    ref = out / "voices" / "try-me" / "speaker" / "utterance.wav"
    short = tmp_path / "short.wav"
    sf.write(short, (np.sin(np.arange(6000) / 10) * 0.3).astype("float32"), 24_000)
    args = [str(ref) if a == "REF" else str(short) if a == "SHORT" else a for a in args]
    if "-o" not in args:
        args += ["-o", str(tmp_path / "o.wav")]
    proc = synth(*args, "--model", str(out / "run"))
    assert proc.returncode == 1, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
