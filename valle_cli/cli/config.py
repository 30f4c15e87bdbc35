"""`valle config`: resolve a YAML file or preset with `--set` overrides, validate it, print or write it."""

from __future__ import annotations

from pathlib import Path

import typer


def config(
    source: str = typer.Argument(None, help="A YAML config file or a preset name (tiny, small, base)."),
    set_: list[str] = typer.Option(None, "--set", "-s", help="Override: section.key=value (repeatable)."),
    output: Path = typer.Option(None, "--output", "-o", help="Write the resolved YAML here."),
    presets: bool = typer.Option(False, "--presets", help="List the shipped presets and exit."),
) -> None:
    from valle_cli.config import dump_config, load_config, preset_names

    if presets:
        typer.echo("\n".join(preset_names()))
        return
    cfg = load_config(source, set_ or [])
    text = dump_config(cfg, output)
    if output is None:
        typer.echo(text, nl=False)
    else:
        typer.echo(f"wrote {output}", err=True)
