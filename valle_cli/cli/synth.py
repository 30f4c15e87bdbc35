"""`valle synth "text" --ref voice.wav -o out.wav --model RUN|FILE|HUB-ID`: zero-shot speech in the reference voice.

Also `--stream` (audio written, and with `--play` heard, while the model generates), `--batch FILE` (one output
file per line, generated in padded batches) and every sampler flag of the original. The command only parses
options and reports; the work is in valle_cli.infer.
"""

from __future__ import annotations

import time
from pathlib import Path

import typer


def synth(
    text: str = typer.Argument(
        None,
        help="Text to speak; each line (a newline, or a typed \\n) is generated separately, all joined in "
        "one file.",
    ),
    ref: list[Path] = typer.Option(
        None, "--ref", "-r", help="Reference audio of the voice (repeatable); none: a random voice."
    ),
    output: Path = typer.Option(
        None, "--output", "-o", help="Where to write the audio (default out.wav; a folder with --batch)."
    ),
    model: str = typer.Option(
        None,
        "--model",
        "-m",
        help="Run folder, step-* checkpoint, exported file, model plugin or hub id (default: "
        "$VALLE_DEFAULT_MODEL, else the shipped valle-default).",
    ),
    language: str = typer.Option("en", "--language", "-l", help="Language of the text."),
    batch: Path = typer.Option(None, "--batch", help="A text file: one output file per line, in -o FOLDER."),
    batch_size: int = typer.Option(8, help="Segments generated together (padded)."),
    split_sentences: bool = typer.Option(False, help="Also generate each sentence of a line separately."),
    rolling_context: bool = typer.Option(False, help="Each segment continues the previous one's audio."),
    prompt_text: str = typer.Option(
        None, help="Transcript of the reference: speak each segment as its continuation."
    ),
    input_prompt_prefix: bool = typer.Option(
        False, help="The text starts with the reference's transcript: continue the reference."
    ),
    input_prompt_length: float = typer.Option(
        None,
        help="Seconds of reference audio in the prompt, trimmed or repeated (default: the model's training "
        "prompt length, trimmed only).",
    ),
    stream: bool = typer.Option(
        False, help="Produce audio in chunks while generating; report time to first audio."
    ),
    play: bool = typer.Option(False, help="Play the audio (as it comes with --stream)."),
    ar_temp: float = typer.Option(0.95, help="AR sampling temperature (0 = greedy)."),
    nar_temp: float = typer.Option(0.0, help="NAR sampling temperature (0 = greedy)."),
    top_k: int = typer.Option(0, help="Keep the k most likely tokens (0 = all)."),
    top_p: float = typer.Option(1.0, help="Nucleus sampling probability."),
    min_p: float = typer.Option(0.0, help="Keep tokens at least this fraction as likely as the best."),
    top_nsigma: float = typer.Option(
        0.0, help="Keep tokens whose logit is within this many standard deviations of the best (0 = off)."
    ),
    repetition_penalty: float = typer.Option(1.0, help="Penalty for tokens already generated (1 = off)."),
    repetition_penalty_decay: float = typer.Option(1.0, help="How fast the penalty fades with distance."),
    length_penalty: float = typer.Option(0.0, help="> 0 favours longer output, < 0 shorter."),
    beam_width: int = typer.Option(
        1, help="Beam search over AR sequences with this many beams (1 = sample)."
    ),
    beam_length_norm: float = typer.Option(1.0, help="Beam scores are log-prob / length ** this."),
    dry_multiplier: float = typer.Option(0.0, help="DRY penalty strength (0 = off)."),
    dry_base: float = typer.Option(1.75, help="DRY exponent base."),
    dry_allowed_length: int = typer.Option(2, help="DRY: repeats up to this long are free."),
    min_ar_temp: float = typer.Option(-1.0, help=">= 0: dynamic temperature between this and --ar-temp."),
    mirostat_tau: float = typer.Option(0.0, help="Mirostat target surprise (0 = off)."),
    mirostat_eta: float = typer.Option(0.1, help="Mirostat learning rate."),
    ras_window: int = typer.Option(0, help="VALL-E 2 repetition-aware sampling window (0 = off)."),
    ras_threshold: float = typer.Option(0.1, help="Repetition-aware sampling threshold."),
    entropix: bool = typer.Option(
        False, help="Entropy-adaptive sampling: each step's entropy and varentropy choose how to draw."
    ),
    layer_skip: bool = typer.Option(
        False, help="Layer skip: an AR step stops at the first confident layer (models trained for it)."
    ),
    layer_skip_exit_layer: int = typer.Option(
        0, help="Layer skip: the deepest layer to exit after (0 = last but one)."
    ),
    layer_skip_min_layer: int = typer.Option(1, help="Layer skip: the first layer whose output is checked."),
    layer_skip_entropy: float = typer.Option(
        0.1, help="Layer skip: exit when the entropy (nats) is below this..."
    ),
    layer_skip_varentropy: float = typer.Option(0.1, help="...and the varentropy is below this."),
    max_ar_steps: int = typer.Option(
        1500, help="Longest output per segment, in codec frames (75 per second for encodec, vocos, mel)."
    ),
    level0_steps: int = typer.Option(
        8, help="Models with a parallel level 0 (level0: nar): unmasking passes (1 = one shot)."
    ),
    seed: int = typer.Option(None, help="Seed for reproducible sampling (and a reproducible random voice)."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N."),
    dtype: str = typer.Option(
        "fp32",
        help="fp32, fp16 or bf16 weights and activations; int8 or int4: int8 or int4 weights, bf16 activations, "
        "for a faster AR on a CPU (int4 fastest for large models; CPU only; no gain for models without AR steps, "
        "as the shipped one).",
    ),
    compile: bool = typer.Option(
        False, "--compile", help="torch.compile the backbone (pays off for long runs)."
    ),
) -> None:
    """Speak TEXT in the voice of the reference clip(s)."""
    from rich.console import Console

    from valle_cli.errors import ValleError
    from valle_cli.fsutil import check_writable
    from valle_cli.infer.engine import SamplingConfig
    from valle_cli.infer.synth import SynthOptions

    err = Console(stderr=True, soft_wrap=True, highlight=False)
    if batch is None and not text:
        raise ValleError("no text given", 'valle synth "Hello there." --ref voice.wav (or --batch lines.txt)')
    if text:
        # a shell passes "a\nb" as backslash + n: read it as the line break it was meant to be
        text = text.replace("\\n", "\n")
    if batch is not None and text:
        raise ValleError("give either TEXT or --batch FILE, not both")
    if batch is not None and (stream or play):
        raise ValleError("--batch writes one file per line; it cannot --stream or --play", "drop those flags")
    if (
        batch_size < 1
        or beam_width < 1
        or max_ar_steps < 1
        or level0_steps < 1
        or (input_prompt_length is not None and not input_prompt_length > 0)  # (nan too)
        or (input_prompt_length is not None and input_prompt_length == float("inf"))
    ):
        raise ValleError(
            "--batch-size, --beam-width, --max-ar-steps, --level0-steps and --input-prompt-length must be positive"
        )
    if stream and beam_width > 1:
        raise ValleError(
            "--stream cannot use beam search: the best beam is known only at the end",
            "drop --beam-width, or drop --stream",
        )
    if play:
        from valle_cli.audio.play import check_output_device

        check_output_device()  # before any work: no device, no long wait for nothing
    if batch is not None:
        output = output or Path("out")
        if output.suffix.lower() in (".wav", ".flac", ".ogg") or (output.exists() and not output.is_dir()):
            raise ValleError(f"with --batch, -o names a folder, got {output}", "use -o out/")
    else:
        output = output or Path("out.wav")
        check_writable(output, ValleError)
        if output.suffix.lower() not in (".wav", ".flac", ".ogg"):
            raise ValleError(
                f"cannot write {output}: unknown audio format", "use a .wav, .flac or .ogg file name"
            )
    from valle_cli.audio.io import audio_seconds

    for clip in ref or []:  # missing or unreadable: said now, not after the model loads
        audio_seconds(clip)
    sampling = SamplingConfig(  # conflicting sampler flags: said now, too
        ar_temp=ar_temp,
        nar_temp=nar_temp,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        top_nsigma=top_nsigma,
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
        entropix=entropix,
        max_ar_steps=max_ar_steps,
        level0_steps=level0_steps,
        seed=seed,
        beam_width=beam_width,
        beam_length_norm=beam_length_norm,
        layer_skip=layer_skip,
        layer_skip_exit_layer=layer_skip_exit_layer,
        layer_skip_min_layer=layer_skip_min_layer,
        layer_skip_entropy=layer_skip_entropy,
        layer_skip_varentropy=layer_skip_varentropy,
    )
    loaded, dev = _load(model, device, dtype, compile, err)
    from valle_cli.infer.engine import early_exit_for

    early_exit_for(loaded.model, sampling)  # a model that cannot skip layers: said before any work
    opts = SynthOptions(
        language=language,
        prompt_seconds=input_prompt_length,
        split_sentences=split_sentences,
        prompt_text=prompt_text,
        prompt_prefix=input_prompt_prefix,
        rolling_context=rolling_context,
        batch_size=batch_size,
    )
    refs = list(ref or [])
    if not refs:
        err.print(
            "no --ref given: speaking in a random voice" + ("" if seed is not None else " (--seed keeps it)")
        )
    if batch is not None:
        _run_batch(loaded, batch, refs, opts, sampling, dev, output, err)
    elif stream:
        _run_stream(loaded, text, refs, opts, sampling, dev, output, play, err)
    else:
        _run_whole(loaded, text, refs, opts, sampling, dev, output, play, err)


def _load(model: str | None, device: str, dtype: str, compile: bool, err):
    import torch

    from valle_cli.codecs.base import resolve_device
    from valle_cli.infer.load import default_model, load_model
    from valle_cli.model.quant import check_dtype

    check_dtype(dtype)
    dev = str(resolve_device(device))
    if dev == "cpu":
        from valle_cli import threads

        threads.apply()  # the cores other programs leave free (valle_cli/threads.py)
    source = model
    if source is None:
        source, why = default_model()
        err.print(why, markup=False)
    loaded = load_model(source, dev)
    from valle_cli.model.quant import dtype_note, set_dtype

    # int8/int4: weight-only quantized linears, bf16 activations (model/quant.py)
    set_dtype(loaded.model, dtype)
    if note := dtype_note(loaded.model, dtype):
        err.print(note, markup=False)
    if compile:
        loaded.model.backbone.compile(dynamic=True)
    torch.set_grad_enabled(False)
    return loaded, dev


def _progress(err, total_hint: str):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn(total_hint),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=True,
    )


