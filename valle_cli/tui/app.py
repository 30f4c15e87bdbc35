"""The Textual app of `valle tui`: starts training when given a config (unless the run is already live), then
shows the dashboard. `run()` returns the run folder when the user left while training goes on, else None."""

from __future__ import annotations

import subprocess

from textual.app import App

from valle_cli.tui.screens import Dashboard
from valle_cli.tui.source import Target, is_live, launch


class TrainingApp(App[object]):
    TITLE = "valle tui"
    CSS_PATH = "app.tcss"

    def __init__(self, target: Target):
        super().__init__()
        self.target = target
        self.child: subprocess.Popen | None = None
        self.attached_to_live = False  # given a config whose run was already training: attached instead

    def on_mount(self) -> None:
        if self.target.config is not None:
            if is_live(self.target.run):
                self.attached_to_live = True
                self.notify(f"{self.target.run} is already training: attached to it", title="attached")
            else:
                self.child = launch(self.target)
        self.push_screen(Dashboard(self.target, self.child))
