"""`valle tui RUN_DIR | CONFIG`: watch and steer a training run in a terminal UI."""

from __future__ import annotations

from pathlib import Path

import typer


def tui(
    target: str = typer.Argument(
        ..., help="A run folder to attach to (running or finished), or a config/preset to start training."
    ),
    set_: list[str] = typer.Option(
        None, "--set", help="Starting from a config: section.key=value overrides."
    ),
    run: Path = typer.Option(
        None, "--out-dir", "-o", help="Starting from a config: the run folder (default: train.out_dir)."
    ),
) -> None:
    """A control room for training: live loss and accuracy per RVQ level, lr, tokens/s, ETA, memory, log and
    checkpoints; save, eval, export, set lr, pause/resume and stop from keys or buttons. Training started here
    runs in the background: leaving the TUI (or losing the SSH session) does not stop it."""
    from rich.console import Console

    from valle_cli.tui.app import TrainingApp
    from valle_cli.tui.source import is_live, resolve_target

    resolved = resolve_target(target, set_ or [], run)
    app = TrainingApp.open(resolved)
    how = app.run()
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    pid = f" (pid {app.child.pid})" if app.child is not None else ""
    if how == "stopped":
        err.print(f"training{pid} saves its last checkpoint and stops; logs in {resolved.run}", markup=False)
    elif how == "left" or (how is None and is_live(resolved.run)):  # `q`, or ctrl+q while training
        err.print(
            f"training continues in the background{pid}; `valle tui {resolved.run}` comes back to it",
            markup=False,
        )
    if app.return_code:
        raise typer.Exit(app.return_code)
