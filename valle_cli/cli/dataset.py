"""`valle dataset`: inspect, convert, merge and re-index datasets made by `valle prepare`."""

from __future__ import annotations

import json
from pathlib import Path

import typer

app = typer.Typer(no_args_is_help=True, rich_markup_mode=None)


@app.command("stats", short_help="Hours per group and speaker, durations, phonemes.")
def stats(
    dataset: Path = typer.Argument(..., help="Dataset folder or .h5 file."),
    as_json: bool = typer.Option(False, "--json", help="Print the figures as JSON."),
    top: int = typer.Option(20, help="Show this many speakers and symbols."),
) -> None:
    """Hours per group and speaker, duration histogram, phoneme coverage."""
    from dataclasses import asdict

    from rich.console import Console
    from rich.table import Table

    from valle_cli.data.dataset import open_dataset
    from valle_cli.data.stats import dataset_stats

    ds = open_dataset(dataset)
    s = dataset_stats(ds)
    ds.close()
    if as_json:
        typer.echo(json.dumps(asdict(s), indent=1, ensure_ascii=False))
        return
    con = Console(soft_wrap=True, highlight=False)
    con.print(
        f"{dataset}: {s.utterances} utterances, {s.hours:.2f} h, {len(s.hours_per_speaker)} speakers, "
        f"{len(s.hours_per_group)} groups, languages {', '.join(f'{k} ({v})' for k, v in s.languages.items())}",
        markup=False,
    )
    t = Table(title="hours per group")
    t.add_column("group")
    t.add_column("hours", justify="right")
    for g, h in s.hours_per_group.items():
        t.add_row(g, f"{h:.3f}")
    con.print(t)
    t = Table(title=f"speakers (top {top} by hours)")
    for col in ("speaker", "utterances", "hours"):
        t.add_column(col, justify="right" if col != "speaker" else "left")
    for sp, h in sorted(s.hours_per_speaker.items(), key=lambda kv: -kv[1])[:top]:
        t.add_row(sp, str(s.utterances_per_speaker[sp]), f"{h:.3f}")
    con.print(t)
    con.print(
        f"durations: min {s.duration_min:.2f} s, median {s.duration_median:.2f} s, max {s.duration_max:.2f} s",
        markup=False,
    )
    peak = max(s.duration_counts, default=1) or 1
    for lo, hi, c in zip(s.duration_edges[:-1], s.duration_edges[1:], s.duration_counts, strict=True):
        con.print(f"  {lo:6.2f}-{hi:6.2f} s {'#' * round(40 * c / peak):40s} {c}", markup=False)
    con.print(
        f"phoneme coverage: {s.symbols_used} of {s.symbols_total} symbols used, {s.unknown_symbols} unknown; "
        "most frequent: "
        + " ".join(f"{k.replace(' ', '␣')}:{v}" for k, v in list(s.symbol_counts.items())[:top]),
        markup=False,
    )


@app.command("to-hdf5")
def to_hdf5(
    dataset: Path = typer.Argument(..., help="Dataset folder."),
    output: Path = typer.Option(None, "--output", "-o", help="HDF5 file (default: DATASET.h5)."),
) -> None:
    """Convert a dataset folder into one HDF5 file."""
    from rich.console import Console

    from valle_cli.cli.progress import stage_progress
    from valle_cli.data.hdf5 import folder_to_hdf5

    con = Console(stderr=True)
    with stage_progress(con) as progress:
        out = folder_to_hdf5(
            dataset, output or dataset.with_suffix(".h5"), lambda d, t: progress("hdf5", d, t)
        )
    con.print(f"wrote {out}", markup=False)


@app.command("merge", short_help="Join the shards of `valle prepare --shard` runs.")
def merge(
    shards: list[Path] = typer.Argument(..., help="Folders made with valle prepare --shard i/n."),
    output: Path = typer.Option(..., "--output", "-o", help="Joined dataset folder."),
    top_k: int = typer.Option(8, help="Similar utterances kept per utterance."),
) -> None:
    """Join the outputs of several `valle prepare --shard` runs into one dataset."""
    from rich.console import Console

    from valle_cli.cli.progress import stage_progress
    from valle_cli.data.merge import merge_datasets

    con = Console(stderr=True)
    with stage_progress(con) as progress:
        n = merge_datasets(shards, output, top_k, progress)
    con.print(f"merged {n} utterances into {output}", markup=False)


@app.command("reindex", short_help="Rebuild the index and similar-utterance lists.")
def reindex(
    dataset: Path = typer.Argument(..., help="Dataset folder."),
    top_k: int = typer.Option(8, help="Similar utterances kept per utterance."),
    align: bool = typer.Option(
        True, "--align/--no-align", help="Redo the phoneme durations (a few minutes)."
    ),
) -> None:
    """Rebuild the index and similar lists from the utterance files (e.g. after deleting some)."""
    from rich.console import Console

    from valle_cli.cli.progress import stage_progress
    from valle_cli.data.merge import reindex as run_reindex

    con = Console(stderr=True)
    with stage_progress(con) as progress:
        n = run_reindex(dataset, top_k, progress, align=align)
    con.print(f"indexed {n} utterances in {dataset}", markup=False)


@app.command("align", short_help="Give every frame its phoneme (the dataset's aligner).")
def align(
    dataset: Path = typer.Argument(..., help="Dataset folder."),
    steps: int = typer.Option(None, help="Training steps of the aligner (default: by the dataset's size)."),
) -> None:
    """Give every frame its phoneme: train the dataset's own aligner and write the phoneme durations that
    pointer models (model.alignment=pointer) train on. `valle prepare` does this by itself."""
    from rich.console import Console

    from valle_cli.cli.progress import stage_progress
    from valle_cli.data.dataset import open_dataset
    from valle_cli.errors import DatasetError
    from valle_cli.fsutil import lock_folder
    from valle_cli.prepare.align import align_dataset

    if steps is not None and steps < 1:
        raise DatasetError(
            f"--steps must be at least 1, got {steps}", "leave it out to size it by the dataset"
        )
    if dataset.is_file():
        raise DatasetError(
            f"{dataset} is an HDF5 file; durations are written into a dataset folder",
            "align the folder it was made from, then convert it again with `valle dataset to-hdf5`",
        )
    open_dataset(dataset).close()  # a clear error for what is not a finished dataset
    con = Console(stderr=True, highlight=False)
    with lock_folder(dataset, "valle dataset align", DatasetError), stage_progress(con) as progress:
        a = align_dataset(dataset, steps=steps, progress=progress)
    con.print(
        f"phoneme durations: {a['aligned']} aligned, {a['unaligned']} too short to align "
        f"(aligner: {a['steps']} steps, loss {a['loss']}, {a['seconds']:.0f} s) -> {dataset / 'index'}",
        markup=False,
    )
