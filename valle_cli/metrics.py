"""Quality metrics shared by the benchmarks and `valle eval`: word error rate, cosine similarity and the
length of speech with its silences trimmed.

WER is the word-level Levenshtein distance divided by the number of reference words, after normalizing both
texts the same way (lower case, punctuation dropped, numbers left as written). Corpus WER sums errors and
reference words over utterances, as papers report it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_PUNCT = re.compile(r"[^\w\s']|_")


def normalize_text(text: str) -> list[str]:
    text = _PUNCT.sub(" ", text.lower()).replace("'", "")
    return text.split()


def edit_distance(ref: Sequence[str], hyp: Sequence[str]) -> int:
    """Levenshtein distance between two token sequences (substitutions, insertions, deletions cost 1)."""
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
        prev = cur
    return prev[-1]


def word_errors(ref: str, hyp: str) -> tuple[int, int]:
    """(errors, reference word count) for one utterance."""
    r, h = normalize_text(ref), normalize_text(hyp)
    return edit_distance(r, h), len(r)


def wer(refs: Sequence[str] | str, hyps: Sequence[str] | str) -> float:
    """Corpus word error rate of hypotheses against references (one string or parallel lists)."""
    if isinstance(refs, str):
        refs, hyps = [refs], [hyps]  # type: ignore[list-item]
    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses")
    errors = words = 0
    for r, h in zip(refs, hyps, strict=True):
        e, n = word_errors(r, h)
        errors, words = errors + e, words + n
    return errors / max(words, 1)


def cosine(a, b) -> float:
    import numpy as np

    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    denom = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(a @ b / denom) if denom > 0 else 0.0


def speech_seconds(audio, sample_rate: int, floor_db: float = -35.0, frame: float = 0.02) -> float:
    """Seconds from the first to the last 20 ms frame whose RMS is within `floor_db` of the loudest frame:
    the speech's length with leading and trailing silence trimmed (0.0 for silence)."""
    import numpy as np

    x = np.asarray(audio, dtype=np.float64).reshape(-1)
    n = max(1, int(frame * sample_rate))
    frames = len(x) // n
    if frames == 0:
        return 0.0
    rms = np.sqrt((x[: frames * n].reshape(frames, n) ** 2).mean(1))
    peak = rms.max()
    if peak <= 0:
        return 0.0
    loud = np.flatnonzero(rms >= peak * 10 ** (floor_db / 20))
    return float((loud[-1] - loud[0] + 1) * n / sample_rate)
