"""The dashboard and its dialogs; each screen's CSS is the .tcss file beside it."""

from valle_cli.tui.screens.dashboard import Dashboard
from valle_cli.tui.screens.dialogs import ChoiceDialog, LrDialog

__all__ = ["ChoiceDialog", "Dashboard", "LrDialog"]
