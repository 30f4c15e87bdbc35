"""Fitting the offline mel codec's codebooks: k-means residual vector quantization on log-mel frames.

Level by level: run k-means (k-means++-style seeding on a sample, then Lloyd iterations over all frames in
chunks, empty clusters re-seeded from the worst-fitted frames) on the residuals the levels below leave, then
subtract the chosen centroids. Silence-only frames are thinned out so the codebooks spend their entries on
speech. Everything is seeded and runs on the CPU in minutes for an hour of audio.

Progress is reported through a callback `(stage, done, total)`; nothing here prints.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch

from valle_cli.codecs.mel_codec import FORMAT, FORMAT_VERSION, MelCodec
from valle_cli.errors import CodecError
from valle_cli.fsutil import atomic_path

Progress = Callable[[str, int, int], None]


WINDOW_SECONDS = 60.0  # extract_frames: audio per spectrogram


def _nothing(stage: str, done: int, total: int) -> None:
    pass


def extract_frames(
    wavs: Iterable[np.ndarray], template: MelCodec, progress: Progress = _nothing, total: int = 0
) -> torch.Tensor:
    """Raw (unstandardized) log-mel frames of 24 kHz mono waveforms -> (N, D). A long waveform is read in
    windows of `WINDOW_SECONDS` (its spectrogram would otherwise take gigabytes for an hour of audio), each
    with an FFT's worth of audio on both sides, so the frames are those of the whole waveform."""
    frames = []
    hop = template.hop_length
    window = max(1, int(WINDOW_SECONDS * template.sample_rate) // hop) * hop
    context = -(-template.n_fft // hop) * hop  # a frame reads n_fft samples around its centre
    for i, wav in enumerate(wavs):
        t = torch.from_numpy(np.asarray(wav, dtype=np.float32))
        n = template.n_frames(t.numel()) * hop
        whole = torch.nn.functional.pad(t, (0, n - t.numel()))
        for start in range(0, max(n, hop), window):
            lo, hi = max(0, start - context), min(n, start + window + context)
            made = template.log_mel(whole[lo:hi][None, None])[0]
            skip = (start - lo) // hop
            frames.append(made[skip : skip + (min(n, start + window) - start) // hop])
        progress("features", i + 1, total)
    if not frames:
        raise CodecError(
            "no audio to fit the codec on", "point `valle codec fit` at a folder with speech files"
        )
    return torch.cat(frames, 0)


def drop_silence(frames: torch.Tensor, keep_fraction: float = 0.1, seed: int = 0) -> torch.Tensor:
    """Keep every frame within 50 dB of the loudest frames and `keep_fraction` of the quieter ones.

    Loudness is the log of the summed mel magnitudes; frames are natural-log magnitudes, and 50 dB of
    magnitude is ln(10) * 50 / 20 nepers. The reference is the 99th percentile, so one click cannot set it.
    """
    gen = torch.Generator().manual_seed(seed)
    energy = torch.logsumexp(frames, dim=1)
    reference = torch.quantile(energy[torch.randperm(len(energy), generator=gen)[:100_000]], 0.99)
    quiet = energy < reference - np.log(10) * 50 / 20
    keep = ~quiet | (torch.rand(len(frames), generator=gen) < keep_fraction)
    return frames[keep]


def _nearest(
    x: torch.Tensor, centroids: torch.Tensor, chunk: int = 65536
) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of and squared distance to the nearest centroid for each row of x."""
    c2 = (centroids * centroids).sum(-1)
    idx, dist = [], []
    for start in range(0, len(x), chunk):
        xs = x[start : start + chunk]
        d = c2[None] - 2.0 * xs @ centroids.T
        m, i = d.min(-1)
        idx.append(i)
        dist.append((m + (xs * xs).sum(-1)).clamp_min(0))
    return torch.cat(idx), torch.cat(dist)


def kmeans(
    x: torch.Tensor,
    k: int,
    iters: int = 20,
    seed: int = 0,
    progress: Progress = _nothing,
    stage: str = "k-means",
) -> torch.Tensor:
    """Centroids (k, D) of x (N, D)."""
    n = len(x)
    if n < k:
        raise CodecError(
            f"{n} frames are too few to fit {k} codebook entries",
            "give `valle codec fit` more audio (a few minutes at least)",
        )
    gen = torch.Generator().manual_seed(seed)
    # k-means++ seeding on a sample (exact k-means++ over millions of frames is needlessly slow)
    sample = x[torch.randperm(n, generator=gen)[: min(n, 20 * k)]]
    centroids = torch.empty(k, x.shape[1])
    centroids[0] = sample[torch.randint(len(sample), (1,), generator=gen)]
    best = ((sample - centroids[0]) ** 2).sum(-1)
    for j in range(1, k):
        pick = torch.multinomial(best.clamp_min(1e-12), 1, generator=gen)
        centroids[j] = sample[pick]
        best = torch.minimum(best, ((sample - centroids[j]) ** 2).sum(-1))
    for it in range(iters):
        idx, dist = _nearest(x, centroids)
        sums = torch.zeros_like(centroids).index_add_(0, idx, x)
        counts = torch.bincount(idx, minlength=k).float()
        empty = counts == 0
        centroids = torch.where(empty[:, None], centroids, sums / counts.clamp_min(1)[:, None])
        if empty.any():  # re-seed empty clusters with the worst-fitted frames
            worst = dist.topk(int(empty.sum())).indices
            centroids[empty] = x[worst]
        progress(stage, it + 1, iters)
    return centroids


def fit_mel_codec(
    wavs: Iterable[np.ndarray],
    *,
    levels: int = 8,
    codebook_size: int = 1024,
    iters: int = 20,
    max_frames: int = 400_000,
    seed: int = 0,
    total: int = 0,
    progress: Progress = _nothing,
    info: dict | None = None,
) -> MelCodec:
    """Fit a `MelCodec` on 24 kHz mono waveforms."""
    if levels < 1 or codebook_size < 2 or iters < 1:
        raise CodecError(
            f"cannot fit {levels} levels x {codebook_size} entries in {iters} iterations",
            "use at least 1 level, 2 entries and 1 iteration",
        )
    template = MelCodec(torch.zeros(1, 1, 100), torch.zeros(100), torch.ones(100))
    raw = drop_silence(extract_frames(wavs, template, progress, total), seed=seed)
    gen = torch.Generator().manual_seed(seed)
    if len(raw) > max_frames:
        raw = raw[torch.randperm(len(raw), generator=gen)[:max_frames]]
    mean, std = raw.mean(0), raw.std(0).clamp_min(1e-3)
    residual = (raw - mean) / std
    codebooks = []
    for level in range(levels):
        cb = kmeans(residual, codebook_size, iters, seed + level, progress, f"level {level + 1}/{levels}")
        idx, _ = _nearest(residual, cb)
        residual = residual - cb[idx]
        codebooks.append(cb)
    meta = {
        "frames": len(raw),
        "seconds": round(len(raw) / 75.0, 1),
        "iters": iters,
        "seed": seed,
        **(info or {}),
    }
    return MelCodec(torch.stack(codebooks), mean, std, meta=meta)


def save_codebooks(path, codebooks, mean, std, params: dict, info: dict) -> Path:
    from valle_cli.fsutil import save_safetensors

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    metadata = {
        "format": FORMAT,
        "version": str(FORMAT_VERSION),
        "params": json.dumps(params),
        "info": json.dumps(info),
    }
    tensors = {
        "codebooks": codebooks.detach().cpu().to(torch.float16).contiguous(),
        "mean": mean.detach().cpu().float().contiguous(),
        "std": std.detach().cpu().float().contiguous(),
    }
    with atomic_path(p, CodecError) as tmp:
        save_safetensors(tensors, tmp, metadata)
    return p
