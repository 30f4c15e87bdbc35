"""Rich progress bars fed by the engines' `(stage, done, total)` callbacks: one bar per stage, with ETA."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


def bars(console: Console, label: int = 14, transient: bool = False) -> Progress:
    """Rows of `description bar done/total elapsed eta left`."""
    return Progress(
        TextColumn(f"{{task.description:>{label}}}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
        transient=transient,
    )


@contextlib.contextmanager
def stage_progress(console: Console) -> Iterator[Callable[[str, int, int], None]]:
    with bars(console) as bar:
        tasks: dict[str, int] = {}

        def update(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total or None)
            bar.update(tasks[stage], completed=done, total=total or None)

        yield update
