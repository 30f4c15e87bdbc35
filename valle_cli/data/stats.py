"""Dataset statistics for `valle dataset stats`: hours per group and speaker, durations, phoneme coverage."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from valle_cli.data.dataset import Dataset


@dataclass
class DatasetStats:
    utterances: int
    hours: float
    hours_per_group: dict[str, float]
    hours_per_speaker: dict[str, float]
    utterances_per_speaker: dict[str, int]
    languages: dict[str, int]
    duration_edges: list[float]  # histogram bin edges, seconds
    duration_counts: list[int]
    duration_min: float
    duration_median: float
    duration_max: float
    symbols_used: int
    symbols_total: int
    symbol_counts: dict[str, int]  # IPA symbol -> occurrences
    unknown_symbols: int


def dataset_stats(ds: Dataset, bins: int = 10) -> DatasetStats:
    from valle_cli.text.symbols import SymbolMap

    dur = ds.durations()
    speaker_col = np.asarray(ds.columns["speaker"])
    per_speaker = np.bincount(speaker_col, weights=dur, minlength=len(ds.speakers)) / 3600
    count_speaker = np.bincount(speaker_col, minlength=len(ds.speakers))
    per_group: dict[str, float] = {}
    for name, hours in zip(ds.speakers, per_speaker, strict=True):
        group = name.split("/", 1)[0]
        per_group[group] = per_group.get(group, 0.0) + float(hours)
    langs = Counter(ds.languages[i] for i in np.asarray(ds.columns["language"]))
    if len(dur):
        counts, edges = np.histogram(dur, bins=bins)
    else:
        counts, edges = np.zeros(0, int), np.zeros(1)
    symbols = SymbolMap.from_dict(ds.header["symbols"])
    ids = np.bincount(np.asarray(ds.columns["phonemes"], dtype=np.int64), minlength=len(symbols))
    used = {symbols.symbols[i]: int(c) for i, c in enumerate(ids) if c and i > 3}
    return DatasetStats(
        utterances=len(ds),
        hours=float(dur.sum() / 3600),
        hours_per_group=dict(sorted(per_group.items())),
        hours_per_speaker={s: float(h) for s, h in zip(ds.speakers, per_speaker, strict=True)},
        utterances_per_speaker={s: int(c) for s, c in zip(ds.speakers, count_speaker, strict=True)},
        languages=dict(langs),
        duration_edges=[float(e) for e in edges],
        duration_counts=[int(c) for c in counts],
        duration_min=float(dur.min()) if len(dur) else 0.0,
        duration_median=float(np.median(dur)) if len(dur) else 0.0,
        duration_max=float(dur.max()) if len(dur) else 0.0,
        symbols_used=len(used),
        symbols_total=len(symbols) - 4,
        symbol_counts=dict(sorted(used.items(), key=lambda kv: -kv[1])),
        unknown_symbols=int(ids[symbols.unk_id]) if len(ids) > symbols.unk_id else 0,
    )
