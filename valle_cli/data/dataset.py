"""The dataset format (version 1): a folder of per-utterance token files plus a columnar index, or one HDF5.

Folder layout (documented for users in docs/dataset-format.md):

    dataset.json                   header: format, version, codec, symbol map, speakers, languages, totals
    index/*.npy                    one array per column, memory-mapped on open (a million utterances open in
                                   well under a second; nothing scans the utterance files)
    utterances/{group}/{speaker}/{name}.npy    codes, uint16 (Q, F)
    utterances/{group}/{speaker}/{name}.json   text, phonemes (IPA), language, duration, speaker, group,
                                               source file and span, similar utterance ids
    report.json                    what `valle prepare` skipped and why, and the run's summary

Index columns: `uid_bytes` + `uid_offsets` (utf-8 ids `group/speaker/name`), `speaker` (int32 into the header's
speakers), `language` (int16 into languages), `frames` (int32), `phonemes` + `phoneme_offsets` (uint16 symbol
ids, no BOS/EOS), `similar` (int32 (N, K), -1 = none).

The HDF5 file holds the same header (attribute `header`), the same index columns under `/index`, all codes
concatenated as `/codes` (uint16 (Q, total frames), chunked, lzf) with `/index/code_offsets`, and per-utterance
metadata JSON under `/meta`. Both open through `open_dataset`, which returns the same `Dataset` interface.

`dataset.json` is written last, atomically: a folder without it is an unfinished `valle prepare`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from valle_cli.errors import DatasetError
from valle_cli.fsutil import atomic_path

FORMAT = "valle-dataset"
VERSION = 1
COLUMNS = (
    "uid_bytes",
    "uid_offsets",
    "speaker",
    "language",
    "frames",
    "phonemes",
    "phoneme_offsets",
    "similar",
)
# Written by the aligner (prepare/align.py) after the index: per utterance, frames per symbol of
# BOS + phonemes + EOS (uint16), and their offsets. Optional: a dataset without them still opens.
DURATION_COLUMNS = ("durations", "duration_offsets")


@dataclass
class Utterance:
    """Per-utterance metadata, as stored in `{name}.json` and `/meta`."""

    uid: str
    group: str
    speaker: str
    language: str
    text: str
    phonemes: str  # IPA
    duration: float  # seconds of audio encoded
    frames: int
    source: str  # the input file
    start: float = 0.0  # span of the source file, seconds
    end: float | None = None
    similar: list[str] | None = None

    def to_json(self) -> str:
        return json.dumps(self.__dict__, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> Utterance:
        return cls(**json.loads(text))


# -- writing -------------------------------------------------------------------------------------------------


def utterance_paths(root: Path, uid: str) -> tuple[Path, Path]:
    base = root / "utterances" / uid
    return base.with_name(base.name + ".npy"), base.with_name(base.name + ".json")


def write_utterance(root: Path, utt: Utterance, codes: np.ndarray) -> None:
    """Codes first, metadata second, each atomically: a `.json` means the utterance is complete."""
    if codes.ndim != 2:
        raise DatasetError(f"codes of {utt.uid} must be (levels, frames), got {codes.shape}")
    if codes.size and (codes.min() < 0 or codes.max() > np.iinfo(np.uint16).max):
        raise DatasetError(f"codes of {utt.uid} do not fit uint16")
    npy, meta = utterance_paths(root, utt.uid)
    npy.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(npy, DatasetError) as tmp, open(tmp, "wb") as f:
        np.save(f, codes.astype(np.uint16, copy=False))
    with atomic_path(meta, DatasetError) as tmp:
        Path(tmp).write_text(utt.to_json(), encoding="utf-8")


def is_done(root: Path, uid: str) -> bool:
    npy, meta = utterance_paths(root, uid)
    return meta.is_file() and npy.is_file()


def finished_utterances(root: Path) -> list[Utterance]:
    """All complete utterances under root/utterances, sorted by id."""
    folder = root / "utterances"
    if not folder.is_dir():
        return []
    out = []
    for meta in folder.rglob("*.json"):
        if meta.name.startswith("."):
            continue
        try:
            utt = Utterance.from_json(meta.read_text(encoding="utf-8"))
        except (ValueError, TypeError) as exc:
            raise DatasetError(
                f"{meta} is damaged ({exc})", "delete it; a rerun of `valle prepare` redoes that utterance"
            ) from None
        if utterance_paths(root, utt.uid)[0].is_file():
            out.append(utt)
    return sorted(out, key=lambda u: u.uid)


# the columns phoneme durations depend on (prepare/align.py fingerprints the same ones)
ALIGNED_COLUMNS = ("uid_offsets", "uid_bytes", "phoneme_offsets", "phonemes", "frames")


def _same_columns(index: Path, columns: dict, names: tuple[str, ...]) -> bool:
    """Whether the index on disk already holds these columns as given."""
    for name in names:
        try:
            if not np.array_equal(np.load(index / f"{name}.npy"), columns[name]):
                return False
        except (OSError, ValueError):
            return False
    return True


def write_index(root: Path, utts: Sequence[Utterance], header: dict, symbols) -> None:
    """Columnar index + header for the utterances (in order). `symbols` maps IPA to ids."""
    speakers = sorted({f"{u.group}/{u.speaker}" for u in utts})
    languages = sorted({u.language for u in utts})
    sp_index = {s: i for i, s in enumerate(speakers)}
    lang_index = {s: i for i, s in enumerate(languages)}
    uid_index = {u.uid: i for i, u in enumerate(utts)}
    uid_bytes = [u.uid.encode("utf-8") for u in utts]
    phon = [np.asarray(symbols.encode(u.phonemes, add_bos_eos=False), dtype=np.uint16) for u in utts]
    k = max((len(u.similar or []) for u in utts), default=0)
    similar = np.full((len(utts), k), -1, dtype=np.int32)
    for i, u in enumerate(utts):
        for j, other in enumerate(u.similar or []):
            similar[i, j] = uid_index.get(other, -1)
    columns = {
        "uid_bytes": np.frombuffer(b"".join(uid_bytes), dtype=np.uint8),
        "uid_offsets": _offsets([len(b) for b in uid_bytes]),
        "speaker": np.asarray([sp_index[f"{u.group}/{u.speaker}"] for u in utts], dtype=np.int32),
        "language": np.asarray([lang_index[u.language] for u in utts], dtype=np.int16),
        "frames": np.asarray([u.frames for u in utts], dtype=np.int32),
        "phonemes": np.concatenate(phon) if phon else np.zeros(0, np.uint16),
        "phoneme_offsets": _offsets([len(p) for p in phon]),
        "similar": similar,
    }
    index = root / "index"
    index.mkdir(parents=True, exist_ok=True)
    if not _same_columns(index, columns, ALIGNED_COLUMNS):  # durations describe the old index: the aligner
        for name in DURATION_COLUMNS:  # writes them anew (an unchanged index keeps them: prepare/align.py)
            (index / f"{name}.npy").unlink(missing_ok=True)
    for name, arr in columns.items():
        with atomic_path(index / f"{name}.npy", DatasetError) as tmp, open(tmp, "wb") as f:
            np.save(f, arr)
    full = {
        **header,
        "format": FORMAT,
        "version": VERSION,
        "speakers": speakers,
        "languages": languages,
        "utterances": len(utts),
        "seconds": round(float(sum(u.duration for u in utts)), 3),
        "similar_k": k,
        "symbols": symbols.to_dict(),
    }
    with atomic_path(root / "dataset.json", DatasetError) as tmp:
        Path(tmp).write_text(json.dumps(full, indent=1, ensure_ascii=False), encoding="utf-8")


def _offsets(lengths: list[int]) -> np.ndarray:
    out = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=out[1:])
    return out


# -- reading -------------------------------------------------------------------------------------------------


class Dataset:
    """A prepared dataset, folder or HDF5. Index columns are arrays; codes and metadata load per utterance."""

    def __init__(self, path: Path, header: dict, columns: dict[str, np.ndarray]):
        self.path = path
        self.header = header
        self.columns = columns
        self.speakers: list[str] = header["speakers"]
        self.languages: list[str] = header["languages"]
        self.frame_rate = float(header["codec"]["frame_rate"])

    def __len__(self) -> int:
        return len(self.columns["frames"])

    def uid(self, i: int) -> str:
        o = self.columns["uid_offsets"]
        return bytes(self.columns["uid_bytes"][o[i] : o[i + 1]]).decode("utf-8")

    def uids(self) -> list[str]:
        blob = bytes(self.columns["uid_bytes"])
        o = self.columns["uid_offsets"]
        return [blob[o[i] : o[i + 1]].decode("utf-8") for i in range(len(self))]

    def speaker(self, i: int) -> str:
        return self.speakers[int(self.columns["speaker"][i])]

    def language(self, i: int) -> str:
        return self.languages[int(self.columns["language"][i])]

    def frames(self, i: int) -> int:
        return int(self.columns["frames"][i])

    def durations(self) -> np.ndarray:
        return np.asarray(self.columns["frames"], dtype=np.float64) / self.frame_rate

    def phonemes(self, i: int) -> np.ndarray:
        o = self.columns["phoneme_offsets"]
        return np.asarray(self.columns["phonemes"][o[i] : o[i + 1]])

    @property
    def has_durations(self) -> bool:
        o = self.columns.get("duration_offsets")
        return o is not None and len(o) == len(self) + 1

    def phoneme_durations(self, i: int) -> np.ndarray | None:
        """Frames per symbol of BOS + phonemes + EOS, or None (not aligned, or stale: the lengths disagree)."""
        if not self.has_durations:
            return None
        o = self.columns["duration_offsets"]
        d = np.asarray(self.columns["durations"][o[i] : o[i + 1]], dtype=np.int64)
        n = self.columns["phoneme_offsets"][i + 1] - self.columns["phoneme_offsets"][i] + 2
        if len(d) != n or int(d.sum()) != self.frames(i):
            return None
        return d

    def similar(self, i: int) -> np.ndarray:
        row = np.asarray(self.columns["similar"][i])
        return row[row >= 0]

    def codes(self, i: int) -> np.ndarray:  # pragma: no cover - each format overrides
        raise NotImplementedError

    def meta(self, i: int) -> Utterance:  # pragma: no cover
        raise NotImplementedError

    def close(self) -> None:
        pass


class FolderDataset(Dataset):
    def codes(self, i: int) -> np.ndarray:
        npy, _ = utterance_paths(self.path, self.uid(i))
        try:
            return np.load(npy)
        except (OSError, ValueError) as exc:
            raise DatasetError(
                f"cannot read codes of {self.uid(i)} from {npy} ({exc})", "re-run `valle prepare` to redo it"
            ) from None

    def meta(self, i: int) -> Utterance:
        _, meta = utterance_paths(self.path, self.uid(i))
        return Utterance.from_json(meta.read_text(encoding="utf-8"))


class H5Dataset(Dataset):
    def __init__(self, path: Path, handle: Any, header: dict, columns: dict[str, np.ndarray]):
        super().__init__(path, header, columns)
        self._h5 = handle

    def codes(self, i: int) -> np.ndarray:
        o = self.columns["code_offsets"]
        return self._h5["codes"][:, o[i] : o[i + 1]]

    def meta(self, i: int) -> Utterance:
        raw = self._h5["meta"][i]
        return Utterance.from_json(raw.decode("utf-8") if isinstance(raw, bytes) else raw)

    def close(self) -> None:
        self._h5.close()


def _check_header(header: dict, where: Path) -> dict:
    if header.get("format") != FORMAT:
        raise DatasetError(f"{where} is not a valle dataset (format {header.get('format')!r})")
    if int(header.get("version", -1)) > VERSION:
        raise DatasetError(
            f"{where} is dataset format version {header.get('version')}; this valle reads up to {VERSION}",
            "upgrade valle",
        )
    return header


def open_dataset(path: str | Path) -> Dataset:
    """Open a dataset folder (with dataset.json) or an HDF5 file written by `valle prepare`."""
    p = Path(path)
    if p.is_file() and p.suffix in (".h5", ".hdf5"):
        import h5py

        try:
            handle = h5py.File(p, "r")
            header = _check_header(json.loads(handle.attrs["header"]), p)
            columns = {name: handle["index"][name][()] for name in (*COLUMNS, "code_offsets")}
            columns.update(
                {name: handle["index"][name][()] for name in DURATION_COLUMNS if name in handle["index"]}
            )
        except (OSError, KeyError) as exc:
            raise DatasetError(f"{p} is not a readable valle HDF5 dataset ({exc})", "rebuild it") from None
        return H5Dataset(p, handle, header, columns)
    head = p / "dataset.json"
    if not head.is_file():
        if (p / "utterances").is_dir():
            raise DatasetError(
                f"{p} is an unfinished `valle prepare` (no dataset.json)",
                "run the same valle prepare again to finish",
            )
        raise DatasetError(f"{p} is not a valle dataset (no dataset.json)", "make one with `valle prepare`")
    header = _check_header(json.loads(head.read_text(encoding="utf-8")), p)
    columns = {}
    for name in COLUMNS:
        f = p / "index" / f"{name}.npy"
        if not f.is_file():
            raise DatasetError(
                f"{p} lacks index/{name}.npy", "rebuild the index with `valle dataset reindex`"
            )
        columns[name] = np.load(f, mmap_mode="r")
    if all((p / "index" / f"{name}.npy").is_file() for name in DURATION_COLUMNS):
        columns.update({name: np.load(p / "index" / f"{name}.npy") for name in DURATION_COLUMNS})
    return FolderDataset(p, header, columns)
