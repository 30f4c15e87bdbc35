"""Files shipped with valle: the default mel-codec codebooks and sentence lists for offline speech corpora."""

from __future__ import annotations

from importlib import resources


def sentences(split: str = "train", language: str = "en") -> list[str]:
    """Sentences for offline corpora. English has a `train` and a `held-out` split; de/fr have `train` only."""
    if language == "en":
        lines = resources.files(__name__).joinpath("sentences_en.txt").read_text("utf-8").splitlines()
        out: dict[str, list[str]] = {"train": [], "held-out": []}
        current = "train"
        for line in lines:
            if line.strip() == "# held-out":
                current = "held-out"
            elif line.strip() and not line.startswith("#"):
                out[current].append(line.strip())
        if split not in out:
            raise ValueError(f"unknown split {split!r}: use train or held-out")
        return out[split]
    lines = resources.files(__name__).joinpath("sentences_other.txt").read_text("utf-8").splitlines()
    found = [
        t for lang, _, t in (ln.partition("|") for ln in lines if not ln.startswith("#")) if lang == language
    ]
    return found if split == "train" else []
