"""`valle plot`: metric aliases, smoothing math, several runs overlaid in a PNG whose panels really hold both
runs' curves, terminal drawing, and clear errors."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from valle_cli.plot import PlotError, ewm, metric_value, read_metrics, series


def write_run(folder, scale: float, steps: int = 120, torn: bool = False):
    """A run folder whose metrics.jsonl looks like training's: one drawn level per step, evals every 40."""
    folder.mkdir(parents=True)
    lines = []
    for step in range(1, steps + 1):
        level = step % 8
        rec = {"step": step, "kind": "train", "loss": scale * math.exp(-step / 40) + 0.1, "lr": 1e-3,
               "tokens": 200 * step, "time": 1000.0 + 0.5 * step, f"acc.l{level}": min(1.0, step / steps / scale)}  # fmt: skip
        lines.append(json.dumps(rec))
        if step % 40 == 0:
            ev = {"step": step, "kind": "eval", "loss": scale * math.exp(-step / 40),  # as training writes them
                  **{f"acc.l{q}": 0.5 + q / 100 for q in range(8)}}  # fmt: skip
            lines.append(json.dumps(ev))
    text = "\n".join(lines) + "\n"
    if torn:
        text += '{"step": 121, "kind": "tra'  # a run killed while writing
    (folder / "metrics.jsonl").write_text(text)
    return folder


def test_aliases_and_smoothing():
    rec = {"acc.l0": 0.2, "acc.l1": 0.4, "acc.l5": 0.8, "loss": 3.0, "lr": float("nan")}
    assert metric_value(rec, "acc.ar") == 0.2
    assert metric_value(rec, "acc.nar") == pytest.approx(0.6)  # mean of the NAR levels present
    assert metric_value(rec, "loss.nar") is None and metric_value(rec, "lr") is None  # absent / not finite
    assert ewm([5.0, 5.0, 5.0], 10) == [5.0, 5.0, 5.0]
    alpha = 2 / 4
    assert ewm([0.0, 1.0], 3) == [
        0.0,
        pytest.approx(1.0 / (1 + (1 - alpha))),
    ]  # bias-corrected: (0*a' + 1) / (a' + 1)
    assert ewm([1.0, 2.0], 0) == [1.0, 2.0]


def test_series_axes_eval_and_torn_lines(tmp_path):
    run = write_run(tmp_path / "a", 2.0, torn=True)
    assert len(read_metrics(run)) == 123  # 120 train + 3 eval, the torn line skipped
    by = {s.metric: s for s in series([run], ["loss", "eval.acc.nar", "acc.ar"], "tokens")}
    assert by["loss"].x[:2] == [200.0, 400.0] and len(by["loss"].y) == 120
    assert by["eval.acc.nar"].x == [8000.0, 16000.0, 24000.0]
    assert by["eval.acc.nar"].y[0] == pytest.approx(np.mean([0.5 + q / 100 for q in range(1, 8)]))
    assert len(by["acc.ar"].x) == 15  # level 0 drawn on every 8th step only
    t = series([run], ["loss"], "time")[0]
    assert t.x[0] == 0.0 and t.x[-1] == pytest.approx(59.5)
    with pytest.raises(PlotError, match="none of the metrics"):
        series([run], ["bogus"], "step")
    with pytest.raises(PlotError, match="unknown x axis"):
        series([run], ["loss"], "epoch")
    with pytest.raises(PlotError, match="has no metrics.jsonl"):
        series([tmp_path / "nothing"], ["loss"])


def valle(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "valle_cli.cli.app", *args],
        capture_output=True, text=True, timeout=120, cwd=cwd, stdin=subprocess.DEVNULL,
        env={**os.environ, "COLUMNS": "100", "LINES": "40"},
    )  # fmt: skip


def test_png_overlays_runs_in_every_panel(tmp_path):
    import matplotlib.image as mpimg

    a, b = write_run(tmp_path / "base", 2.0), write_run(tmp_path / "finetune", 1.0)
    out = tmp_path / "plot.png"
    proc = valle("plot", str(a), str(b), "--ys", "loss acc.nar", "--ewm", "5", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "2 run(s), 2 metric(s)" in proc.stderr
    img = mpimg.imread(out)[..., :3]  # (H, W, 3) floats
    assert img.shape[:2] == (360, 1280)  # two panels side by side, 6.4 x 3.6 inches each at 100 dpi
    blue, orange = np.array([31, 119, 180]) / 255, np.array([255, 127, 14]) / 255  # matplotlib's first two
    for panel in (img[:, :640], img[:, 640:]):
        for colour in (blue, orange):
            assert (np.abs(panel - colour).max(-1) < 0.08).sum() > 200  # each run's curve is drawn here


def test_terminal_and_errors(tmp_path):
    run = write_run(tmp_path / "r", 2.0)
    proc = valle("plot", str(run), "--terminal", "--ys", "loss lr acc.ar")  # piped: plain text, whole panels
    assert proc.returncode == 0, proc.stderr
    assert "loss" in proc.stdout and "step" in proc.stdout and any(ch in proc.stdout for ch in "▀▄█▌▐")
    assert "\x1b" not in proc.stdout  # no colour codes into a file
    lines = proc.stdout.splitlines()
    tops = [k for k, line in enumerate(lines) if "┌" in line]
    bottoms = [k for k, line in enumerate(lines) if "└" in line]
    assert len(tops) == len(bottoms) == 3 and all(b - t >= 8 for t, b in zip(tops, bottoms, strict=True)), (
        lines
    )
    proc = valle("plot", str(run), "--ys", "loss.bogus", "-o", str(tmp_path / "x.png"))
    assert proc.returncode == 1 and "none of the metrics" in proc.stderr and "Traceback" not in proc.stderr
    proc = valle("plot", str(run), "-o", str(tmp_path / "x.jpg"))
    assert proc.returncode == 1 and "unknown image format" in proc.stderr


def test_default_panels_add_the_text_gaps_a_run_logs(tmp_path):
    run = write_run(tmp_path / "classic", 2.0)
    proc = valle("plot", str(run), "-o", str(tmp_path / "a.png"))
    assert proc.returncode == 0 and "4 metric(s)" in proc.stderr, proc.stderr
    pointer = tmp_path / "pointer"
    pointer.mkdir()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        if r["kind"] == "eval":
            r.update(text_gap=r["step"] / 1000, identity_gap=r["step"] / 2000)
    (pointer / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = valle("plot", str(pointer), "-o", str(tmp_path / "b.png"))
    assert proc.returncode == 0 and "6 metric(s)" in proc.stderr, proc.stderr
