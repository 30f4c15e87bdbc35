"""What `valle tui` shows and steers, without Textual: a run folder read incrementally, a history of its
records, the control socket, and the `valle train` child the TUI may start.

A run folder (see train/trainer.py) holds metrics.jsonl (a record per step and per evaluation), train.log
(events: saves, evals, lr changes, warnings), `step-NNNNNNNN/` checkpoints, `exports/` and config.yaml.
`RunFiles` reads only what was appended since its last call, so polling a long run stays cheap; a line still
being written is left for the next call. A started training is a separate process in a session of its own
(`start_new_session`), with its output in RUN/train.out: closing the terminal, a crash of the TUI or leaving
it does not stop training; the `quit` command does.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from valle_cli.errors import ValleError
from valle_cli.plot import ewm
from valle_cli.train.checkpoint import list_checkpoints
from valle_cli.train.log import LOG_NAME

OUTPUT_NAME = "train.out"  # stdout+stderr of a training started by the TUI


class TuiError(ValleError):
    pass


@dataclass
class Target:
    """What `valle tui` was pointed at: a run folder to attach to, or a config to start training from."""

    run: Path
    config: str | None = None  # set: start `valle train CONFIG` (unless the run is already live)
    sets: list[str] = field(default_factory=list)


def resolve_target(target: str, sets: list[str] | None = None, out_dir: Path | None = None) -> Target:
    """A run folder -> attach; a config file or preset name -> start it (checked here, before any process)."""
    path = Path(target)
    if path.is_dir():
        if sets or out_dir:
            raise TuiError(f"{target} is a run folder; --set and -o apply when starting from a config")
        marks = ("metrics.jsonl", "control.json", "config.yaml", LOG_NAME)
        if not any((path / m).exists() for m in marks) and not list_checkpoints(path):
            raise TuiError(
                f"{target} is not a run folder (no metrics.jsonl, config.yaml or checkpoints)",
                "give the folder `valle train` writes to (its -o or train.out_dir), or a config file to start",
            )
        return Target(path)
    from valle_cli.config import load_config

    cfg = load_config(target, sets or [])  # a typo in the config is reported now, not in a log file
    if not cfg.data.paths:
        raise TuiError(
            "data.paths is empty", "set it to a dataset made by `valle prepare` (--set data.paths=[DIR])"
        )
    return Target(Path(out_dir or cfg.train.out_dir), config=target, sets=list(sets or []))


def is_live(run: Path) -> bool:
    """Whether a trainer serves this run's control socket now."""
    from valle_cli.train.control import _alive

    try:
        info = json.loads((run / "control.json").read_text())
        return _alive(Path(info["socket"]))
    except (OSError, ValueError, KeyError, TypeError):
        return False


def launch(target: Target) -> subprocess.Popen:
    """Start `valle train` for the target in its own session (it outlives the TUI), output to RUN/train.out."""
    target.run.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "valle_cli", "train", str(target.config), "-o", str(target.run)]
    cmd += [f"--set={s}" for s in target.sets]
    with open(target.run / OUTPUT_NAME, "ab") as out:
        out.write(f"\n$ valle train {' '.join(cmd[4:])}\n".encode())
        out.flush()
        return subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # no SIGHUP/SIGINT from the TUI's terminal
            env=_child_env(),
        )


def _child_env() -> dict[str, str]:
    """This environment, with this valle_cli first on the path: the child runs the same code as the TUI."""
    import valle_cli

    root = str(Path(valle_cli.__file__).resolve().parent.parent)
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": root + (os.pathsep + path if path else ""), "PYTHONUNBUFFERED": "1"}


