"""`valle prepare VOICES -o DATASET`: from a folder of voices to a training dataset."""

from __future__ import annotations

from pathlib import Path

import typer


def prepare(
    voices: Path = typer.Argument(..., help="Folder laid out as {group}/{speaker}/ with audio files below."),
    output: Path = typer.Option(..., "--output", "-o", help="Dataset folder to write (resumable)."),
    config_file: str = typer.Option(
        None, "--config", "-c", help="Config file or preset (codec and data sections)."
    ),
    set_: list[str] = typer.Option(None, "--set", help="Override: section.key=value (repeatable)."),
    codec: str = typer.Option(None, "--codec", help="Codec plugin (default: the config's)."),
    language: list[str] = typer.Option(
        None, "--language", "-l", help="LANG for all, or GROUP=LANG / GROUP/SPEAKER=LANG (repeatable)."
    ),
    transcriber: str = typer.Option(None, help="Transcriber plugin for audio without transcripts."),
    min_duration: float = typer.Option(None, help="Skip utterances shorter than this (seconds)."),
    max_duration: float = typer.Option(None, help="Skip utterances longer than this (seconds)."),
    workers: int = typer.Option(2, help="Processes that load audio and phonemize."),
    batch_size: int = typer.Option(16, help="Utterances quantized together."),
    shard: str = typer.Option(
        None, help="i/n: process only this shard of the corpus (join with valle dataset merge)."
    ),
    top_k: int = typer.Option(8, help="Similar utterances kept per utterance."),
    hdf5: bool = typer.Option(False, "--hdf5", help="Also write the dataset as one HDF5 file, OUTPUT.h5."),
    device: str = typer.Option("auto", help="Where to quantize: auto, cpu, cuda, cuda:N."),
    align_steps: int = typer.Option(
        None,
        help="Training steps of the phoneme aligner that gives every frame its phoneme (needed by "
        "model.alignment=pointer); default: by the dataset's size (100-1500); 0 skips it.",
    ),
) -> None:
    """Turn voices/{group}/{speaker}/ audio into a training dataset: transcripts, phonemes, codec tokens,
    similar-utterance lists, an index. Rerun the same command to resume after an interruption."""
    from rich.console import Console

    from valle_cli.cli.interrupt import on_interrupt
    from valle_cli.cli.progress import stage_progress
    from valle_cli.config import load_config
    from valle_cli.prepare.discover import parse_language_map
    from valle_cli.prepare.pipeline import PrepareOptions, PrepareReport, parse_shard
    from valle_cli.prepare.pipeline import prepare as run_prepare

    overrides = list(set_ or [])
    if codec:
        overrides.append(f"codec.name={codec}")
    if transcriber:
        overrides.append(f"data.transcriber={transcriber}")
    cfg = load_config(config_file, overrides)
    default_lang, lang_map = parse_language_map(language or [], cfg.data.language)
    opts = PrepareOptions(
        voices=voices,
        output=output,
        codec=cfg.codec,
        language=default_lang,
        languages=lang_map,
        transcriber=cfg.data.transcriber,
        min_duration=cfg.data.min_duration if min_duration is None else min_duration,
        max_duration=cfg.data.max_duration if max_duration is None else max_duration,
        workers=workers,
        batch_size=batch_size,
        shard=parse_shard(shard),
        top_k=top_k,
        device=device,
        align_steps=align_steps,
    )
    console = Console(stderr=True, soft_wrap=True, highlight=False)
    stage = ["starting"]
    report = PrepareReport(output=output)  # filled in as it goes: what an interruption keeps
    on_interrupt(lambda: _kept(report, stage[0]))
    with stage_progress(console) as shown:

        def progress(name: str, done: int, total: int) -> None:
            stage[0] = name
            shown(name, done, total)

        run_prepare(opts, progress, report)
    if hdf5:
        stage[0] = "hdf5"
        from valle_cli.data.hdf5 import folder_to_hdf5

        with stage_progress(console) as bar:
            report.hdf5 = folder_to_hdf5(output, output.with_suffix(".h5"), lambda d, t: bar("hdf5", d, t))
    console.print(
        f"{report.utterances} utterances, {report.seconds / 3600:.2f} h, {report.speakers} speakers in "
        f"{report.groups} groups -> {output}" + (f" and {report.hdf5}" if report.hdf5 else ""),
        markup=False,
    )
    console.print(
        f"{report.new} new, {report.resumed} already done, {len(report.skipped)} skipped, {report.elapsed:.1f} s",
        markup=False,
    )
    if report.alignment:
        a = report.alignment
        how = (
            "kept: the utterances are the ones it was trained on"
            if a.get("reused")
            else f"{a['steps']} steps, loss {a['loss']}, {a['seconds']:.0f} s"
        )
        console.print(
            f"phoneme durations: {a['aligned']} aligned, {a['unaligned']} too short to align (aligner: {how})",
            markup=False,
        )
    for source, reason in report.skipped[:20]:
        console.print(f"  skipped {source}: {reason}", style="yellow", markup=False)
    if len(report.skipped) > 20:
        console.print(
            f"  ... and {len(report.skipped) - 20} more in {output / 'report.json'}", style="yellow"
        )


def _kept(report, stage: str) -> str:
    """What an interrupted prepare leaves for the rerun to build on (from the report it was filling in)."""
    out = report.output
    again = "the same command goes on from there"
    if stage == "starting":
        return (
            f"stopped while getting ready (reading the voices folder, loading the codec); {out} is as it was"
        )
    if stage == "transcribe":
        return (
            f"stopped while transcribing: the transcriptions made are kept in {out / 'transcripts'}; {again}"
        )
    if stage == "hdf5":
        return f"the dataset {out} is complete; its HDF5 file was not written (rerun with --hdf5)"
    doing = {"encode": "encoding", "similar": "listing similar utterances", "align": "aligning phonemes"}
    return f"stopped while {doing.get(stage, stage)}: {report.resumed + report.new} encoded utterance(s) are kept in {out}; {again}"
