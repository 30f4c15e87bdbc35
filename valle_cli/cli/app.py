"""The `valle` command: one Typer app, one module per verb.

Verb modules import only typer/rich at module level; torch and the engines are imported inside the command
functions, so `valle --help` stays well under a second. Errors: a `ValleError` raised anywhere becomes one
red line with its remedy and the error's exit code; any other exception becomes one line naming it and how to
see the traceback. `--debug` shows tracebacks instead.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import types


def _early_interrupt(signum, frame) -> None:
    """Ctrl-C before `main` runs (while the command's modules import): nothing has started, so say so and
    leave with the usual status instead of a traceback from inside an import."""
    name = signal.Signals(signum).name
    os.write(2, f"interrupted ({name}) while starting; nothing was done\n".encode())
    os._exit(128 + signum)


def _started_as_valle() -> bool:
    """Whether this process is the `valle` command (its script, `python -m valle_cli` or `... .cli.app`), not a
    program that imports the package."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if getattr(spec, "name", None) in ("valle_cli.__main__", "valle_cli.cli.app"):
        return True
    return os.path.basename(getattr(main, "__file__", "") or "") == "valle"


if _started_as_valle() and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    with contextlib.suppress(ValueError):  # not the main thread
        signal.signal(signal.SIGINT, _early_interrupt)

import typer  # noqa: E402

from valle_cli import __version__  # noqa: E402
from valle_cli.cli import (  # noqa: E402
    codec,
    config,
    dataset,
    eval_cmd,
    export,
    plot,
    plugins_cmd,
    prepare,
    serve,
    stt,
    synth,
    train,
    tui,
)

app = typer.Typer(
    name="valle",
    help="Zero-shot text-to-speech with VALL-E: prepare data, train, fine-tune, synthesize, serve.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    rich_markup_mode=None,  # click's plain help: option names never cut at 80 columns, no <bool> columns
)

# The "Examples" block at the end of each verb's --help (commands as README runs them).
EXAMPLES = {
    "prepare": [
        "valle prepare ./voices -o ./dataset      # voices/{group}/{speaker}/*.wav",
        "valle prepare ./voices -o ./dataset --hdf5   # also one dataset.h5",
        "valle prepare ./voices -o part0 --shard 0/2  # half the files; merge later",
    ],
    "train": [
        "valle train --try-me                           # the whole pipeline, minutes",
        "valle train small --set data.paths=[./dataset] -o runs/mine  # resumes",
        "torchrun --nproc-per-node 2 -m valle_cli train my.yaml -o runs/ddp",
    ],
    "export": [
        "valle export runs/mine -o mine.safetensors --dtype fp16",
        "valle export runs/mine --hf hub/valle-mine     # model + config.json + card",
    ],
    "synth": [
        'valle synth "Hello there." --ref voice.wav -o out.wav',
        'valle synth "Hello there." --ref voice.wav --model runs/mine --play',
        'valle synth "First line.\\nSecond line." --stream --play',
        "valle synth --batch lines.txt --ref voice.wav -o out/",
    ],
    "stt": ["valle stt speech.wav --model runs/mine"],
    "eval": [
        "valle eval runs/mine --texts held-out.txt --refs voices/ -o report/",
        "valle eval runs/mine --dataset ./dataset -o report/",
    ],
    "plot": [
        'valle plot runs/mine runs/other --ys "loss eval.text_gap" -o curves.png',
        "valle plot runs/mine --terminal",
        'valle plot --alignment runs/mine --text "Hello." --ref clip.wav -o align.png',
    ],
    "serve": [
        "valle serve                                    # http://127.0.0.1:7860",
        "valle serve --model mine=runs/mine --api-key $KEY",
    ],
    "tui": [
        "valle tui small --set data.paths=[./dataset] -o runs/mine  # start, watch",
        "valle tui runs/mine                          # attach to a run",
    ],
    "plugins": ["valle plugins"],
    "config": ["valle config small --set train.lr=3e-4 -o my-config.yaml"],
    "dataset": ["valle dataset stats ./dataset", "valle dataset merge part0 part1 -o ./dataset"],
    "codec": [
        "valle codec fit ./my-recordings -o my-codec.safetensors",
        "valle codec roundtrip sample.wav -o back.wav",
    ],
}


def _epilog(verb: str) -> str:
    """Click keeps a paragraph that starts with \\b as written (no rewrapping)."""
    return "\b\nExamples:\n" + "\n".join("  " + line for line in EXAMPLES[verb])


_state: dict = {"debug": False, "signal": None}


def _version(value: bool) -> None:
    if value:
        typer.echo(f"valle {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks instead of one-line errors."),
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    _state["debug"] = debug or os.environ.get("VALLE_DEBUG", "") not in ("", "0")


# every verb: (name, function, its help's first line, the line `valle --help` lists it with: short enough for
# 80 columns); its --help ends with its EXAMPLES
VERBS = [
    ("prepare", prepare.prepare, "Turn voices/{group}/{speaker}/ audio into a training dataset (resumable).",
     "Audio in voices/{group}/{speaker}/ -> a training dataset."),
    ("train", train.train, "Train or fine-tune the AR+NAR model; rerun to resume; live commands on stdin.",
     "Train or fine-tune; rerun to resume; live commands."),
    ("export", export.export,
     "Export a checkpoint or run folder to one file (LoRA merged or alone) or a hub folder (--hf).",
     "A checkpoint or run -> one model file or a hub folder."),
    ("synth", synth.synth, 'Synthesize speech: valle synth "text" --ref voice.wav --model RUN -o out.wav.',
     "Text -> speech, in the voice of a reference clip."),
    ("stt", stt.stt, "Transcribe audio to IPA phonemes with the model's speech-to-text task.",
     "Speech -> IPA phonemes (the model's own speech-to-text)."),
    ("eval", eval_cmd.eval_,
     "Measure a model: WER and speaker similarity on held-out sentences, vs ground truth.",
     "WER and voice similarity of a model, vs ground truth."),
    ("plot", plot.plot, "Plot training metrics of one or more runs (PNG or in the terminal).",
     "Training curves of runs (PNG or in the terminal)."),
    ("serve", serve.serve, "Serve an OpenAI-compatible speech API (and web UI) on loopback by default.",
     "An OpenAI-compatible speech API and web UI."),
    ("tui", tui.tui, "Watch and steer a training run in a terminal UI (save, lr, eval, pause, stop).",
     "Watch and steer a training run in the terminal."),
    ("plugins", plugins_cmd.plugins,
     "List codec, backbone, transcriber and model plugins and whether each loads.",
     "Installed plugins, and whether each loads."),
    ("config", config.config,
     "Print (or write) a resolved config from a YAML file or preset, with --set overrides.",
     "Print or write a resolved config, with --set overrides."),
]  # fmt: skip
for _name, _verb, _help, _short in VERBS:
    app.command(_name, epilog=_epilog(_name), help=_help, short_help=_short)(_verb)
app.add_typer(
    dataset.app,
    name="dataset",
    epilog=_epilog("dataset"),
    help="Inspect, convert, merge and re-index prepared datasets.",
)
app.add_typer(
    codec.app,
    name="codec",
    epilog=_epilog("codec"),
    help="Offline codec tools: fit codebooks on your audio, round-trip a file.",
    short_help="Offline codec tools: fit codebooks, round-trip a file.",
)


def _fail(message: str, remedy: str | None, code: int) -> None:
    from rich.console import Console

    err = Console(stderr=True, highlight=False, soft_wrap=True)
    err.print(f"[bold red]error:[/] {message}", markup=True) if _markup_safe(message) else err.print(
        "error: " + message, markup=False
    )
    if remedy:
        err.print("  remedy: " + remedy, markup=False, style="yellow")
    sys.exit(code)


def _markup_safe(text: str) -> bool:
    return "[" not in text


def _interrupt(signum, frame) -> None:
    """SIGINT and SIGTERM for every verb: unwind (finally blocks and context managers run, temporaries are
    removed), then exit 130 or 143. Verbs that save first (train) install their own handlers meanwhile. A
    second signal while unwinding exits at once (the user asked twice; nothing half-written is renamed into
    place, so nothing is lost that the first did not already give up)."""
    if _state["signal"] is not None:
        os.write(2, b"\ninterrupted again: exiting now\n")
        os._exit(128 + signum)
    _state["signal"] = signum
    raise KeyboardInterrupt


def _interrupted(code: int) -> None:
    """Not an error: one line on stderr, then the exit status of a program stopped by that signal."""
    import signal

    from rich.console import Console

    name = signal.Signals(code - 128).name if code in (130, 143) else "SIGINT"
    from valle_cli.cli.interrupt import kept_line

    Console(stderr=True, highlight=False, soft_wrap=True).print(
        f"interrupted ({name}); {kept_line()}",
        style="yellow",
        markup=False,
    )
    if _state["signal"] is None:
        sys.exit(code)
    # A signal really came. CPython remembers a KeyboardInterrupt raised inside some embedded evaluations (an
    # import in progress, for one) even when it was caught, and then kills itself with SIGINT at exit, which
    # replaces our status (seen: -2 instead of 130 when Ctrl-C landed while torch was importing). So run the
    # exit handlers here and leave with the status we mean. Everything above has unwound already.
    import atexit

    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    atexit._run_exitfuncs()
    os._exit(code)


def command():
    """The command tree of `app`, with plain metavars (PATH, N, X, TEXT) where Typer would print Python type
    names (<list[Path]>, <float>)."""
    import typing
    from pathlib import Path

    names = {Path: "PATH", int: "N", float: "X", str: "TEXT"}
    tree = typer.main.get_command(app)
    todo = [tree]
    while todo:
        cmd = todo.pop()
        todo.extend(getattr(cmd, "commands", {}).values())
        for param in cmd.params:
            if param.metavar is not None or getattr(param, "is_flag", False):
                continue
            kind = getattr(getattr(param, "type_descriptor", None), "annotation", None)
            while typing.get_origin(kind) in (list, typing.Union, types.UnionType):
                kind = next(a for a in typing.get_args(kind) if a is not type(None))
            if param.param_type_name == "argument":  # its name says it: AUDIO..., not AUDIO <list[Path]>
                param.display_type_rich = lambda ctx: None
            elif kind in names:
                param.metavar = names[kind]
    return tree


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    import signal
    import threading

    from valle_cli.errors import ValleError

    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    _state["signal"] = None
    from valle_cli.cli.interrupt import on_interrupt

    on_interrupt(None)
    if threading.current_thread() is threading.main_thread():
        for s in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(s) in (signal.SIG_DFL, signal.default_int_handler, _early_interrupt):
                signal.signal(s, _interrupt)
    try:
        # standalone_mode=False: errors reach the handlers below. Typer then returns what would have been the
        # exit code (an Exit's, or 130 for Ctrl-C) instead of exiting, so it is passed on here.
        code = command()(args=argv, standalone_mode=False)
    except ValleError as exc:
        if debug or _state["debug"]:
            raise
        _fail(exc.message, exc.remedy, exc.exit_code)
    except KeyboardInterrupt:
        _interrupted(128 + (_state["signal"] or signal.SIGINT))
    except (typer.Exit, SystemExit) as exc:
        code = getattr(exc, "exit_code", getattr(exc, "code", 0))
        sys.exit(code or 0)
    except typer.Abort:
        _fail("aborted", None, 1)
    except Exception as exc:
        if _state["signal"] is not None and not (debug or _state["debug"]):  # an interrupt in another guise
            _interrupted(128 + _state["signal"])
        if hasattr(exc, "show") and hasattr(exc, "exit_code"):  # click/typer usage errors print themselves
            exc.show()
            sys.exit(exc.exit_code)
        if debug or _state["debug"]:
            raise
        _fail(
            f"unexpected {type(exc).__name__}: {exc}",
            "rerun with `valle --debug ...` for the traceback and report it if it looks like a bug",
            1,
        )
    else:
        if isinstance(code, int) and not isinstance(code, bool) and code:
            if _state["signal"] is not None:  # Typer turned our KeyboardInterrupt into 130
                _interrupted(128 + _state["signal"])
            sys.exit(code)


if __name__ == "__main__":
    main()
