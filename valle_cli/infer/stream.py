"""Streaming generation: audio comes out in chunks while the AR is still running.

Tokens: the AR runs exactly as in `generate` (same sampler, same seed, so the same level-0 tokens). After
`chunk_frames` new frames (the first chunk: small, for a short time to first audio), then after chunks that grow
by `growth` up to `max_chunk_frames` (fewer NAR re-runs), the NAR passes fill levels 1..Q-1 on a window of the
response: up to `nar_context`
frames before the first unfinished frame (their codes are kept, so chunks join consistently) through the newest
frame. The last `lookahead` frames are not released yet: their NAR input still lacks right context, and they are
redone with the next chunk. When the AR stops, the rest is filled and released.

Audio: `ChunkDecoder` decodes each released chunk with `codec_context` frames of earlier codes in front (the
codec's own receptive field / Griffin-Lim's context) and holds back the last `crossfade` frames, which it blends
with the same frames as decoded by the next chunk. The fade follows the two decodes' correlation: a neural
codec decodes the same frames to nearly the same waveform (an equal-power fade would add 3 dB there), while
Griffin-Lim's phase differs between windows (a linear fade would dip 3 dB there); `crossfade` keeps the
energy level for any correlation. Away from the joins the audio matches the
whole-utterance decode; near them it differs by a measured bound (tests/test_stream.py, docs/benchmarks.md).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from valle_cli.infer.engine import (
    NarItem,
    Request,
    SamplingConfig,
    ar_tokens,
    generate_batch,
    nar_fill,
    response_codes,
    shared_prefix,
)
from valle_cli.model.valle import held_counts


@dataclass
class StreamSettings:
    # the first chunk's frames (75 frames = 1 s); bench/stream_lookahead.py chose 12 + 4 of lookahead
    chunk_frames: int = 12
    growth: float = 2.0  # each later chunk this many times the last
    max_chunk_frames: int = 225  # ... up to this
    lookahead: int = 4  # newest frames held back until later ones exist
    nar_context: int = 225  # earlier response frames the NAR window keeps
    codec_context: int = 24  # earlier frames decoded in front of a chunk
    crossfade: int = 4  # frames blended between consecutive chunks

    def validate(self) -> None:
        if self.chunk_frames < 1 or min(self.lookahead, self.nar_context, self.codec_context) < 0:
            raise ValueError("stream settings: chunk_frames >= 1 and the others >= 0")
        if self.growth < 1 or self.max_chunk_frames < self.chunk_frames:
            raise ValueError("stream settings: growth >= 1 and max_chunk_frames >= chunk_frames")
        if not 0 <= self.crossfade <= self.chunk_frames:
            raise ValueError("stream settings: crossfade must be between 0 and chunk_frames")


@dataclass
class CodeChunk:
    codes: torch.Tensor  # (Q, n) final codes of newly released frames
    start: int  # index of the first of them in the response (prefix excluded)
    last: bool


@torch.inference_mode()
def stream_codes(
    model, req: Request, sampling: SamplingConfig | None = None, settings: StreamSettings | None = None
) -> Iterator[CodeChunk]:
    """Final codes of one request, chunk by chunk, while the AR runs. Yields at least one chunk."""
    sc = sampling or SamplingConfig()
    st = settings or StreamSettings()
    st.validate()
    if model.nar0:  # level 0 comes in parallel passes: all of it at once, then released chunk by chunk
        yield from _released(generate_batch(model, [req], sc)[0].codes, st)
        return
    past = shared_prefix(model, [req]) if model.shared else None  # the prefix, once for every pass
    symbols: list[list[int]] = [[]]  # pointer models: the text symbol of every frame (no prefix there)
    steps = (step[0] for step in ar_tokens(model, [req], sc, symbols=symbols, past=past))
    yield from fill_behind(model, req, sc, st, steps, symbols[0], past)


def fill_behind(
    model,
    req: Request,
    sc: SamplingConfig,
    st: StreamSettings,
    level0: Iterator[int],
    symbols: list[int],
    past,
) -> Iterator[CodeChunk]:
    """The NAR half of `stream_codes`: final codes, chunk by chunk, behind a source of level-0 tokens.
    `symbols` (pointer models) holds the text symbol of every token given so far: the source appends to it."""
    fc = req.prefix_frames
    tokens: list[int] = []
    codes = response_codes(model, req, [])  # (Q, Fc): grows as the AR runs
    done = fc  # frames (prefix included) whose every level is final
    nar_gen = [sc.generator()]

    def fill(upto_final: int) -> torch.Tensor:
        nonlocal codes, done
        n = fc + len(tokens)
        full = torch.zeros(model.n_levels, n, dtype=torch.long, device=codes.device)
        full[:, : codes.shape[1]] = codes
        full[0, fc:] = torch.tensor(tokens, device=codes.device)
        w0 = max(0, done - st.nar_context)
        fs = held = None
        if model.pointer:  # the window's frame map, with held counts from the whole response
            if len(symbols) < len(tokens):
                raise ValueError(
                    "fill_behind: a pointer model's level-0 source must append each token's symbol"
                )
            whole = torch.tensor(symbols[: len(tokens)], dtype=torch.long)
            fs, held = whole[w0:], held_counts(whole)[w0:]
        window = nar_fill(model, [NarItem(req, full[:, w0:], done - w0, fs, held)], sc, nar_gen, past=past)[0]
        full[:, done:] = window[:, done - w0 :]
        codes = full
        released = full[:, done:upto_final].cpu()
        done = upto_final
        return released

    size = float(st.chunk_frames)
    for token in level0:
        tokens.append(token)
        n = fc + len(tokens)
        if n - st.lookahead - done >= int(size):
            start = done - fc
            yield CodeChunk(fill(n - st.lookahead), start, False)
            size = min(size * st.growth, st.max_chunk_frames)
    start = done - fc
    if fc + len(tokens) > done:
        yield CodeChunk(fill(fc + len(tokens)), start, True)
    else:
        yield CodeChunk(torch.zeros(model.n_levels, 0, dtype=torch.long), start, True)


def _released(codes: torch.Tensor, st: StreamSettings) -> Iterator[CodeChunk]:
    """Finished codes (Q, F) as the chunks streaming would release (growing sizes), for the codec decoder."""
    total, start, size = codes.shape[1], 0, float(st.chunk_frames)
    while True:
        end = min(total, start + int(size))
        yield CodeChunk(codes[:, start:end], start, end >= total)
        if end >= total:
            return
        start, size = end, min(size * st.growth, st.max_chunk_frames)


def crossfade(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Fade from a to b (same length) at constant energy whatever their correlation r: gains cos/sin scaled by
    1 / sqrt(1 + 2 r cos sin), which is a plain linear-sum fade for r = 1 and equal power for r = 0."""
    n = len(a)
    theta = (np.arange(n, dtype=np.float64) + 0.5) / n * (np.pi / 2)
    c, s = np.cos(theta), np.sin(theta)
    denom = float(np.sqrt(np.dot(a, a) * np.dot(b, b)))
    r = min(max(float(np.dot(a, b)) / denom, 0.0), 1.0) if denom > 0 else 0.0
    return ((a * c + b * s) / np.sqrt(1 + 2 * r * c * s)).astype(np.float32)


