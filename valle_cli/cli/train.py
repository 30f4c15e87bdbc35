"""`valle train CONFIG`: train or resume a run; live commands from stdin."""

from __future__ import annotations

from pathlib import Path

import typer


def train(
    config_file: str = typer.Argument(..., help="Config YAML (or a preset name) with data.paths set."),
    set_: list[str] = typer.Option(None, "--set", help="Override: section.key=value (repeatable)."),
    run: Path = typer.Option(
        None, "--out-dir", "-o", help="Run folder (default: the config's train.out_dir)."
    ),
    eval_only: bool = typer.Option(False, "--eval", help="Only evaluate the latest checkpoint, then exit."),
) -> None:
    """Train the AR+NAR model. Rerun on the same run folder to resume from its latest checkpoint. While it
    runs, type `save`, `quit`, `lr 1e-4`, `eval` or `export` and Enter."""
    from rich.console import Console

    from valle_cli.config import load_config
    from valle_cli.train.commands import Commands
    from valle_cli.train.trainer import Trainer

    cfg = load_config(config_file, set_ or [])
    console = Console(stderr=True, highlight=False, soft_wrap=True)

    def events(kind: str, p: dict) -> None:
        if kind == "step":
            acc = " ".join(f"{k[4:]} {v:.2f}" for k, v in p.items() if k.startswith("acc."))
            console.print(
                f"step {p['step']:>7} loss {p['loss']:.3f} lr {p['lr']:.2e} {p['tokens_per_s']:.0f} tok/s  {acc}",
                markup=False,
            )
        elif kind == "eval":
            console.print(f"eval at step {p['step']}: loss {p.get('loss', float('nan')):.3f}", markup=False)
        elif kind == "save":
            console.print(f"saved {p['path']}", markup=False)
        elif kind == "warn":
            console.print("warning: " + p["message"], style="yellow", markup=False)
        elif kind == "info":
            console.print(p["message"], markup=False)

    def reply(r: dict) -> None:
        if not r["ok"]:
            console.print("command error: " + r.get("error", "?"), style="red", markup=False)

    commands = Commands()
    commands.read_stdin(reply)
    trainer = Trainer(cfg, run or Path(cfg.train.out_dir), events, commands)
    info = trainer.train(eval_only=eval_only)
    console.print(f"stopped at step {info.step}; run folder {info.run}", markup=False)
