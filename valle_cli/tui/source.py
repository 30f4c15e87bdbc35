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
    from valle_cli.config import load_config, preset_names

    if not path.exists() and target not in preset_names():
        raise TuiError(
            f"{target} does not exist: it is neither a run folder, a config file nor a preset",
            f"give the folder `valle train` writes to, a config file, or a preset ({', '.join(preset_names())})",
        )
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
    args = ["train", str(target.config), "-o", str(target.run), *(f"--set={s}" for s in target.sets)]
    try:
        target.run.mkdir(parents=True, exist_ok=True)
        with open(target.run / OUTPUT_NAME, "ab") as out:
            out.write(f"\n$ valle {' '.join(args)}\n".encode())
            out.flush()
            return subprocess.Popen(
                [sys.executable, "-c", _BOOT, _source_root(), *args],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # no SIGHUP/SIGINT from the TUI's terminal
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
    except OSError as exc:
        raise TuiError(
            f"cannot start training in {target.run}: {exc.strerror or exc}",
            "check that the run folder is writable and has free space",
        ) from None


# The child runs `valle` with this interpreter; from a source checkout that is not installed, this checkout's
# valle_cli (added to its own sys.path only, not to PYTHONPATH, so nothing it starts inherits it).
_BOOT = (
    "import sys; root = sys.argv.pop(1); root and sys.path.insert(0, root); sys.argv[0] = 'valle'; "
    "from valle_cli.cli.app import main; main()"
)


def _source_root() -> str:
    """The folder holding this valle_cli when it is a source checkout, '' when it is installed."""
    import site
    import sysconfig

    import valle_cli

    root = Path(valle_cli.__file__).resolve().parent.parent
    installed = {Path(p).resolve() for p in [*site.getsitepackages(), sysconfig.get_paths()["purelib"]]}
    return "" if root in installed else str(root)


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


class Curve:
    """One metric over the steps, smoothed as records arrive (an exponentially weighted mean, bias-corrected
    like `valle plot --ewm`), so a long run costs nothing per new record."""

    def __init__(self, span: int):
        self.alpha = 2.0 / (span + 1) if span > 1 else 1.0
        self.steps: list[float] = []
        self.smoothed: list[float] = []
        self._num = self._den = 0.0

    def add(self, step: float, value: float) -> None:
        self._num = (1 - self.alpha) * self._num + value
        self._den = (1 - self.alpha) * self._den + 1
        self.steps.append(step)
        self.smoothed.append(self._num / self._den)

    def points(self, most: int) -> tuple[list[float], list[float]]:
        """At most `most` points to draw: bucket means when there are more."""
        n = len(self.steps)
        if n <= most:
            return self.steps, self.smoothed
        import numpy as np

        starts = np.linspace(0, n, most + 1).astype(int)[:-1]
        counts = np.diff(np.append(starts, n))
        xs = np.add.reduceat(np.asarray(self.steps), starts) / counts
        ys = np.add.reduceat(np.asarray(self.smoothed), starts) / counts
        return xs.tolist(), ys.tolist()


def _curve_key(key: str) -> bool:
    family, _, level = key.partition(".")
    return key == "loss" or (family in ("loss", "acc") and level[:1] == "l" and level[1:].isdigit())


class History:
    """A run's records in step order, and a smoothed curve per metric the TUI draws. A resumed run re-logs
    the steps after its checkpoint: a record whose step is not past the last one drops the records (and
    evaluations) from that step on, so curves never fold back."""

    def __init__(self, smooth: int = 10):
        self.smooth = smooth
        self.train: list[dict] = []
        self.evals: list[dict] = []
        self.curves: dict[str, Curve] = {}

    def add(self, records: list[dict]) -> None:
        rebuild = False
        for rec in records:
            step = rec["step"]
            if rec.get("kind") == "eval":
                while self.evals and self.evals[-1]["step"] >= step:
                    self.evals.pop()
                self.evals.append(rec)
                continue
            if self.train and self.train[-1]["step"] >= step:
                while self.train and self.train[-1]["step"] >= step:
                    self.train.pop()
                while self.evals and self.evals[-1]["step"] >= step:
                    self.evals.pop()
                rebuild = True
            self.train.append(rec)
            if not rebuild:
                self._feed(rec)
        if rebuild:
            self.curves = {}
            for rec in self.train:
                self._feed(rec)

    def _feed(self, rec: dict) -> None:
        for key, value in rec.items():
            if _curve_key(key) and isinstance(value, int | float):
                self.curves.setdefault(key, Curve(self.smooth)).add(float(rec["step"]), float(value))

    @property
    def last(self) -> dict:
        return self.train[-1] if self.train else {}

    def levels(self, family: str) -> list[str]:
        """The RVQ level keys ('l0', 'l1', ...) the training records hold for `loss` or `acc`, in level order."""
        found = [k.split(".", 1)[1] for k in self.curves if k.startswith(family + ".l")]
        return sorted(found, key=lambda k: int(k[1:]))

    def lines(self, family: str) -> list[tuple[str, str]]:
        """(label, curve key) to draw for a family: one per level, or the overall loss for runs whose records
        have no per-level loss (written before valle 0.1's per-level logging)."""
        levels = self.levels(family)
        if levels:
            return [(level, f"{family}.{level}") for level in levels]
        return [("all", "loss")] if family == "loss" and "loss" in self.curves else []

    def mean_of_levels(self, family: str, levels: list[str], window: int = 50) -> float | None:
        """The mean of `family.level` over the last `window` records (each level's own recent mean)."""
        means = []
        for level in levels:
            vals = [r[f"{family}.{level}"] for r in self.train[-window:] if f"{family}.{level}" in r]
            if vals:
                means.append(sum(vals) / len(vals))
        return sum(means) / len(means) if means else None

    def seconds_per_step(self, window: int = 50) -> float | None:
        """Mean time per step over the recent records. Gaps over 10x the median (a pause) count as 10x: the
        occasional eval or save stays in, a long pause does not take over."""
        rows = [r for r in self.train[-window:] if "time" in r]
        gaps = [
            (b["time"] - a["time"]) / (b["step"] - a["step"])
            for a, b in itertools.pairwise(rows)
            if b["step"] > a["step"]
        ]
        if not gaps:
            return None
        cap = 10 * statistics.median(gaps)
        return sum(min(g, cap) for g in gaps) / len(gaps)

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
