"""The Textual app of `valle tui`. `TrainingApp.open(target)` starts training first when given a config
(unless its run is already live; errors surface before the UI starts), then the app shows the dashboard.
`run()` returns "left" when the user left while training goes on, "stopped" when they stopped it, else None."""

from __future__ import annotations

import subprocess

from textual.app import App

from valle_cli.tui.screens import Dashboard
from valle_cli.tui.source import Target, is_live, launch


class TrainingApp(App[str | None]):
    TITLE = "valle tui"
    CSS_PATH = "app.tcss"

    def __init__(self, target: Target, child: subprocess.Popen | None = None, attached_to_live: bool = False):
        super().__init__()
        self.target, self.child = target, child
        self.attached_to_live = attached_to_live  # given a config whose run was already training

    @classmethod
    def open(cls, target: Target) -> TrainingApp:
        if target.config is not None and is_live(target.run):
            return cls(target, attached_to_live=True)
        return cls(target, launch(target) if target.config is not None else None)

    def on_mount(self) -> None:
        if self.attached_to_live:
            self.notify(f"{self.target.run} is already training: attached to it", title="attached")
        self.push_screen(Dashboard(self.target, self.child))
