"""Verbs whose engines land in later releases. Each has its real help line and main argument, and says
plainly that it is not available yet (exit code 3) instead of pretending to work. Each moves to a module of its
own when its engine lands.
"""

from __future__ import annotations

import typer

from valle_cli.errors import NotImplementedYet

# verb -> (help, issue that implements it)
PLANNED = {
    "serve": ("Serve a web UI and an OpenAI-compatible HTTP API for speech synthesis.", 7),
}


def _not_yet(verb: str, issue: int):
    def command(
        target: str = typer.Argument(None, help="What the verb works on.", show_default=False),
    ) -> None:
        raise NotImplementedYet(
            f"`valle {verb}` is not available in this release yet (tracked as issue #{issue})",
            "see README's status table for the verbs that work today",
        )

    command.__name__ = verb
    return command


def register(app: typer.Typer) -> None:
    for verb, (help_text, issue) in PLANNED.items():
        app.command(verb, help=help_text)(_not_yet(verb, issue))
