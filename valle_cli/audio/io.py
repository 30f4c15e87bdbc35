"""Audio in and out: any file libsndfile reads -> mono float32 at the rate you ask for; WAV out.

Loading goes through soundfile (libsndfile: wav, flac, ogg/vorbis, opus, and mp3 with libsndfile >= 1.1),
averages channels to mono and resamples with soxr at its high-quality setting. Every failure a user can hit
is an `AudioError` saying which file and what to do: missing, corrupt or unsupported, empty, silent, too
short. Writes are atomic (temporary file + rename), so an interrupted run never leaves half a file.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from valle_cli.errors import AudioError
from valle_cli.fsutil import atomic_path

# Peak below this (about -70 dBFS) is treated as digital silence.
SILENCE_PEAK = 3e-4


def supported_extensions() -> list[str]:
    import soundfile as sf

    exts = {".wav", ".flac", ".ogg", ".oga", ".opus"}
    if "MP3" in sf.available_formats():
        exts.add(".mp3")
    return sorted(exts)


def resample(wav: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
    """Band-limited resampling (soxr, high quality). `wav` is (T,) or (T, C)."""
    if sr_in == sr_out:
        return wav
    import soxr

    return soxr.resample(wav, sr_in, sr_out, quality="HQ").astype(np.float32, copy=False)


def audio_seconds(path: str | os.PathLike) -> float:
    """A file's duration from its header, without decoding it; the same errors as `load_audio`."""
    return _open_info(Path(path)).duration


def _open_info(p: Path):
    import soundfile as sf

    if not p.exists():
        if p.is_symlink():
            raise AudioError(f"audio file {p} is a broken symbolic link", "point it at an existing file")
        raise AudioError(f"audio file {p} does not exist", "check the path")
    if p.is_dir():
        raise AudioError(f"{p} is a folder, not an audio file")
    if not p.is_file():
        raise AudioError(f"{p} is not a regular file (a FIFO or device)", "give a file path")
    if p.stat().st_size == 0:
        raise AudioError(f"audio file {p} is empty (0 bytes)", "re-record or re-export it, or remove it")
    try:
        info = sf.info(str(p))
    except (sf.LibsndfileError, RuntimeError, TypeError) as exc:
        if p.suffix.lower() == ".mp3" and ".mp3" not in supported_extensions():
            raise AudioError(
                f"cannot read {p}: this libsndfile has no MP3 support",
                "convert it to wav or flac (e.g. `ffmpeg -i in.mp3 out.flac`) or upgrade soundfile",
            ) from None
        raise AudioError(
            f"cannot read {p}: {exc}".rstrip(),
            f"the file is corrupt or not a supported format ({', '.join(supported_extensions())})",
        ) from None
    if info.frames >= UNKNOWN_LENGTH:  # a stream's header (FLAC total_samples 0): no length, no seeking
        raise AudioError(
            f"{p} does not say how long it is (its header was written by a stream, e.g. a pipe)",
            f"re-encode it so the header holds its length, e.g. `sox {p.name} fixed{p.suffix}`",
        )
    return info


UNKNOWN_LENGTH = 2**40  # frames: libsndfile reports about 2**63 for a file whose header has no length


