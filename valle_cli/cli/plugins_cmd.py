"""`valle plugins`: every codec, backbone, transcriber and model plugin, where it comes from and whether it loads."""

from __future__ import annotations

import typer


def plugins(
    kind: str = typer.Option(
        None, "--kind", "-k", help="Only this kind: codec, backbone, transcriber or model."
    ),
    no_check: bool = typer.Option(False, "--no-check", help="Do not import plugins to check that they load."),
    options: bool = typer.Option(
        False,
        "--options",
        help="Also list each plugin's own settings (model.backbone_options, codec.options).",
    ),
) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from valle_cli import plugins as registry

    kinds = [kind] if kind else list(registry.GROUPS)
    # the entry-point group follows from the kind: said once, under the table, not in a column of its own
    groups = ", ".join(f"{k}: {registry.GROUPS[k]}" for k in kinds)
    table = Table(title="valle plugins", caption=f"entry-point groups - {groups}", show_lines=False)
    for col in ("name", "kind", "distribution", "version"):
        table.add_column(col, no_wrap=True)
    table.add_column("loads", overflow="fold")  # the error of one that does not load can be long
    if no_check:
        rows = [
            (info, None, None) for k in kinds for infos in registry.discover(k).values() for info in infos
        ]
    else:
        rows = [(s.info, s.loads, s.error) for s in registry.status(kinds)]
    for info, loads, error in rows:
        mark = "-" if loads is None else ("[green]yes[/]" if loads else f"[red]no[/]: {escape(error or '')}")
        cells = (info.name, info.kind, info.distribution, info.version)
        table.add_row(*(escape(c) for c in cells), mark)
    Console(soft_wrap=True).print(table)
    if options and not no_check:
        _print_options(Console(soft_wrap=True), [r for r in rows if r[1]])


def _print_options(console, rows) -> None:
    """Each loadable plugin's `Options` fields: where they go, their defaults and their comments' types."""
    import dataclasses

    from rich.markup import escape

    from valle_cli import plugins as registry

    where = {"backbone": "model.backbone_options", "codec": "codec.options"}
    for info, _, _ in rows:
        if info.kind not in where:
            continue
        spec = getattr(registry.load(info.kind, info.name), "Options", None)
        if spec is None:
            continue
        console.print(f"\n[bold]{escape(info.name)}[/] ({info.kind}): {where[info.kind]}")
        for f in dataclasses.fields(spec):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
            console.print(f"  {escape(f.name)}: {escape(repr(default))}  [dim]({escape(kind)})[/]")
