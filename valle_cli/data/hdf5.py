"""Converting a dataset folder into one HDF5 file (same header, same index, codes concatenated)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from valle_cli.data.dataset import COLUMNS, DURATION_COLUMNS, FolderDataset, open_dataset
from valle_cli.errors import DatasetError
from valle_cli.fsutil import atomic_path


def folder_to_hdf5(folder: Path, out: Path, progress: Callable[[int, int], None] | None = None) -> Path:
    """Write `out` (.h5) from a finished dataset folder, atomically."""
    import h5py

    ds = open_dataset(folder)
    if not isinstance(ds, FolderDataset):
        raise DatasetError(f"{folder} is not a dataset folder")
    n = len(ds)
    frames = np.asarray(ds.columns["frames"], dtype=np.int64)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(frames, out=offsets[1:])
    levels = ds.codes(0).shape[0] if n else int(ds.header["codec"]["n_codebooks"])
    with atomic_path(out, DatasetError) as tmp, h5py.File(tmp, "w") as h5:
        h5.attrs["header"] = json.dumps(ds.header, ensure_ascii=False)
        index = h5.create_group("index")
        for name in COLUMNS + (DURATION_COLUMNS if ds.has_durations else ()):
            index.create_dataset(name, data=np.asarray(ds.columns[name]))
        index.create_dataset("code_offsets", data=offsets)
        codes = h5.create_dataset(
            "codes",
            shape=(levels, int(offsets[-1])),
            dtype=np.uint16,
            chunks=(levels, 4096) if offsets[-1] >= 4096 else None,
            compression="lzf" if offsets[-1] else None,
        )
        meta = h5.create_dataset("meta", shape=(n,), dtype=h5py.string_dtype("utf-8"))
        for i in range(n):
            c = ds.codes(i)
            if c.shape != (levels, frames[i]):
                raise DatasetError(
                    f"codes of {ds.uid(i)} have shape {c.shape}; the index says {(levels, frames[i])}"
                )
            codes[:, offsets[i] : offsets[i + 1]] = c
            meta[i] = ds.meta(i).to_json()
            if progress:
                progress(i + 1, n)
    return out