def _step_progress(err):
    """Bars for the segments of a text and for the steps within one (level 0: the share of the text spoken, or
    frames, or parallel passes; then the NAR levels), with time left; gone once it is done."""
    from valle_cli.cli.progress import bars

    return bars(err, label=8, transient=True)


def _summary(err, what: str, seconds_audio: float, wall: float, source, output, extra: str = "") -> None:
    rtf = wall / seconds_audio if seconds_audio else float("nan")
    err.print(
        f"{what}, {seconds_audio:.2f} s of audio in {wall:.2f} s (real-time factor {rtf:.2f}) with {source}"
        + extra
        + f" -> {output}",
        markup=False,
    )


def _run_whole(loaded, text, refs, opts, sampling, dev, output, play, err) -> None:
    from valle_cli.audio.io import save_audio
    from valle_cli.infer.synth import segments, synthesize

    n = len(segments(text, opts.split_sentences))
    with _step_progress(err) as bar:
        segs = bar.add_task("segments", total=n, visible=n > 1)
        steps = [bar.add_task("level 0", total=None), "level 0"]  # (task, its phase)

        def step(phase: str, done: int, total: int | None) -> None:
            if steps[1] != phase:  # a new phase: its own bar and time left (or none: a classic AR's frames)
                bar.remove_task(steps[0])
                steps[:] = [bar.add_task(phase, total=total), phase]
            bar.update(steps[0], completed=done, total=total)

        result = synthesize(
            loaded,
            text,
            refs,
            opts,
            sampling,
            dev,
            lambda done, total: bar.update(segs, completed=done),
            step,
        )
    save_audio(output, result.audio, result.sample_rate)
    unfinished = sum(not s for s in result.stopped)
    _summary(
        err,
        f"{result.lines} line(s)"
        + (f" in {result.segments} segments" if result.segments != result.lines else ""),
        result.audio.size / result.sample_rate,
        result.seconds,
        loaded.source,
        output,
        f"; {unfinished} segment(s) hit --max-ar-steps" if unfinished else "",
    )
    if play:
        from valle_cli.audio.play import Player

        with Player(result.sample_rate) as player:  # Ctrl-C stops playback at once
            player.write(result.audio)


