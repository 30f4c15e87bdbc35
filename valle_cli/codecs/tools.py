"""Engine functions behind `valle codec`: fit mel codebooks on a folder of audio, round-trip a waveform.

No printing here: progress goes through callbacks, problems with single files are collected and returned.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from valle_cli.audio.io import load_audio, supported_extensions
from valle_cli.codecs.base import Codec
from valle_cli.errors import AudioError, CodecError


@dataclass
class FitReport:
    output: Path
    files: int
    seconds_of_audio: float
    seconds_taken: float
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)


def find_audio(folder: Path) -> list[Path]:
    exts = set(supported_extensions())
    if folder.is_file():
        return [folder]
    if not folder.is_dir():
        raise AudioError(f"{folder} does not exist", "give a folder of audio files (searched recursively)")
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in exts and p.is_file())


def fit_folder(
    folder: Path,
    output: Path,
    *,
    levels: int = 8,
    codebook_size: int = 1024,
    iters: int = 20,
    max_minutes: float = 120.0,
    seed: int = 0,
    progress: Callable[[str, int, int], None] | None = None,
) -> FitReport:
    """Fit a mel codec on every audio file under `folder` (up to `max_minutes` of it) and save it."""
    from valle_cli.codecs.mel_fit import fit_mel_codec
    from valle_cli.fsutil import check_writable

    check_writable(output, CodecError)  # fail now, not after minutes of fitting
    files = find_audio(folder)
    if not files:
        raise AudioError(
            f"no audio files under {folder}", f"supported extensions: {', '.join(supported_extensions())}"
        )
    t0 = time.time()
    skipped: list[tuple[str, str]] = []
    wavs: list[np.ndarray] = []
    budget = max_minutes * 60 * 24_000
    total = 0
    for i, path in enumerate(files):
        try:
            wav = load_audio(path, 24_000, end=(budget - total) / 24_000)  # no more than the budget needs
        except AudioError as exc:
            skipped.append((str(path), exc.message))
            continue
        wavs.append(wav)
        total += wav.size
        if progress:
            progress("loading", i + 1, len(files))
        if total >= budget:
            break
    if not wavs:
        raise CodecError(f"none of the {len(files)} audio files under {folder} could be read", skipped[0][1])
    codec = fit_mel_codec(
        wavs,
        levels=levels,
        codebook_size=codebook_size,
        iters=iters,
        seed=seed,
        total=len(wavs),
        progress=progress or (lambda *_: None),
        info={"source": str(folder), "files": len(wavs)},
    )
    codec.save(output)
    return FitReport(output, len(wavs), total / 24_000, time.time() - t0, skipped)


@dataclass
class RoundTrip:
    audio: torch.Tensor  # (T,) at codec.sample_rate
    codes: torch.Tensor  # (Q, F)
    encode_seconds: float
    decode_seconds: float


def roundtrip(codec: Codec, wav: np.ndarray) -> RoundTrip:
    """Encode and decode one mono waveform already at the codec's rate."""
    x = torch.from_numpy(np.ascontiguousarray(wav, dtype=np.float32))[None, None]
    t0 = time.perf_counter()
    codes = codec.encode(x)
    t1 = time.perf_counter()
    out = codec.decode(codes)[0, 0, : wav.size].cpu()
    t2 = time.perf_counter()
    return RoundTrip(out, codes[0].cpu(), t1 - t0, t2 - t1)
