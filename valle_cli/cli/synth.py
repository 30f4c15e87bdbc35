"""`valle synth "text" --ref voice.wav -o out.wav --model RUN|FILE`: zero-shot speech in the reference voice."""

from __future__ import annotations

from pathlib import Path

import typer


def synth(
    text: str = typer.Argument(
        ..., help="Text to speak; each line is generated separately, joined in one file."
    ),
    ref: list[Path] = typer.Option(None, "--ref", "-r", help="Reference audio of the voice (repeatable)."),
    output: Path = typer.Option(Path("out.wav"), "--output", "-o", help="Where to write the audio."),
    model: Path = typer.Option(None, "--model", "-m", help="Run folder, step-* checkpoint or exported file."),
    language: str = typer.Option("en", "--language", "-l", help="Language of the text."),
    ar_temp: float = typer.Option(0.95, help="AR sampling temperature (0 = greedy)."),
    nar_temp: float = typer.Option(0.0, help="NAR sampling temperature (0 = greedy)."),
    top_k: int = typer.Option(0, help="Keep the k most likely tokens (0 = all)."),
    top_p: float = typer.Option(1.0, help="Nucleus sampling probability."),
    min_p: float = typer.Option(0.0, help="Keep tokens at least this fraction as likely as the best."),
    repetition_penalty: float = typer.Option(1.0, help="Penalty for tokens already generated (1 = off)."),
    repetition_penalty_decay: float = typer.Option(1.0, help="How fast the penalty fades with distance."),
    length_penalty: float = typer.Option(0.0, help="> 0 favours longer output, < 0 shorter."),
    dry_multiplier: float = typer.Option(0.0, help="DRY penalty strength (0 = off)."),
    dry_base: float = typer.Option(1.75, help="DRY exponent base."),
    dry_allowed_length: int = typer.Option(2, help="DRY: repeats up to this long are free."),
    min_ar_temp: float = typer.Option(-1.0, help=">= 0: dynamic temperature between this and --ar-temp."),
    mirostat_tau: float = typer.Option(0.0, help="Mirostat target surprise (0 = off)."),
    mirostat_eta: float = typer.Option(0.1, help="Mirostat learning rate."),
    ras_window: int = typer.Option(0, help="VALL-E 2 repetition-aware sampling window (0 = off)."),
    ras_threshold: float = typer.Option(0.1, help="Repetition-aware sampling threshold."),
    max_ar_steps: int = typer.Option(1500, help="Longest output per line, in frames (75 per second)."),
    input_prompt_length: float = typer.Option(6.0, help="Seconds of reference audio used as the prompt."),
    seed: int = typer.Option(None, help="Seed for reproducible sampling."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N."),
) -> None:
    """Speak TEXT in the voice of the reference clip(s)."""
    from rich.console import Console

    from valle_cli.audio.io import save_audio
    from valle_cli.codecs.base import resolve_device
    from valle_cli.errors import ValleError
    from valle_cli.fsutil import check_writable
    from valle_cli.infer.engine import SamplingConfig
    from valle_cli.infer.load import load_model
    from valle_cli.infer.synth import synthesize

    if model is None:
        raise ValleError(
            "no --model given, and this release ships no default model yet",
            "train one (`valle train`, or `valle train --try-me` for a quick check) and pass its run folder",
        )
    check_writable(output, ValleError)
    dev = str(resolve_device(device))
    loaded = load_model(model, dev)
    sampling = SamplingConfig(
        ar_temp=ar_temp,
        nar_temp=nar_temp,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        repetition_penalty_decay=repetition_penalty_decay,
        length_penalty=length_penalty,
        dry_multiplier=dry_multiplier,
        dry_base=dry_base,
        dry_allowed_length=dry_allowed_length,
        min_ar_temp=min_ar_temp,
        mirostat_tau=mirostat_tau,
        mirostat_eta=mirostat_eta,
        ras_window=ras_window,
        ras_threshold=ras_threshold,
        max_ar_steps=max_ar_steps,
        seed=seed,
    )
    result = synthesize(loaded, text, list(ref or []), language, sampling, input_prompt_length, dev)
    save_audio(output, result.audio, result.sample_rate)
    seconds = result.audio.size / result.sample_rate
    unfinished = sum(not s for s in result.stopped)
    Console(stderr=True, soft_wrap=True, highlight=False).print(
        f"{result.lines} line(s), {seconds:.2f} s of audio in {result.seconds:.2f} s with {model}"
        + (f"; {unfinished} line(s) hit --max-ar-steps" if unfinished else "")
        + f" -> {output}",
        markup=False,
    )
