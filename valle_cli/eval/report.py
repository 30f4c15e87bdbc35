"""`valle eval`'s report: report.json (every item and the summaries) and report.md (the tables people read)."""

from __future__ import annotations

import json
from pathlib import Path

from valle_cli.eval.run import Report, Summary
from valle_cli.fsutil import atomic_path

COLUMNS = [
    ("n", "n", "{:d}"),
    ("wer", "WER", "{:.1%}"),
    ("truth_wer", "WER, ground truth", "{:.1%}"),
    ("similarity", "SIM", "{:.3f}"),
    ("truth_similarity", "SIM, ground truth", "{:.3f}"),
    ("per", "PER (model's stt)", "{:.1%}"),
    ("closest_to_own", "closest to own voice", "{:.0%}"),
    ("duration_error", "duration error", "{:.1%}"),
    ("stopped", "stopped by itself", "{:.0%}"),
    ("rtf", "RTF", "{:.2f}"),
]


def _cell(summary: Summary, key: str, fmt: str) -> str:
    value = getattr(summary, key)
    return "-" if value is None else fmt.format(value)


def markdown(report: Report, command: str | None = None) -> str:
    keys = [
        c
        for c in COLUMNS
        if any(getattr(s, c[0]) is not None for s in [report.overall, *report.voices.values()])
    ]
    lines = [f"# valle eval: {report.model}", ""]
    if command:
        lines += [f"Command: `{command}`  "]
    lines += [
        f"Transcriber (WER): {report.transcriber}; speaker verifier (SIM: cosine to the voice's other clips): "
        f"{report.verifier}. Ground truth: the same sentences spoken by the reference voice.",
        "",
        "| voice | " + " | ".join(label for _, label, _ in keys) + " |",
        "|---|" + "---|" * len(keys),
    ]
    for name, summary in [("**all**", report.overall), *report.voices.items()]:
        lines.append(f"| {name} | " + " | ".join(_cell(summary, k, f) for k, _, f in keys) + " |")
    return "\n".join(lines) + "\n"


def write(report: Report, folder: Path, command: str | None = None) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = folder / "report.json", folder / "report.md"
    with atomic_path(paths[0]) as tmp:
        Path(tmp).write_text(json.dumps(report.to_dict(), indent=2, ensure_ascii=False))
    with atomic_path(paths[1]) as tmp:
        Path(tmp).write_text(markdown(report, command))
    return paths
