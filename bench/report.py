"""Writing a benchmark's section into docs/benchmarks.md: replace the section with the same heading, or
append it. Each section names the command that produced it."""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def command(script: str) -> str:
    """The command line that reproduces this run, with --write."""
    return " ".join([f"python bench/{script}", *(a for a in sys.argv[1:] if a != "--write"), "--write"])


def machine() -> str:
    """ "Machine: arch, device, torch version, threads, " - the start of every section's second line."""
    import platform

    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    return f"Machine: {platform.machine()}, {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "


def write_section(heading: str, body: list[str]) -> Path:
    section = "\n".join([f"## {heading}", "", *body, ""])
    path = ROOT / "docs" / "benchmarks.md"
    text = path.read_text() if path.exists() else "# Benchmarks\n\n"
    pattern = re.compile(rf"## {re.escape(heading)}\n.*?(?=\n## |\Z)", re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip() + "\n\n" + section
    path.write_text(text)
    print(f"wrote {path}")
    return path
