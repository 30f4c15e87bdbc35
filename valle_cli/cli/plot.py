"""`valle plot RUN [RUN ...] -o plot.png`: training curves of one or more runs, overlaid; `--terminal` draws
them in the terminal instead."""

from __future__ import annotations

from pathlib import Path

import typer


def plot(
    runs: list[Path] = typer.Argument(..., help="Run folders (or metrics.jsonl files) to overlay."),
    xs: str = typer.Option("step", "--xs", help="x axis: step, tokens or time."),
    ys: list[str] = typer.Option(
        None,
        "--ys",
        help="Metrics (repeatable or space-separated): loss, acc.ar, acc.nar, loss.l3, lr, eval.loss, ... "
        "(default: loss acc.ar acc.nar lr).",
    ),
    ewm: int = typer.Option(0, "--ewm", help="Smooth with an exponentially weighted mean of span N."),
    output: Path = typer.Option(None, "--output", "-o", help="Image to write (.png, .svg, .pdf)."),
    terminal: bool = typer.Option(False, "--terminal", help="Draw in the terminal instead of a file."),
    title: str = typer.Option(None, help="Figure title."),
) -> None:
    """Plot training metrics of one or more runs (PNG or in the terminal)."""
    import shutil

    from rich.console import Console

    from valle_cli.errors import ValleError
    from valle_cli.plot import DEFAULT_YS, render_png, render_terminal, series

    metrics = [m for y in (ys or DEFAULT_YS) for m in y.replace(",", " ").split()]
    if not terminal and output is None:
        output = Path("plot.png")
    if ewm < 0:
        raise ValleError(f"--ewm must be 0 (off) or a span >= 1, got {ewm}")
    data = series(list(runs), metrics, xs, ewm)
    if terminal:
        size = shutil.get_terminal_size((100, 40))
        typer.echo(render_terminal(data, metrics, xs, size.columns, max(12 * len(metrics), size.lines - 2)))
        if output is None:
            return
    render_png(data, metrics, xs, output, title)
    points = sum(len(s.x) for s in data)
    Console(stderr=True, soft_wrap=True, highlight=False).print(
        f"{len(runs)} run(s), {len(metrics)} metric(s), {points} points -> {output}", markup=False
    )