class ChunkDecoder:
    """Turns released code chunks of one utterance into audio chunks (see the module docstring)."""

    def __init__(self, codec, context: int = 24, crossfade: int = 4):
        self.codec, self.context, self.crossfade = codec, context, crossfade
        self.codes: torch.Tensor | None = None  # (Q, F) every final frame so far
        self.tail: np.ndarray | None = None  # held-back samples of the last `crossfade` frames

    def push(self, chunk: torch.Tensor, last: bool) -> np.ndarray:
        """Audio for the new frames (Q, n); with `last`, everything still held back too."""
        hop = self.codec.hop_length
        a = 0 if self.codes is None else self.codes.shape[1]
        self.codes = chunk if self.codes is None else torch.cat([self.codes, chunk], 1)
        b = self.codes.shape[1]
        if b == a:
            out, self.tail = (self.tail if last and self.tail is not None else np.zeros(0, np.float32)), None
            return out.astype(np.float32)
        xf = 0 if self.tail is None else len(self.tail) // hop  # frames held back by the previous chunk
        w = max(0, a - xf - self.context)
        wav = self.codec.decode(self.codes[None, :, w:b].to(self.codec.device))[0, 0].cpu().numpy()
        cur = wav[(a - xf - w) * hop :]  # samples of frames [a - xf, b)
        pieces = []
        if xf:
            n = xf * hop
            pieces.append(crossfade(self.tail, cur[:n]))
            cur = cur[n:]
        keep = 0 if last else min(self.crossfade, b - a) * hop
        pieces.append(cur[: len(cur) - keep])
        self.tail = cur[len(cur) - keep :] if keep else None
        return np.concatenate(pieces).astype(np.float32)