def _run_stream(loaded, text, refs, opts, sampling, dev, output, play, err) -> None:
    """Chunks are written to OUTPUT as they come (the file grows while the model runs; a reader sees a valid
    WAV up to the last chunk) and, with --play, queued for playback."""
    import soundfile as sf

    from valle_cli.errors import ValleError
    from valle_cli.infer.synth import synthesize_stream

    t0 = time.time()
    first = None
    total = sr = 0
    writer = player = None
    failed = True
    try:
        for chunk, sr in synthesize_stream(loaded, text, refs, opts, sampling, dev):
            if writer is None:
                fmt = output.suffix.lstrip(".").upper()
                try:
                    writer = sf.SoundFile(
                        output, "w", sr, 1, "VORBIS" if fmt == "OGG" else "PCM_16", format=fmt
                    )
                except (OSError, RuntimeError) as exc:
                    raise ValleError(
                        f"cannot write {output} ({exc})", "check the path and free space"
                    ) from None
                if play:
                    from valle_cli.audio.play import Player

                    player = Player(sr)
            if first is None and chunk.size:
                first = time.time() - t0
            writer.write(chunk)
            writer.flush()  # the header is updated: the file is valid up to here
            if player:
                player.write(chunk)
            total += chunk.size
        failed = False
    finally:
        if writer is not None:
            writer.close()
        if player is not None:
            player.abort() if failed else player.close()
    if not total:
        output.unlink(missing_ok=True)
        raise ValleError("the model produced no audio (it stopped at once)", "check the model")
    _summary(
        err,
        "streamed",
        total / sr,
        time.time() - t0,
        loaded.source,
        output,
        f"; first audio after {first:.2f} s" if first is not None else "",
    )


