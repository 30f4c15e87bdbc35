"""`valle codec`: fit the offline codec's codebooks on your own audio; round-trip audio through any codec."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(no_args_is_help=True, rich_markup_mode=None)


@app.command("fit", short_help="Fit mel-codec codebooks on your audio.")
def fit(
    audio: Path = typer.Argument(..., help="A folder of audio files (searched recursively) or one file."),
    output: Path = typer.Option(..., "--output", "-o", help="Codebook file to write (.safetensors)."),
    levels: int = typer.Option(8, help="RVQ levels (8 = EnCodec-at-6-kbps shape)."),
    codebook_size: int = typer.Option(1024, help="Entries per codebook."),
    iters: int = typer.Option(20, help="k-means iterations per level."),
    max_minutes: float = typer.Option(120.0, help="Use at most this much audio."),
    seed: int = typer.Option(0, help="Random seed."),
) -> None:
    """Fit mel-codec codebooks on your audio (minutes on a CPU); use them with --set codec.path=FILE."""
    from rich.console import Console

    from valle_cli.cli.progress import stage_progress
    from valle_cli.codecs.tools import fit_folder

    console = Console(stderr=True, soft_wrap=True)
    with stage_progress(console) as progress:
        report = fit_folder(
            audio,
            output,
            levels=levels,
            codebook_size=codebook_size,
            iters=iters,
            max_minutes=max_minutes,
            seed=seed,
            progress=progress,
        )
    for path, reason in report.skipped:
        console.print(f"skipped {path}: {reason}", style="yellow", markup=False)
    console.print(
        f"fitted on {report.files} files ({report.seconds_of_audio / 60:.1f} min of audio) in "
        f"{report.seconds_taken:.0f} s -> {report.output}",
        markup=False,
    )


@app.command("roundtrip", short_help="Encode and decode audio, to hear the codec.")
def roundtrip(
    audio: Path = typer.Argument(None, help="Audio file to encode and decode (or use --say)."),
    say: str = typer.Option(
        None, "--say", help="Speak this text with an offline voice instead of reading a file."
    ),
    voice: str = typer.Option(
        "espeak:en-us", help="Voice for --say: espeak:NAME[+VARIANT], mbrola:NAME, piper:joe."
    ),
    output: Path = typer.Option(
        Path("roundtrip.wav"), "--output", "-o", help="Where to write the decoded audio."
    ),
    codec_name: str = typer.Option(None, "--codec", help="Codec plugin (default: the config's, else mel)."),
    config_file: str = typer.Option(
        None, "--config", "-c", help="Config file or preset for the codec section."
    ),
    set_: list[str] = typer.Option(None, "--set", help="Override: codec.key=value (repeatable)."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N."),
) -> None:
    """Encode audio to tokens and decode it back, to hear what a codec keeps."""
    from rich.console import Console

    from valle_cli.audio.io import load_audio, resample, save_audio
    from valle_cli.codecs.base import build_codec
    from valle_cli.codecs.tools import roundtrip as run_roundtrip
    from valle_cli.config import load_config
    from valle_cli.errors import ValleError

    if (audio is None) == (say is None):
        raise ValleError(
            "give either an audio file or --say TEXT", 'e.g. valle codec roundtrip --say "Hello there."'
        )
    overrides = list(set_ or [])
    if codec_name:
        overrides.append(f"codec.name={codec_name}")
    elif config_file is None and not any(o.startswith("codec.name=") for o in overrides):
        overrides.append("codec.name=mel")
    cfg = load_config(config_file, overrides)
    codec = build_codec(cfg.codec, device=device)
    if say is not None:
        from valle_cli.audio.speech import say as speak

        wav, sr = speak(say, voice)
        wav = resample(wav, sr, codec.sample_rate)
        source = f"{voice} saying {say!r}"
    else:
        limit = (600.0, f"cut a piece to listen to, e.g. `sox {audio} piece.wav trim 0 60`")
        wav = load_audio(audio, codec.sample_rate, max_duration=limit)  # a listening check, not a converter
        source = str(audio)
    result = run_roundtrip(codec, wav)
    save_audio(output, result.audio, codec.sample_rate)
    seconds = wav.size / codec.sample_rate
    Console(stderr=True, soft_wrap=True).print(
        f"{source}: {seconds:.2f} s -> {tuple(result.codes.shape)} tokens ({codec.name}, "
        f"{codec.n_codebooks} levels x {codec.frame_rate:g}/s); encode {result.encode_seconds:.2f} s, "
        f"decode {result.decode_seconds:.2f} s -> {output}",
        markup=False,
        highlight=False,
    )


@app.command("info", short_help="A codec's rates and shapes.")
def info(
    codec_name: str = typer.Option("mel", "--codec", help="Codec plugin."),
    set_: list[str] = typer.Option(None, "--set", help="Override: codec.key=value (repeatable)."),
) -> None:
    """Show a codec's rates and shapes (and a mel codebook file's fitting details)."""
    import json

    from valle_cli.codecs.base import build_codec
    from valle_cli.config import load_config

    cfg = load_config(None, [f"codec.name={codec_name}", *(set_ or [])])
    codec = build_codec(cfg.codec, device="cpu")
    details = codec.describe()
    if getattr(codec, "meta", None):
        details["fitted"] = codec.meta
    typer.echo(json.dumps(details, indent=2))
