"""The `valle` command: one Typer app, one module per verb.

Verb modules import only typer/rich at module level; torch and the engines are imported inside the command
functions, so `valle --help` stays well under a second. Errors: a `ValleError` raised anywhere becomes one
red line with its remedy and the error's exit code; any other exception becomes one line naming it and how to
see the traceback. `--debug` shows tracebacks instead.
"""

from __future__ import annotations

import os
import sys

import typer

from valle_cli import __version__
from valle_cli.cli import (
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
)

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


app.command("prepare", help="Turn voices/{group}/{speaker}/ audio into a training dataset (resumable).")(
    prepare.prepare
)
app.command("train", help="Train or fine-tune the AR+NAR model; rerun to resume; live commands on stdin.")(
    train.train
)
app.command(
    "export",
    help="Export a checkpoint or run folder to one file (LoRA merged or alone) or a hub folder (--hf).",
)(export.export)
app.command("synth", help='Synthesize speech: valle synth "text" --ref voice.wav --model RUN -o out.wav.')(
    synth.synth
)
app.command("stt", help="Transcribe audio to IPA phonemes with the model's speech-to-text task.")(stt.stt)
app.command(
    "eval", help="Measure a model: WER and speaker similarity on held-out sentences, vs ground truth."
)(eval_cmd.eval_)
app.command("plot", help="Plot training metrics of one or more runs (PNG or in the terminal).")(plot.plot)
app.command("serve", help="Serve an OpenAI-compatible speech API (and web UI) on loopback by default.")(
    serve.serve
)
app.command("tui", help="Watch and steer a training run in a terminal UI (save, lr, eval, pause, stop).")(
    tui.tui
)
app.command("plugins", help="List codec, backbone, transcriber and model plugins and whether each loads.")(
    plugins_cmd.plugins
)
app.command(
    "config", help="Print (or write) a resolved config from a YAML file or preset, with --set overrides."
)(config.config)
app.add_typer(dataset.app, name="dataset", help="Inspect, convert, merge and re-index prepared datasets.")
app.add_typer(
    codec.app, name="codec", help="Offline codec tools: fit codebooks on your audio, round-trip a file."
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
    removed), then exit 130 or 143. Verbs that save first (train) install their own handlers meanwhile."""
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
    sys.exit(code)


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
            if signal.getsignal(s) in (signal.SIG_DFL, signal.default_int_handler):
                signal.signal(s, _interrupt)
    try:
        # standalone_mode=False: errors reach the handlers below. Typer then returns what would have been the
        # exit code (an Exit's, or 130 for Ctrl-C) instead of exiting, so it is passed on here.
        code = app(args=argv, standalone_mode=False)
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