def _run_batch(loaded, batch, refs, opts, sampling, dev, output, err) -> None:
    from valle_cli.audio.io import save_audio
    from valle_cli.errors import ValleError
    from valle_cli.infer.synth import synthesize_lines

    try:
        lines = [ln for ln in batch.read_text(encoding="utf-8").splitlines() if ln.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise ValleError(f"cannot read the batch file {batch} ({exc})", "give a UTF-8 text file") from None
    if not lines:
        raise ValleError(f"the batch file {batch} has no text", "put one sentence on each line")
    output.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with _progress(err, "lines") as bar:
        task = bar.add_task("batch", total=len(lines))
        audios, sr, stopped = synthesize_lines(
            loaded, lines, refs, opts, sampling, dev, lambda done, total: bar.update(task, completed=done)
        )
    seconds = 0.0
    width = max(4, len(str(len(lines))))
    from valle_cli.cli.interrupt import on_interrupt

    written = [0]
    on_interrupt(lambda: f"{written[0]} of {len(lines)} files were written to {output}")
    for i, audio in enumerate(audios, 1):
        if audio.size:
            save_audio(output / f"{i:0{width}d}.wav", audio, sr)
            seconds += audio.size / sr
        written[0] = i
    empty = sum(a.size == 0 for a in audios)
    capped = [i for i, ok in enumerate(stopped, 1) if not ok]
    _summary(
        err,
        f"{len(lines)} line(s)",
        seconds,
        time.time() - t0,
        loaded.source,
        output,
        (f"; {empty} line(s) produced no audio" if empty else "")
        + (f"; {len(capped)} line(s) hit --max-ar-steps (line {', '.join(map(str, capped[:5]))}"
           f"{', ...' if len(capped) > 5 else ''})" if capped else ""),
    )  # fmt: skip