def load_audio(
    path: str | os.PathLike,
    sample_rate: int,
    *,
    min_duration: float = 0.0,
    allow_silent: bool = False,
    start: float = 0.0,
    end: float | None = None,
    max_duration: tuple[float, str] | None = None,
) -> np.ndarray:
    """Read an audio file as mono float32 in [-1, 1] at `sample_rate`. Returns shape (T,).

    Only `start`..`end` seconds are decoded (None: to the end), so a clip of an hours-long file costs the
    clip's memory. `max_duration` = (seconds, remedy): a longer span is refused from the header, before any
    decoding, with the limit and the remedy in the message."""
    import soundfile as sf

    p = Path(path)
    if end is not None and not end > start:
        raise AudioError(
            f"nothing to read from {p}: the span {start:g}-{end:g} s is empty", "check the times"
        )
    info = _open_info(p)
    first = max(0, round(start * info.samplerate))
    last = info.frames if end is None else min(info.frames, round(end * info.samplerate))
    if max_duration is not None and (last - first) / info.samplerate > max_duration[0]:
        raise AudioError(
            f"{p} is {_clock((last - first) / info.samplerate)} long; at most {_clock(max_duration[0])} is read here",
            max_duration[1],
        )
    try:
        data, sr = sf.read(str(p), dtype="float32", always_2d=True, start=first, stop=max(first, last))
    except (sf.LibsndfileError, RuntimeError, TypeError) as exc:
        raise AudioError(
            f"cannot read {p}: {exc}".rstrip(),
            f"the file is corrupt or not a supported format ({', '.join(supported_extensions())})",
        ) from None
    if data.shape[0] == 0:
        if first and first >= info.frames:
            raise AudioError(f"{p} ends at {info.duration:.2f} s, before {start:.2f} s", "check the times")
        raise AudioError(f"audio file {p} holds no samples", "re-record or re-export it, or remove it")
    wav = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    wav = resample(np.ascontiguousarray(wav), sr, sample_rate)
    return check_audio(wav, sample_rate, name=str(p), min_duration=min_duration, allow_silent=allow_silent)


def _clock(seconds: float) -> str:
    """7384.2 -> '2:03:04'; 42.5 -> '42.5 s'."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    s = round(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d} min"


def check_audio(
    wav: np.ndarray,
    sample_rate: int,
    *,
    name: str = "audio",
    min_duration: float = 0.0,
    allow_silent: bool = False,
) -> np.ndarray:
    """Validate a mono waveform; returns it as contiguous float32."""
    wav = np.ascontiguousarray(wav, dtype=np.float32)
    if wav.ndim != 1:
        raise AudioError(f"{name}: expected a mono waveform (T,), got shape {wav.shape}")
    if wav.size == 0:
        raise AudioError(f"{name} holds no samples")
    if not np.isfinite(wav).all():
        raise AudioError(f"{name} contains NaN or infinite samples", "the file is corrupt; re-export it")
    duration = wav.size / sample_rate
    if duration < min_duration:
        raise AudioError(
            f"{name} is {duration:.2f} s long; at least {min_duration:.2f} s is needed",
            "use a longer recording",
        )
    if not allow_silent and float(np.abs(wav).max()) < SILENCE_PEAK:
        raise AudioError(f"{name} is silent (peak below -70 dBFS)", "check the recording level or the file")
    return wav


def save_audio(path: str | os.PathLike, wav, sample_rate: int, subtype: str = "PCM_16") -> Path:
    """Write a mono waveform (T,) or (1, T) as WAV (or FLAC/OGG by extension), atomically."""
    import soundfile as sf

    arr = wav.detach().cpu().float().numpy() if hasattr(wav, "detach") else np.asarray(wav, dtype=np.float32)
    arr = np.squeeze(arr).reshape(-1) if np.size(arr) == 1 else np.squeeze(arr)
    if arr.ndim != 1:
        raise AudioError(f"save_audio expects a mono waveform, got shape {arr.shape}")
    arr = np.clip(arr, -1.0, 1.0)
    p = Path(path)
    formats = {".wav": "WAV", ".flac": "FLAC", ".ogg": "OGG"}
    if p.suffix.lower() not in formats:
        raise AudioError(
            f"cannot write {p}: valle writes .wav, .flac or .ogg, not {p.suffix or 'files without extension'}",
            "change the output name's extension",
        )
    fmt = formats[p.suffix.lower()]
    if fmt == "OGG":
        subtype = "VORBIS"
    with atomic_path(p, AudioError) as tmp:
        sf.write(tmp, arr, sample_rate, subtype=subtype, format=fmt)
    return p