def tail(path: Path, lines: int = 12) -> list[str]:
    """The last lines of a text file (empty when it is missing)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return []
    return [line.rstrip() for line in text.replace("\r", "\n").splitlines() if line.strip()][-lines:]


@dataclass
class Checkpoint:
    name: str
    step: int
    mtime: float


class RunFiles:
    """Incremental reads of one run folder."""

    def __init__(self, run: Path):
        self.run = Path(run)
        self._offsets: dict[str, int] = {}
        self._checkpoints: list[Checkpoint] | None = None
        self._config_mtime = 0.0
        self.total_steps: int | None = None

    def _new_lines(self, name: str) -> list[str]:
        path = self.run / name
        try:
            size = path.stat().st_size
        except OSError:
            return []
        pos = self._offsets.get(name, 0)
        if size < pos:  # replaced or truncated: start again
            pos = 0
        if size == pos:
            return []
        with open(path, "rb") as f:
            f.seek(pos)
            data = f.read(size - pos)
        end = data.rfind(b"\n") + 1  # a line still being written waits for the next call
        self._offsets[name] = pos + end
        return data[:end].decode("utf-8", "replace").splitlines()

    def new_records(self) -> list[dict]:
        out = []
        for line in self._new_lines("metrics.jsonl"):
            with contextlib.suppress(ValueError):
                rec = json.loads(line)
                if isinstance(rec, dict) and "step" in rec:
                    out.append(rec)
        return out

    def new_log_lines(self) -> list[str]:
        return [line for line in self._new_lines(LOG_NAME) if line.strip()]

    def checkpoints_if_changed(self) -> list[Checkpoint] | None:
        found = []
        for path in list_checkpoints(self.run):
            with contextlib.suppress(OSError, ValueError):
                found.append(Checkpoint(path.name, int(path.name.split("-")[1]), path.stat().st_mtime))
        if found == self._checkpoints:
            return None
        self._checkpoints = found
        return found

    def read_total_steps(self) -> int | None:
        """train.steps from the run's config.yaml (re-read when the file changes)."""
        path = self.run / "config.yaml"
        with contextlib.suppress(OSError):
            mtime = path.stat().st_mtime
            if mtime != self._config_mtime:
                import yaml

                self._config_mtime = mtime
                with contextlib.suppress(ValueError, yaml.YAMLError, TypeError, AttributeError):
                    self.total_steps = int(yaml.safe_load(path.read_text())["train"]["steps"])
        return self.total_steps


class History:
    """A run's records in step order. A resumed run re-logs the steps after its checkpoint: a record whose
    step is not past the last one drops the records from that step on, so curves never fold back."""

    def __init__(self):
        self.train: list[dict] = []
        self.evals: list[dict] = []

    def add(self, records: list[dict]) -> None:
        for rec in records:
            rows = self.evals if rec.get("kind") == "eval" else self.train
            if rows and rows[-1]["step"] >= rec["step"] and rec.get("kind") != "eval":
                while rows and rows[-1]["step"] >= rec["step"]:
                    rows.pop()
            rows.append(rec)

    @property
    def last(self) -> dict:
        return self.train[-1] if self.train else {}

    def levels(self, family: str) -> list[str]:
        """The RVQ level keys ('l0', 'l1', ...) the records hold for `loss` or `acc`, in level order."""
        seen = {
            k.split(".", 1)[1]
            for rec in self.train[-200:] + self.evals[-5:]
            for k in rec
            if k.startswith(family + ".l") and k[len(family) + 2 :].isdigit()
        }
        return sorted(seen, key=lambda k: int(k[1:]))

    def level_series(self, family: str, level: str, smooth: int = 0) -> tuple[list[float], list[float]]:
        """(steps, values) of `family.level` over the training records, smoothed when `smooth` > 1."""
        key = f"{family}.{level}"
        xs = [float(r["step"]) for r in self.train if key in r]
        ys = [float(r[key]) for r in self.train if key in r]
        return xs, (ewm(ys, smooth) if smooth > 1 and ys else ys)

    def mean_of_levels(self, family: str, levels: list[str], window: int = 50) -> float | None:
        """The mean of `family.level` over the last `window` records (each level's own recent mean)."""
        means = []
        for level in levels:
            vals = [r[f"{family}.{level}"] for r in self.train[-window:] if f"{family}.{level}" in r]
            if vals:
                means.append(sum(vals) / len(vals))
        return sum(means) / len(means) if means else None

    def seconds_per_step(self, window: int = 50) -> float | None:
        """The median time per step over the recent records (a pause does not skew it)."""
        rows = [r for r in self.train[-window:] if "time" in r]
        gaps = [
            (b["time"] - a["time"]) / (b["step"] - a["step"])
            for a, b in itertools.pairwise(rows)
            if b["step"] > a["step"]
        ]
        return statistics.median(gaps) if gaps else None

    def eta_seconds(self, total_steps: int | None) -> float | None:
        per_step = self.seconds_per_step()
        if per_step is None or not total_steps or not self.train:
            return None
        return max(0, total_steps - self.last["step"]) * per_step


def human_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    return f"{s // 86400}d {s % 86400 // 3600}h"


def human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit in ("B", "KB") else f"{n:.1f} {unit}"
        n /= 1024
    return "-"
