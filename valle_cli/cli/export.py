"""`valle export RUN|CHECKPOINT -o FILE` and/or `--hf DIR`: the model's weights and everything needed to use it.

`-o FILE` writes one .safetensors/.pt file; `--hf DIR` writes a folder ready to upload to the Hugging Face hub
(model.safetensors, config.json, README.md model card). Either or both; the folder is written first, so a
refused folder (exists, no --force) leaves no file behind either.
"""

from __future__ import annotations

from pathlib import Path

import typer


def export(
    source: str = typer.Argument(  # a string: Path() would drop the `./` that marks `./a/b` as local
        ..., help="Run folder (its latest checkpoint), step-* folder, exported file or hub id (owner/name)."
    ),
    output: Path = typer.Option(None, "--output", "-o", help="File to write (.safetensors or .pt)."),
    hf: Path = typer.Option(
        None,
        "--hf",
        help="Folder to write for the Hugging Face hub: model.safetensors, config.json, README.md.",
    ),
    force: bool = typer.Option(False, "--force", help="Replace an existing non-empty --hf folder."),
    dtype: str = typer.Option("fp32", help="fp32, fp16 or bf16."),
    fmt: str = typer.Option(None, "--format", help="safetensors or pt (default: from the file name)."),
    lora: bool = typer.Option(False, "--lora", help="Export only the LoRA adapters of a LoRA run."),
) -> None:
    """Export a trained model (LoRA adapters merged unless --lora) with its config, symbol map and codec."""
    from rich.console import Console

    from valle_cli.errors import ValleError
    from valle_cli.infer.load import export_hf, export_model

    if output is None and hf is None:
        raise ValleError(
            "nothing to write: no --output and no --hf",
            "add -o FILE.safetensors for one file, --hf DIR for a Hugging Face hub folder, or both",
        )
    if hf is not None and lora:
        raise ValleError(
            "--hf writes a whole model, not LoRA adapters alone", "drop --lora to export the merged model"
        )
    console = Console(stderr=True, soft_wrap=True)
    if output is not None:
        from valle_cli.infer.load import check_export

        check_export(Path(output), dtype, fmt)  # before --hf writes its folder and before any model loads
    if hf is not None:
        folder = export_hf(source, hf, dtype, force=force)
        size = sum(f.stat().st_size for f in folder.iterdir()) / 2**20
        console.print(
            f"wrote {folder}/ ({size:.1f} MiB, {dtype}): model.safetensors, config.json, README.md; "
            f"upload with `hf upload OWNER/NAME {folder}`",
            markup=False,
        )
    if output is not None:
        out = export_model(source, output, dtype, fmt, lora_only=lora)
        size = out.stat().st_size / 2**20
        console.print(f"wrote {out} ({size:.1f} MiB, {dtype})", markup=False)
