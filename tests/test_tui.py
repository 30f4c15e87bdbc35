"""`valle tui` driven headless (App.run_test + Pilot) against real tiny CPU trainings: one it starts as a child
process and steers (curves update, lr reaches the optimizer, save writes a checkpoint, pause, leave while
training goes on, attach again and stop it cleanly), a finished run viewed read-only, a training that outlives
a killed parent, and the run-folder reading underneath."""

from __future__ import annotations

import asyncio
import html
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from valle_cli.config import load_config
from valle_cli.errors import ConfigError
from valle_cli.train.checkpoint import list_checkpoints
from valle_cli.train.control import ControlClient
from valle_cli.train.trainer import Trainer
from valle_cli.tui.app import TrainingApp
from valle_cli.tui.screens import ChoiceDialog, Dashboard, LrDialog
from valle_cli.tui.screens.dialogs import LrValue
from valle_cli.tui.source import History, RunFiles, TuiError, human_bytes, human_seconds, resolve_target
from valle_cli.tui.widgets import CheckpointList, Curves

from .conftest import needs_espeak

SNAPSHOT = Path(__file__).resolve().parent.parent / "docs" / "tui.svg"


def endless(dataset) -> list[str]:
    return [f"data.paths=[{dataset}]", "data.batch_size=2", "train.steps=100000", "train.warmup_steps=0",
            "train.schedule=constant", "train.eval_every=100000", "train.save_every=100000"]  # fmt: skip


def drive(app, scenario, size=(80, 24)) -> None:
    async def main():
        async with app.run_test(size=size) as pilot:
            await scenario(pilot)

    asyncio.run(main())


async def until(pilot, predicate, timeout: float = 120.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        await pilot.pause(0.1)
    raise AssertionError(f"timed out waiting for {what or predicate}")


def log_text(screen) -> str:
    from textual.widgets import RichLog

    return "\n".join(line.text for line in screen.query_one("#log", RichLog).lines)


def metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.endswith("}")]


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def wait_gone(pid: int, timeout: float = 90.0) -> None:
    deadline = time.time() + timeout
    while alive(pid) and time.time() < deadline:
        time.sleep(0.1)
    assert not alive(pid), f"process {pid} still running"


