"""The run's event log, `RUN/train.log`: one line per trainer event worth reading later (saves, evaluations,
learning-rate changes, warnings, start and stop), written by rank 0 beside metrics.jsonl.

`valle tui` shows its last lines, for a run it started, a run started in another terminal, or a finished one.
Step records are not repeated here: they are in metrics.jsonl. `describe` is also what `valle train` prints.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

LOG_NAME = "train.log"


def describe(kind: str, payload: dict) -> str | None:
    """An event as one line of text, or None for events that are not logged (steps)."""
    if kind == "eval":
        acc = " ".join(f"{k[4:]} {v:.2f}" for k, v in payload.items() if k.startswith("acc."))
        return f"eval at step {payload['step']}: loss {payload.get('loss', float('nan')):.3f}  acc {acc}"
    if kind == "save":
        return f"saved {payload['path']}"
    if kind == "warn":
        return "warning: " + payload["message"]
    if kind == "info":
        return payload["message"]
    if kind == "done":
        return f"stopped at step {payload['step']}"
    return None


def append(run: Path, kind: str, payload: dict) -> None:
    """Add an event to RUN/train.log. Never raises: a full disk must not stop training over a log line."""
    text = describe(kind, payload)
    if text is None:
        return
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    with contextlib.suppress(OSError), open(Path(run) / LOG_NAME, "a", encoding="utf-8") as f:
        f.write(f"{stamp} {text}\n")
