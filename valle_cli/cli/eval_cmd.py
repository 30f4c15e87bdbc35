"""`valle eval MODEL --texts FILE --refs DIR | --dataset DIR`: intelligibility and voice similarity of a model."""

from __future__ import annotations

from pathlib import Path

import typer


def eval_(
    model: str = typer.Argument(..., help="Run folder, checkpoint, exported file, model plugin or hub id."),
    texts: Path = typer.Option(None, help="Held-out sentences, one per line (with --refs)."),
    refs: Path = typer.Option(
        None,
        help="Reference voices: DIR/VOICE/*.wav with .txt transcripts, or prepare's DIR/{group}/{speaker}/.",
    ),
    dataset: Path = typer.Option(None, help="Or a prepared dataset: its utterances and speakers."),
    impostors: Path = typer.Option(
        None, help="Other voices (DIR/VOICE/*.wav): count how often the output is closest to its own voice."
    ),
    limit: int = typer.Option(50, help="At most this many items."),
    language: str = typer.Option("en", help="Language of the texts."),
    transcriber: str = typer.Option(
        "auto", help="ASR for WER: auto (whisper if cached, else pocketsphinx), ..."
    ),
    verifier: str = typer.Option(
        "auto", help="Speaker verifier: auto (wavlm if cached), wavlm, resemblyzer."
    ),
    seed: int = typer.Option(0, help="Sampling seed of the first item (then +1 per item)."),
    ar_temp: float = typer.Option(0.95, help="AR sampling temperature, as `valle synth` (0 = greedy)."),
    top_k: int = typer.Option(0, help="AR: keep the k most likely tokens (0 = all), as `valle synth`."),
    top_p: float = typer.Option(1.0, help="AR: nucleus sampling probability, as `valle synth`."),
    output: Path = typer.Option(Path("eval-report"), "--output", "-o", help="Report folder."),
    keep_audio: bool = typer.Option(True, "--keep-audio/--no-audio", help="Keep the synthesized clips."),
    device: str = typer.Option("auto", help="cpu, cuda, cuda:N or auto."),
) -> None:
    """Synthesize held-out sentences in reference voices and report word error rate (ASR), speaker similarity,
    the same on the ground truth (the ceiling), phoneme error rate through the model's own stt where it has
    one, and the real-time factor: per voice and overall, as report.md and report.json."""
    import shlex
    import sys
    import tempfile

    from rich.console import Console

    from valle_cli.cli.progress import stage_progress
    from valle_cli.codecs.base import resolve_device
    from valle_cli.eval import items as items_mod
    from valle_cli.eval.judges import Asr, EvalError, build_verifier
    from valle_cli.eval.report import markdown, write
    from valle_cli.eval.run import evaluate
    from valle_cli.infer.load import load_model

    err = Console(stderr=True, highlight=False, soft_wrap=True)
    by_files = texts is not None or refs is not None
    if (dataset is not None) == by_files or (by_files and (texts is None or refs is None)):
        raise EvalError("give either --texts FILE and --refs DIR, or --dataset DIR")
    dev = str(resolve_device(device))
    asr = Asr(transcriber, language)
    judge = build_verifier(verifier, "cpu")
    loaded = load_model(model, dev)
    with tempfile.TemporaryDirectory() as tmp:
        if dataset is not None:
            chosen = items_mod.from_dataset(dataset, limit, Path(tmp) / "truth")
        else:
            chosen = items_mod.from_refs(items_mod.read_texts(texts), refs)[:limit]
        others = None
        if impostors is not None:
            others = items_mod.voices(impostors)
        outputs = output / "audio" if keep_audio else None
        if outputs:
            outputs.mkdir(parents=True, exist_ok=True)
        err.print(f"{len(chosen)} items; ASR {asr.name}, verifier {judge.name}; model {model}", markup=False)
        with stage_progress(err) as update:
            report = evaluate(
                loaded, chosen, asr, judge, language, seed, dev, others, outputs,
                lambda done, total: update("synthesize+judge", done, total),
                {"ar_temp": ar_temp, "top_k": top_k, "top_p": top_p},
            )  # fmt: skip
    command = shlex.join(["valle", *sys.argv[1:]])
    write(report, output, command)
    typer.echo(markdown(report, command))
    err.print(f"report: {output / 'report.md'} and report.json", markup=False)
