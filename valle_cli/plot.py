"""Training curves from run folders' `metrics.jsonl`: the engine behind `valle plot` (and the TUI's data).

A metric name is a key of the log records (`loss`, `loss.response`, `acc.l3`, `lr`, `grad_norm`,
`tokens_per_s`, ...) or one of the VALL-E aliases: `ar` means RVQ level 0 and `nar` the mean of levels 1..Q-1
present in a record, so `loss.ar`, `acc.ar`, `loss.nar`, `acc.nar` work on training records (which carry the
levels drawn that step) and on evaluation records (which carry every level). `eval.` before a name reads the
evaluation records (`eval.loss`, `eval.acc.nar`). The x axis is the optimizer step, the tokens seen, or the
wall time since the run's first record. Smoothing (`ewm`) is an exponentially weighted mean with span N, which
skips steps where the metric is missing (a level not drawn).

Matplotlib renders PNG/SVG/PDF files; plotext draws in the terminal. Both are imported only when drawing.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from valle_cli.errors import ValleError

XS = ("step", "tokens", "time")
DEFAULT_YS = ["loss", "acc.ar", "acc.nar", "lr"]
TEXT_GAP = "eval.text_gap"  # added to the default panels when a run logs it
IDENTITY_GAP = "eval.identity_gap"  # pointer models: the text gap with the utterance's own phoneme boundaries


class PlotError(ValleError):
    pass


@dataclass
class Series:
    run: str
    metric: str
    x: list[float] = field(default_factory=list)
    y: list[float] = field(default_factory=list)


def read_metrics(run: Path) -> list[dict]:
    """The records of a run folder (or a metrics.jsonl file); a torn last line (a killed run) is skipped."""
    path = run / "metrics.jsonl" if run.is_dir() else run
    if not path.is_file():
        raise PlotError(f"{run} has no metrics.jsonl", "point at a run folder written by `valle train`")
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill or still being written
        if isinstance(rec, dict) and "step" in rec:
            records.append(rec)
    return records


def metric_value(record: dict, name: str) -> float | None:
    """The value of metric `name` in one record, or None when it is not there."""
    part, _, rest = name.partition(".")
    if rest in ("ar", "nar") and part in ("loss", "acc"):
        prefix = f"{part}.l"
        levels = {
            int(k[len(prefix) :]): float(v)
            for k, v in record.items()
            if k.startswith(prefix) and k[len(prefix) :].isdigit() and isinstance(v, int | float)
        }
        values = [v for level, v in levels.items() if (level == 0) == (rest == "ar")]
        return sum(values) / len(values) if values else None
    value = record.get(name)
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def ewm(values: list[float], span: int) -> list[float]:
    """Exponentially weighted mean with span N (alpha = 2 / (N + 1)), bias-corrected like pandas' adjust=True."""
    if span <= 1:
        return list(values)
    alpha = 2.0 / (span + 1)
    num = den = 0.0
    out = []
    for v in values:
        num = (1 - alpha) * num + v
        den = (1 - alpha) * den + 1
        out.append(num / den)
    return out


def series(runs: list[Path], ys: list[str], xs: str = "step", smooth: int = 0) -> list[Series]:
    if xs not in XS:
        raise PlotError(f"unknown x axis {xs!r}", f"use one of: {', '.join(XS)}")
    out = []
    names = _labels(runs)
    for run, label in zip(runs, names, strict=True):
        records = read_metrics(run)
        t0 = records[0].get("time", 0.0) if records else 0.0
        for metric in ys:
            kind, name = ("eval", metric[5:]) if metric.startswith("eval.") else ("train", metric)
            s = Series(label, metric)
            last_x = None  # evaluation records may lack tokens/time: they sit where training last was
            for rec in records:
                x = rec.get(xs) if xs != "time" else (rec["time"] - t0 if "time" in rec else None)
                x = last_x = x if isinstance(x, int | float) else last_x
                if rec.get("kind", "train") != kind:
                    continue
                value = metric_value(rec, name)
                if value is None or x is None:
                    continue
                s.x.append(float(x))
                s.y.append(value)
            s.y = ewm(s.y, smooth) if smooth else s.y
            out.append(s)
    missing = [m for m in ys if not any(s.x for s in out if s.metric == m)]
    if len(missing) == len(ys):
        raise PlotError(
            f"none of the metrics {', '.join(ys)} is in the runs' logs",
            f"names look like: {', '.join(sorted(_known(runs))[:12])} (and ar/nar aliases: acc.ar, loss.nar)",
        )
    return out


def _labels(runs: list[Path]) -> list[str]:
    """Short distinct names for the runs: their folder names, with parents added where two clash."""
    names = [r.resolve().name if r.is_dir() else r.resolve().parent.name for r in runs]
    if len(set(names)) < len(names):
        names = [str(r) for r in runs]
    return names


def _known(runs: list[Path]) -> set[str]:
    keys: set[str] = set()
    for run in runs:
        for rec in read_metrics(run)[:200]:
            keys |= {k for k, v in rec.items() if isinstance(v, int | float) and k not in ("step", "time")}
    return keys


def _xlabel(xs: str) -> str:
    return {"step": "step", "tokens": "tokens", "time": "seconds"}[xs]


def render_png(
    all_series: list[Series], ys: list[str], xs: str, output: Path, title: str | None = None
) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from valle_cli.fsutil import atomic_path

    fmt = output.suffix.lower().lstrip(".")
    if fmt not in ("png", "svg", "pdf"):
        raise PlotError(f"cannot write {output}: unknown image format", "use a .png, .svg or .pdf file name")
    cols = 2 if len(ys) > 1 else 1
    rows = math.ceil(len(ys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.4 * cols, 3.6 * rows), squeeze=False)
    for i, metric in enumerate(ys):
        ax = axes[i // cols][i % cols]
        for s in all_series:
            if s.metric == metric and s.x:
                ax.plot(s.x, s.y, label=s.run, linewidth=1.2)
        ax.set_title(metric)
        ax.set_xlabel(_xlabel(xs))
        ax.grid(alpha=0.3)
        if metric == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        if len({s.run for s in all_series}) > 1:
            ax.legend(fontsize=8)
    for j in range(len(ys), rows * cols):
        axes[j // cols][j % cols].set_visible(False)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(output, PlotError) as tmp:
        fig.savefig(tmp, format=fmt, dpi=100)
    plt.close(fig)
    return output


def render_terminal(
    all_series: list[Series], ys: list[str], xs: str, width: int, height: int, color: bool = True
) -> str:
    """The plots as text (one panel per metric, stacked, each at least 12 rows), for `--terminal` and SSH
    sessions; `color=False` for a pipe or a file (plain characters, no escape codes)."""
    import plotext as plt

    plt.clear_figure()
    plt.limit_size(False, False)  # else plotext cuts the figure to the size it guesses for a tty (24 rows)
    rows = max(12, height // max(len(ys), 1))
    plt.plot_size(width, rows * len(ys))
    plt.subplots(len(ys), 1)
    for i, metric in enumerate(ys, 1):
        plt.subplot(i, 1)
        if not color:
            plt.theme("clear")
        plt.title(metric)
        plt.xlabel(_xlabel(xs))
        for s in all_series:
            if s.metric == metric and s.x:
                plt.plot(s.x, s.y, label=s.run if len({a.run for a in all_series}) > 1 else None)
    text = plt.build()
    plt.clear_figure()
    return text
