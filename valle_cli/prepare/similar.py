"""Similar utterances per speaker, for choosing prompts at training time.

The embedding is deliberately cheap and codec-agnostic: the bag of RVQ codes of the first two levels
(square-rooted counts, L2-normalized per level), which reflects both what is said and how. Cosine similarity
within each speaker, top-k, the utterance itself excluded. Speakers with many utterances are processed in
blocks so memory stays bounded.
"""

from __future__ import annotations

import numpy as np


def code_embedding(codes: np.ndarray, codebook_size: int, levels: int = 2) -> np.ndarray:
    """(Q, F) codes -> (levels * codebook_size,) float32 unit vector."""
    parts = []
    for level in range(min(levels, codes.shape[0])):
        hist = np.bincount(codes[level].astype(np.int64), minlength=codebook_size)[:codebook_size]
        v = np.sqrt(hist.astype(np.float32))
        parts.append(v / max(float(np.linalg.norm(v)), 1e-8))
    out = np.concatenate(parts)
    return out / max(float(np.linalg.norm(out)), 1e-8)


def top_k_similar(embeddings: np.ndarray, k: int, block: int = 2048) -> np.ndarray:
    """Rows of (N, D) unit vectors -> (N, min(k, N-1)) indices of the most similar other rows, best first."""
    n = len(embeddings)
    kk = min(k, n - 1)
    if kk <= 0:
        return np.zeros((n, 0), dtype=np.int64)
    out = np.empty((n, kk), dtype=np.int64)
    for start in range(0, n, block):
        sims = embeddings[start : start + block] @ embeddings.T  # (b, N)
        rows = np.arange(sims.shape[0])
        sims[rows, start + rows] = -np.inf  # not itself
        part = np.argpartition(-sims, kk - 1, axis=1)[:, :kk]
        order = np.argsort(-np.take_along_axis(sims, part, axis=1), axis=1, kind="stable")
        out[start : start + block] = np.take_along_axis(part, order, axis=1)
    return out
