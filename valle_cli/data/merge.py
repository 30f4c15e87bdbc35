"""Joining dataset folders (shards of one corpus made on several machines) and rebuilding an index."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from valle_cli.data.dataset import finished_utterances, utterance_paths, write_index
from valle_cli.errors import DatasetError
from valle_cli.prepare.pipeline import _fill_similar

Progress = Callable[[str, int, int], None]


def _settings(folder: Path) -> dict:
    path = folder / "prepare.json"
    if not path.is_file():
        raise DatasetError(f"{folder} is not a `valle prepare` output (no prepare.json)")
    return json.loads(path.read_text())


def reindex(folder: Path, top_k: int = 8, progress: Progress | None = None, align: bool = True) -> int:
    """Rebuild index/ and dataset.json from the utterance files (after deleting some, or after a merge), and
    with `align` the phoneme durations (prepare/align.py)."""
    from valle_cli.text import default_symbol_map

    settings = _settings(folder)
    utts = finished_utterances(folder)
    if not utts:
        raise DatasetError(f"{folder} has no finished utterances")
    _fill_similar(folder, utts, int(settings["codec"]["codebook_size"]), top_k, progress or (lambda *_: None))
    header = {"codec": settings["codec"], "created_by": settings.get("created_by", "?"), "shard": []}
    write_index(folder, utts, header, default_symbol_map(int(settings["symbols_version"])))
    if align:
        from valle_cli.prepare.align import align_dataset

        align_dataset(folder, progress=progress)
    return len(utts)


def merge_datasets(inputs: list[Path], output: Path, top_k: int = 8, progress: Progress | None = None) -> int:
    """Copy (hard-link where possible) the utterances of several prepare outputs into one and index it."""
    if not inputs:
        raise DatasetError("nothing to merge", "name the shard folders to join")
    settings = [_settings(p) for p in inputs]
    for p, s in zip(inputs[1:], settings[1:], strict=True):
        if s["codec"] != settings[0]["codec"] or s["symbols_version"] != settings[0]["symbols_version"]:
            raise DatasetError(
                f"{p} was prepared with another codec or symbol map than {inputs[0]}",
                "merge only matching shards",
            )
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise DatasetError(
            f"{output} already exists and is not empty", "merge into a new folder (or remove that one first)"
        )
    seen: dict[str, Path] = {}
    todo = []
    for folder in inputs:  # every check before anything is written
        utts = finished_utterances(folder)
        for u in utts:
            if u.uid in seen:
                raise DatasetError(
                    f"utterance {u.uid} is in both {seen[u.uid]} and {folder}", "merge distinct shards"
                )
            seen[u.uid] = folder
        todo.append((folder, utts))
    # built beside the output and renamed into place: a failed or interrupted merge leaves no half a dataset
    stage = output.parent / f".{output.name}.merging"
    shutil.rmtree(stage, ignore_errors=True)  # what a killed earlier merge left
    try:
        stage.mkdir(parents=True)
        (stage / "prepare.json").write_text(json.dumps(settings[0], indent=1))
        for folder, utts in todo:
            for n, u in enumerate(utts):
                for src, dst in zip(
                    utterance_paths(folder, u.uid), utterance_paths(stage, u.uid), strict=True
                ):
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    try:
                        os.link(src, dst)
                    except OSError:
                        shutil.copy2(src, dst)
                if progress:
                    progress(f"merge {folder.name}", n + 1, len(utts))
        count = reindex(stage, top_k, progress)
        if output.is_dir():
            output.rmdir()  # empty (checked above)
        stage.rename(output)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return count
