"""The dashboard's widgets; each keeps its CSS in DEFAULT_CSS."""

from valle_cli.tui.widgets.checkpoints import CheckpointList
from valle_cli.tui.widgets.curves import Curves
from valle_cli.tui.widgets.stats import Stats

__all__ = ["CheckpointList", "Curves", "Stats"]
