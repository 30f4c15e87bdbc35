"""`valle export RUN|CHECKPOINT -o FILE`: one file with the model's weights and everything needed to use it."""

from __future__ import annotations

from pathlib import Path

import typer


def export(
    source: Path = typer.Argument(
        ..., help="Run folder (its latest checkpoint), step-* folder or exported file."
    ),
    output: Path = typer.Option(..., "--output", "-o", help="File to write (.safetensors or .pt)."),
    dtype: str = typer.Option("fp32", help="fp32, fp16 or bf16."),
    fmt: str = typer.Option(None, "--format", help="safetensors or pt (default: from the file name)."),
    lora: bool = typer.Option(False, "--lora", help="Export only the LoRA adapters of a LoRA run."),
) -> None:
    """Export a trained model (LoRA adapters merged unless --lora) with its config, symbol map and codec."""
    from rich.console import Console

    from valle_cli.infer.load import export_model

    out = export_model(source, output, dtype, fmt, lora_only=lora)
    size = out.stat().st_size / 2**20
    Console(stderr=True, soft_wrap=True).print(f"wrote {out} ({size:.1f} MiB, {dtype})", markup=False)
