"""The run's checkpoints, newest first, with their age (refreshed with the dashboard)."""

from __future__ import annotations

import time

from rich.text import Text
from textual.widgets import Static

from valle_cli.tui.source import Checkpoint, human_seconds


class CheckpointList(Static):
    DEFAULT_CSS = """
    CheckpointList {
        height: 1fr;
        overflow-y: auto;
    }
    """

    def __init__(self, **kwargs):
        super().__init__(Text("none yet", style="dim"), **kwargs)
        self.names: list[str] = []

    def show(self, checkpoints: list[Checkpoint]) -> None:
        self.names = [c.name for c in checkpoints]
        if not checkpoints:
            self.update(Text("none yet", style="dim"))
            return
        now = time.time()
        text = Text()
        for c in sorted(checkpoints, key=lambda c: c.step, reverse=True):
            text.append(f"{c.step:>9,}", style="bold")
            text.append(f"  {human_seconds(now - c.mtime)}\n", style="dim")
        self.update(text)
