"""The built-in Whisper transcriber: registered, and offline it fails at once with a message naming the model,
the download command and the offline alternative (the real loading code is what runs)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from valle_cli import plugins


def test_whisper_is_a_builtin_transcriber():
    info = plugins.discover("transcriber")["whisper"][0]
    assert info.distribution == "valle" and info.target.endswith(":WhisperTranscriber")


def test_offline_message(tmp_path):
    code = (
        "from valle_cli.transcribe import build_transcriber\nfrom valle_cli.errors import ValleError\n"
        "try:\n    build_transcriber('whisper')\nexcept ValleError as e:\n    print(e.message); print(e.remedy)\n"
    )
    env = {**os.environ, "HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    start = time.time()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert time.time() - start < 60  # no long retry loop
    assert "openai/whisper-small is not available offline" in proc.stdout, proc.stdout + proc.stderr
    assert "hf download openai/whisper-small" in proc.stdout
    assert "pocketsphinx" in proc.stdout


def test_prepare_without_transcripts_and_without_whisper_weights_says_why(tmp_path):
    import soundfile as sf

    from valle_cli.audio.speech import say

    wav, sr = say("Hello there, this has no transcript.", "espeak:en-us")
    (tmp_path / "v" / "g" / "s").mkdir(parents=True)
    sf.write(tmp_path / "v" / "g" / "s" / "a.wav", wav, sr)
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "valle_cli.cli.app",
            "prepare",
            str(tmp_path / "v"),
            "-o",
            str(tmp_path / "ds"),
            "--codec",
            "mel",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 1
    assert "Whisper model openai/whisper-small is not available offline" in proc.stderr
    assert "Traceback" not in proc.stderr
