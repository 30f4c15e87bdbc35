"""`valle stt audio.wav --model RUN`: audio -> IPA phonemes with the model's own speech-to-text task."""

from __future__ import annotations

from pathlib import Path

import typer


def stt(
    audio: list[Path] = typer.Argument(..., help="Audio file(s) to transcribe."),
    model: str = typer.Option(
        None,
        "--model",
        "-m",
        help="Run folder, step-* checkpoint, exported file, model plugin or hub id (trained with stt).",
    ),
    language: str = typer.Option("en", "--language", "-l", help="Language of the speech."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N."),
) -> None:
    """Print the IPA phonemes the model hears in each file (one line per file)."""
    from rich.console import Console

    from valle_cli.audio.io import audio_seconds
    from valle_cli.cli.synth import _load
    from valle_cli.infer.stt import stt as run

    err = Console(stderr=True, soft_wrap=True, highlight=False)
    for path in audio:  # missing, unreadable or not audio: said before the model loads
        audio_seconds(path)
    loaded, dev = _load(model, device, "fp32", False, err)
    if model is None:
        from valle_cli.errors import ValleError
        from valle_cli.infer.stt import supports_stt

        if not supports_stt(loaded.meta):
            raise ValleError(
                f"the default model ({loaded.source}) has no speech-to-text task",
                "pass --model with a model trained with train.stt_prob > 0",
            )
    from valle_cli.cli.progress import bars

    with bars(err, label=8, transient=True) as bar:  # symbols heard so far, of about as many as expected
        task = bar.add_task("symbols", total=None)

        def heard(path: Path, n: int, expected: int) -> None:
            bar.update(task, completed=n, total=expected)

        for path, result in zip(audio, run(loaded, audio, language, dev, heard), strict=True):
            bar.reset(task, total=None)
            prefix = f"{path}\t" if len(audio) > 1 else ""
            typer.echo(prefix + result.ipa)
            note = "" if result.finished else "; stopped at the symbol limit"
            bar.console.print(
                f"{path}: {result.audio_seconds:.2f} s of audio in {result.seconds:.2f} s{note}", markup=False
            )