@pytest.fixture
def reaper():
    """Pids to kill at teardown: a failing test must not leave an endless training behind."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


@needs_espeak
def test_tui_starts_training_steers_it_and_leaves_it_running(dataset, tmp_path, reaper, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative run folder, as users type it (and as the snapshot shows it)
    run = Path("runs/demo")
    app = TrainingApp.open(resolve_target("tiny", endless(dataset), run))

    async def steer(pilot):
        dash = app.screen
        assert isinstance(dash, Dashboard)
        await until(pilot, lambda: dash.state == "running" and len(dash.history.train) >= 3, what="running")
        curves = dash.query_one(Curves)
        await until(pilot, lambda: curves.points > 0, what="a curve")
        drawn = curves.points
        await until(pilot, lambda: curves.points > drawn, what="the curve to grow")
        assert "l0" in str(dash.query_one("#legend").render())

        # lr: a bad value is refused in the dialog; a good one reaches the optimizer
        await pilot.press("l")
        assert isinstance(app.screen, LrDialog)
        await pilot.press(*"abc", "enter")
        assert isinstance(app.screen, LrDialog)
        assert "not a number" in str(app.screen.query_one("#lr-error").render())
        await pilot.press("backspace", "backspace", "backspace", *"0.0042", "enter")
        assert isinstance(app.screen, Dashboard)
        await until(pilot, lambda: metrics(run)[-1]["lr"] == pytest.approx(0.0042), what="lr in metrics")
        await until(pilot, lambda: "lr 0.0042: done" in log_text(dash), what="the lr reply")

        # save (a button click) writes a checkpoint, and the list shows it
        await pilot.click("#do-save")
        await until(pilot, lambda: list_checkpoints(run), what="a checkpoint")
        saved = list_checkpoints(run)[-1].name
        await until(
            pilot, lambda: saved in dash.query_one(CheckpointList).names, what="the checkpoint listed"
        )
        await until(pilot, lambda: "saved " in log_text(dash), what="train.log's save line")

        # pause and resume
        await pilot.press("p")
        await until(pilot, lambda: dash.state == "paused", what="paused")
        step = dash.status["step"]
        await pilot.pause(1.0)
        assert dash.status["step"] == step
        await pilot.press("p")
        await until(pilot, lambda: dash.state == "running" and dash.status["step"] > step, what="resumed")

        await pilot.press("c")
        assert curves.family == "acc" and "accuracy" in dash.query_one("#chart").border_title
        await pilot.press("c")
        await pilot.pause(0.6)
        svg = app.export_screenshot(title="valle tui")
        text = html.unescape(svg).replace("\xa0", " ")
        assert "<svg" in svg and "checkpoints" in text and "loss per RVQ level" in text
        if os.environ.get("VALLE_UPDATE_SNAPSHOTS"):
            SNAPSHOT.write_text(svg)

        # leave (q, then q again: the leave question's answer to q is "leave"): training keeps going
        await pilot.press("q")
        assert isinstance(app.screen, ChoiceDialog)
        await pilot.press("q")

    try:
        drive(app, steer)
    finally:
        if app.child is not None:
            reaper.append(app.child.pid)
    assert app.return_value == "left"
    child = app.child
    time.sleep(1.0)
    assert child.poll() is None  # still training without the TUI
    before = metrics(run)[-1]["step"]

    # attach again, stop training from the dialog, and see it end cleanly
    again = TrainingApp.open(resolve_target(str(run)))

    async def stop(pilot):
        dash = again.screen
        await until(pilot, lambda: dash.state == "running", what="attached")
        await until(pilot, lambda: dash.history.last.get("step", 0) > before, what="new steps after leaving")
        await pilot.press("k")
        assert isinstance(again.screen, ChoiceDialog)
        await pilot.press("q")  # backs out of the question, not out of the TUI
        assert again.screen is dash and dash.state == "running"
        await pilot.press("k")
        assert isinstance(again.screen, ChoiceDialog)
        await pilot.click("#stop")
        await until(pilot, lambda: dash.state in ("not running", "finished"), what="stopped")
        assert "> quit: done" in log_text(dash)
        await pilot.press("s")  # nothing to talk to any more: said plainly
        await until(pilot, lambda: "cannot save" in log_text(dash), what="the refusal")
        await pilot.press("q")  # not live: leaves at once

    drive(again, stop)
    assert again.return_value is None
    assert child.wait(timeout=60) == 0
    last = metrics(run)[-1]["step"]
    assert list_checkpoints(run)[-1].name == f"step-{last:08d}"  # quit saved the last step
    assert not (run / "control.json").exists()
    assert "stopped at step" in (run / "train.log").read_text()


@needs_espeak
def test_tui_views_a_finished_run(dataset, tmp_path):
    cfg = load_config(
        "tiny",
        [f"data.paths=[{dataset}]", "data.batch_size=2", "data.val_fraction=0.3", "train.steps=6",
         "train.eval_every=3", "train.eval_samples=0"],
    )  # fmt: skip
    run = tmp_path / "done"
    Trainer(cfg, run).train()
    app = TrainingApp.open(resolve_target(str(run)))

    async def view(pilot):
        dash = app.screen
        await until(pilot, lambda: dash.state == "finished", what="finished")
        curves = dash.query_one(Curves)
        await until(pilot, lambda: curves.points >= 6, what="curves of all steps")
        assert "step-00000006" in dash.query_one(CheckpointList).names
        assert "training from step 0 to 6" in log_text(dash) and "eval at step 3" in log_text(dash)
        await pilot.press("l")  # commands are refused: no dialog opens
        assert isinstance(app.screen, Dashboard)
        assert "cannot set lr: training is finished" in log_text(dash)
        await pilot.press("q")

    drive(app, view, size=(120, 40))
    assert app.return_value is None


def test_a_training_that_fails_to_start_shows_why(tmp_path):
    app = TrainingApp.open(resolve_target("tiny", [f"data.paths=[{tmp_path / 'nowhere'}]"], tmp_path / "run"))

    async def view(pilot):
        dash = app.screen
        await until(pilot, lambda: dash.state.startswith("exited ("), what="the child's exit")
        assert "nowhere" in log_text(dash) and "training exited with code" in log_text(dash)
        await pilot.press("q")

    drive(app, view)
    assert app.child.returncode != 0


@needs_espeak
def test_leaving_or_stopping_while_training_starts(dataset, tmp_path, reaper):
    """Before its control socket exists, a starting training can be left running or stopped (by signal)."""
    app = TrainingApp.open(resolve_target("tiny", endless(dataset), tmp_path / "run"))
    reaper.append(app.child.pid)

    async def leave_then_stop(pilot):
        dash = app.screen
        assert dash.state == "starting"
        await pilot.press("q")
        assert isinstance(app.screen, ChoiceDialog)
        await pilot.click("#stop")

    drive(app, leave_then_stop)
    assert app.return_value == "stopped"
    assert app.child.wait(timeout=60) != 0 or list_checkpoints(
        tmp_path / "run"
    )  # stopped, one way or the other
    assert not (tmp_path / "run" / "control.json").exists()


@needs_espeak
def test_started_training_outlives_a_killed_parent(dataset, tmp_path, reaper):
    run = tmp_path / "run"
    code = (
        "import os, signal, sys\n"
        "from valle_cli.tui.source import launch, resolve_target\n"
        f"proc = launch(resolve_target('tiny', {endless(dataset)!r}, {str(run)!r}))\n"
        "print(proc.pid, flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    parent = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert parent.returncode == -signal.SIGKILL
    pid = int(parent.stdout.split()[0])
    reaper.append(pid)
    deadline = time.time() + 120
    while not (run / "control.json").exists() and time.time() < deadline:
        time.sleep(0.2)
    with ControlClient(run) as c:
        assert c.request("status")["ok"]
        assert c.request("quit")["ok"]
    wait_gone(pid)
    assert list_checkpoints(run)


def test_run_files_read_only_what_is_new(tmp_path):
    files = RunFiles(tmp_path)
    assert files.new_records() == [] and files.checkpoints_if_changed() == []
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')  # the second line is still being written
    assert [r["step"] for r in files.new_records()] == [1]
    with open(path, "a") as f:
        f.write('ss": 1.5}\nnot json\n{"step": 3, "loss": 1.0}\n')
    assert [r["step"] for r in files.new_records()] == [2, 3]
    assert files.new_records() == []
    path.write_text('{"step": 1, "loss": 9.0}\n')  # replaced by a shorter file: read from the start
    assert files.new_records()[0]["loss"] == 9.0
    (tmp_path / "step-00000004").mkdir()
    assert [c.step for c in files.checkpoints_if_changed()] == [4]
    assert files.checkpoints_if_changed() is None  # unchanged
    (tmp_path / "config.yaml").write_text("train:\n  steps: 40\n")
    assert files.read_total_steps() == 40


def test_history_levels_resume_and_eta():
    h = History()
    rows = [
        {"step": s, "time": 100.0 + 2 * s, "loss.l0": 5.0 - s / 10, f"loss.l{1 + s % 3}": 4.0}
        for s in range(1, 11)
    ]
    h.add([*rows, {"step": 10, "kind": "eval", "loss": 3.0}])
    assert h.levels("loss") == ["l0", "l1", "l2", "l3"] and h.levels("acc") == []
    assert h.curves["loss.l0"].steps == [float(s) for s in range(1, 11)]
    assert h.curves["loss.l0"].smoothed[0] == pytest.approx(4.9)  # bias-corrected: the first value itself
    assert h.seconds_per_step() == pytest.approx(2.0)
    assert h.eta_seconds(110) == pytest.approx(200.0)
    h.add([{"step": 8, "time": 500.0, "loss.l0": 1.0}])  # resumed from a step-7 checkpoint: no fold-back
    assert [r["step"] for r in h.train] == list(range(1, 9)) and h.last["loss.l0"] == 1.0
    assert h.evals == []  # the evaluation at step 10 belonged to the abandoned future
    assert h.curves["loss.l0"].steps[-1] == 8.0 and len(h.curves["loss.l0"].steps) == 8
    old = History()  # a run logged before per-level losses: the overall loss is drawn
    old.add([{"step": s, "loss": 3.0, "kind": "train"} for s in range(1, 5)])
    assert old.lines("loss") == [("all", "loss")] and old.lines("acc") == []
    long = History(smooth=1)
    long.add([{"step": s, "loss.l0": float(s)} for s in range(1, 100_001)])
    xs, ys = long.curves["loss.l0"].points(100)
    assert len(xs) == 100 and xs[0] == pytest.approx(500.5) and ys[-1] == pytest.approx(99_500.5)
    assert human_seconds(3725) == "1h 02m" and human_seconds(None) == "-"
    assert human_bytes(1536 * 1024**2) == "1.5 GB"


def test_resolve_target_and_lr_validation(tmp_path):
    with pytest.raises(TuiError, match="not a run folder"):
        resolve_target(str(tmp_path))
    with pytest.raises(TuiError, match="neither a run folder, a config file nor a preset"):
        resolve_target(str(tmp_path / "runs" / "typo"))
    (tmp_path / "metrics.jsonl").write_text("")
    assert resolve_target(str(tmp_path)).config is None
    with pytest.raises(TuiError, match="--set and -o apply when starting"):
        resolve_target(str(tmp_path), ["train.lr=1"])
    with pytest.raises(TuiError, match="data.paths is empty"):
        resolve_target("tiny")
    with pytest.raises(ConfigError, match="did you mean 'train.steps'"):
        resolve_target("tiny", ["train.stesp=3"])
    target = resolve_target("tiny", ["data.paths=[x]"], tmp_path / "r")
    assert target.config == "tiny" and target.run == tmp_path / "r"
    check = LrValue()
    assert check.validate("3e-4").is_valid
    assert "not a number" in check.validate("fast").failure_descriptions[0]
    assert "out of range" in check.validate("-1").failure_descriptions[0]
    assert "type one number, e.g. 1e-4" in check.validate("lr 1e-4").failure_descriptions[0]
