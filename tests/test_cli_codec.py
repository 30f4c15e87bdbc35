"""`valle codec fit / roundtrip / info` end to end, through the console entry point."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import soundfile as sf

from valle_cli.audio.speech import say


def valle(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "valle_cli.cli.app", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "COLUMNS": "200"},
    )


def test_roundtrip_say_writes_audio_of_the_same_length(tmp_path):
    out = tmp_path / "rt.wav"
    proc = valle("codec", "roundtrip", "--say", "Turn off the lights when you leave.", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    wav, sr = sf.read(out)
    assert sr == 24_000
    ref, ref_sr = say("Turn off the lights when you leave.", "espeak:en-us")
    assert abs(len(wav) / sr - len(ref) / ref_sr) < 0.02
    assert np.abs(wav).max() > 0.05  # not silence
    assert "(8, " in proc.stderr and "mel" in proc.stderr


def test_roundtrip_file_and_bad_input(tmp_path):
    wav, sr = say("A loud bell rang at the end of the long day.", "espeak:en-us+f3")
    src = tmp_path / "in.flac"
    sf.write(src, wav, sr)
    out = tmp_path / "out.wav"
    proc = valle("codec", "roundtrip", str(src), "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    assert out.exists()
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"not audio at all" * 10)
    proc = valle("codec", "roundtrip", str(bad), "-o", str(out))
    assert proc.returncode == 1 and "cannot read" in proc.stderr and "Traceback" not in proc.stderr
    proc = valle("codec", "roundtrip", "-o", str(out))
    assert proc.returncode == 1 and "either an audio file or --say" in proc.stderr


def test_fit_on_a_folder_then_use_the_codebooks(tmp_path):
    voices = tmp_path / "voices"
    (voices / "a").mkdir(parents=True)
    texts = ["The old man walked slowly.", "Cats like to sleep in warm places.", "I like rice and beans."]
    for i, text in enumerate(texts):
        wav, sr = say(text, "espeak:en-us+m3" if i % 2 else "espeak:en-gb")
        sf.write(voices / "a" / f"{i}.wav", wav, sr)
    (voices / "a" / "empty.wav").write_bytes(b"")  # skipped and reported, not fatal
    cb = tmp_path / "mine.safetensors"
    proc = valle(
        "codec", "fit", str(voices), "-o", str(cb), "--levels", "4", "--codebook-size", "64", "--iters", "3"
    )
    assert proc.returncode == 0, proc.stderr
    assert "fitted on 3 files" in proc.stderr
    assert "skipped" in proc.stderr and "empty.wav" in proc.stderr
    out = tmp_path / "rt.wav"
    proc = valle(
        "codec",
        "roundtrip",
        str(voices / "a" / "0.wav"),
        "-o",
        str(out),
        "--set",
        f"codec.path={cb}",
        "--set",
        "codec.bandwidth=3.0",
    )
    assert proc.returncode == 0, proc.stderr
    assert "(4, " in proc.stderr
    proc = valle("codec", "info", "--set", f"codec.path={cb}", "--set", "codec.bandwidth=3.0")
    info = json.loads(proc.stdout)
    assert info["n_codebooks"] == 4 and info["codebook_size"] == 64
    assert info["fitted"]["files"] == 3
    proc = valle("codec", "roundtrip", "--say", "hello", "-o", str(out), "--set", f"codec.path={cb}")
    assert proc.returncode == 1 and "0.75 kbps each" in proc.stderr


def test_fit_on_a_folder_without_audio(tmp_path):
    proc = valle("codec", "fit", str(tmp_path), "-o", str(tmp_path / "x.safetensors"))
    assert proc.returncode == 1 and "no audio files" in proc.stderr


def test_info_of_the_shipped_codec():
    proc = valle("codec", "info")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info == {**info, "name": "mel", "sample_rate": 24000, "frame_rate": 75.0, "n_codebooks": 8}
    assert info["fitted"]["recipe"] == "scripts/fit_default_codec.py"
