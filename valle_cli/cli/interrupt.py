"""What an interrupted verb keeps, for the one line `valle` prints when Ctrl-C or SIGTERM stops it.

A module of its own: `python -m valle_cli.cli.app` runs app.py as __main__, so state kept in app.py would be
a second copy when a verb imports it."""

from __future__ import annotations

from collections.abc import Callable

GENERIC = "nothing half-written was left behind; run the command again to redo it"
_kept: list[Callable[[], str] | None] = [None]


def on_interrupt(kept: Callable[[], str] | None) -> None:
    """A verb says what an interruption keeps (called when it happens); None: the generic line."""
    _kept[0] = kept


def kept_line() -> str:
    if _kept[0] is not None:
        try:
            return _kept[0]()
        except Exception:  # the line must come out whatever state the verb was left in
            pass
    return GENERIC
