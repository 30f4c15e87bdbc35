"""`valle plot RUN [RUN ...] -o plot.png`: training curves of one or more runs, overlaid; `--terminal` draws
them in the terminal instead. `valle plot --alignment RUN_OR_MODEL --text ... --ref ...`: the model says the
text and the attention of its frames over the text is drawn (valle_cli/alignment.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import typer


def plot(
    runs: list[Path] = typer.Argument(None, help="Run folders (or metrics.jsonl files) to overlay."),
    xs: str = typer.Option("step", "--xs", help="x axis: step, tokens or time."),
    ys: list[str] = typer.Option(
        None,
        "--ys",
        help="Metrics (repeatable or space-separated): loss, acc.ar, acc.nar, loss.l3, lr, eval.loss, "
        "eval.text_gap, ... (default: loss acc.ar acc.nar lr, and eval.text_gap when the runs log it).",
    ),
    ewm: int = typer.Option(0, "--ewm", help="Smooth with an exponentially weighted mean of span N."),
    output: Path = typer.Option(None, "--output", "-o", help="Image to write (.png, .svg, .pdf)."),
    terminal: bool = typer.Option(False, "--terminal", help="Draw in the terminal instead of a file."),
    title: str = typer.Option(None, help="Figure title."),
    alignment: str = typer.Option(
        None,
        "--alignment",
        help="Instead of curves: a run folder, checkpoint or model says --text in the voice of --ref, and "
        "the attention of its frames over the text is drawn (one panel per layer).",
    ),
    text: str = typer.Option(None, "--text", help="What the model says, with --alignment."),
    ref: list[Path] = typer.Option(None, "--ref", help="Reference clip(s) of the voice, with --alignment."),
    ar_temp: float = typer.Option(0.0, "--ar-temp", help="AR temperature, with --alignment (0: greedy)."),
    seed: int = typer.Option(0, "--seed", help="Sampling seed, with --alignment."),
    max_ar_steps: int = typer.Option(1500, "--max-ar-steps", help="Frame limit, with --alignment."),
) -> None:
    """Plot training metrics of one or more runs (PNG or in the terminal), or a model's alignment."""
    import shutil

    from rich.console import Console

    from valle_cli.errors import ValleError
    from valle_cli.plot import (
        DEFAULT_YS,
        IDENTITY_GAP,
        TEXT_GAP,
        read_metrics,
        render_png,
        render_terminal,
        series,
    )

    if alignment is not None:
        if runs:
            raise ValleError(
                "--alignment plots one model; runs to overlay were given too", "drop one of them"
            )
        _alignment(
            alignment,
            text,
            list(ref or []),
            output or Path("alignment.png"),
            ar_temp,
            seed,
            max_ar_steps,
            title,
        )
        return
    if not runs:
        raise ValleError("nothing to plot", "name run folders (valle plot RUN ...) or use --alignment MODEL")

    metrics = [m for y in (ys or DEFAULT_YS) for m in y.replace(",", " ").split()]
    if not ys:
        logged = {k for run in runs for r in read_metrics(run) for k in r}
        # the first thing to watch: does the model use its text? (identity_gap: pointer models' control)
        metrics += [m for m in (TEXT_GAP, IDENTITY_GAP) if m.removeprefix("eval.") in logged]
    if not terminal and output is None:
        output = Path("plot.png")
    if ewm < 0:
        raise ValleError(f"--ewm must be 0 (off) or a span >= 1, got {ewm}")
    data = series(list(runs), metrics, xs, ewm)
    if terminal:
        size = shutil.get_terminal_size((100, 40))
        tty = sys.stdout.isatty()
        typer.echo(
            render_terminal(data, metrics, xs, size.columns, max(12 * len(metrics), size.lines - 2), tty)
        )
        if output is None:
            return
    render_png(data, metrics, xs, output, title)
    points = sum(len(s.x) for s in data)
    Console(stderr=True, soft_wrap=True, highlight=False).print(
        f"{len(runs)} run(s), {len(metrics)} metric(s), {points} points -> {output}", markup=False
    )


def _alignment(
    source: str, text: str | None, refs: list[Path], output: Path, ar_temp, seed, max_ar_steps, title
) -> None:
    from rich.console import Console

    from valle_cli.alignment import alignment_maps, check_reports_attention, render_alignment
    from valle_cli.errors import ValleError
    from valle_cli.infer.engine import SamplingConfig, generate_batch
    from valle_cli.infer.load import load_model
    from valle_cli.infer.synth import Segment, SynthOptions, _Speaker
    from valle_cli.model.valle import Sample

    if not text or not text.strip():
        raise ValleError("--alignment needs --text: what the model should say", 'add --text "Hello there."')
    con = Console(stderr=True, soft_wrap=True, highlight=False)
    loaded = load_model(source)
    check_reports_attention(loaded.model)
    sp = _Speaker(loaded, refs, SynthOptions(), "cpu")
    req = sp.request(Segment(text.strip(), 0, 0.0))
    con.print(f"generating {text.strip()!r} with {source} ...", markup=False)
    sc = SamplingConfig(ar_temp=ar_temp, seed=seed, max_ar_steps=max_ar_steps)
    out = generate_batch(loaded.model, [req], sc)[0]
    if not out.codes.shape[1]:
        raise ValleError("the model produced no frames: nothing to plot", "try --ar-temp 1.0")
    sample = Sample(req.phonemes, req.prompt, out.codes, 0, req.language, frame_symbols=out.frame_symbols)
    am = alignment_maps(loaded.model, sample, sp.symbols.symbols)
    seconds = out.codes.shape[1] / sp.codec.frame_rate
    render_alignment(am, output, title or f"{text.strip()[:70]} ({seconds:.2f} s)")
    con.print(
        f"{out.codes.shape[1]} frames ({seconds:.2f} s, {'stopped' if out.stopped else 'hit the step limit'}), "
        f"{len(am.symbols)} symbols, best layer focus {am.focus().max():.2f} -> {output}",
        markup=False,
    )
