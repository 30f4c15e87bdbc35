"""`valle train CONFIG`: train or resume a run; live commands from stdin."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import typer


def train(
    config_file: str = typer.Argument(None, help="Config YAML (or a preset name) with data.paths set."),
    set_: list[str] = typer.Option(None, "--set", help="Override: section.key=value (repeatable)."),
    run: Path = typer.Option(
        None, "--out-dir", "-o", help="Run folder (default: the config's train.out_dir)."
    ),
    eval_only: bool = typer.Option(False, "--eval", help="Only evaluate the latest checkpoint, then exit."),
    random_text_prompts: bool = typer.Option(
        False,
        "--random-text-prompts",
        help="Eval samples say built-in English sentences (Harvard) drawn at random, not their own "
        "transcripts (train.eval_texts; at least 4 samples).",
    ),
    try_me: bool = typer.Option(
        False,
        "--try-me",
        help="Quick check: memorize one utterance, then synthesize it (output: -o, default try-me/).",
    ),
    text: str = typer.Option(
        None, help="--try-me: the sentence (spoken by an offline voice unless --audio)."
    ),
    audio: Path = typer.Option(None, help="--try-me: your own recording of --text."),
    steps: int = typer.Option(400, help="--try-me: training steps."),
) -> None:
    """Train the AR+NAR model. Rerun on the same run folder to resume from its latest checkpoint. While it
    runs, type `save`, `quit`, `lr 1e-4`, `eval`, `export`, `status`, `pause` or `resume` and Enter, or steer it
    from another terminal with `valle tui RUN_DIR`."""
    from rich.console import Console

    from valle_cli.config import load_config
    from valle_cli.train.commands import Commands
    from valle_cli.train.log import describe
    from valle_cli.train.trainer import Trainer

    console = Console(stderr=True, highlight=False, soft_wrap=True)
    if try_me:
        _try_me(console, run or Path("try-me"), text, audio, steps)
        return
    if config_file is None:
        from valle_cli.errors import ConfigError

        raise ConfigError(
            "valle train needs a config file or preset", "e.g. valle train small --set data.paths=[DIR]"
        )
    cfg = load_config(config_file, set_ or [])
    if random_text_prompts:
        from valle_cli.text.sentences import HARVARD

        if not cfg.train.eval_texts:
            cfg.train.eval_texts, cfg.train.eval_texts_language = list(HARVARD), "en"
        cfg.train.eval_samples = max(cfg.train.eval_samples, 4)

    bar = progress_bar(console)
    task = bar.add_task("train", total=cfg.train.steps, stats="starting")

    pace: list[tuple[float, int]] = []  # (time, step) of this session's first steps

    def events(kind: str, p: dict) -> None:
        if kind == "step":
            stats = f"loss {p['loss']:.3f} lr {p['lr']:.2e} {p['tokens_per_s']:.0f} tok/s"
            bar.update(task, completed=p["step"], stats=stats)
            if len(pace) < 2:
                pace.append((time.monotonic(), p["step"]))  # the first step pays for warm-up: timed from it
            elif pace[1][1] >= 0 and p["step"] - pace[1][1] >= EXPECT_AFTER:
                console.print(
                    expected_time(pace[1], (time.monotonic(), p["step"]), cfg.train.steps), markup=False
                )
                pace[1] = (0.0, -1)  # said once
        elif kind in ("eval", "save", "warn", "info"):
            console.print(describe(kind, p), style="yellow" if kind == "warn" else None, markup=False)

    def reply(r: dict) -> None:
        if not r["ok"]:
            console.print("command error: " + r.get("error", "?"), style="red", markup=False)
        elif r.get("command") == "status":
            state = "paused" if r["paused"] else "running"
            console.print(
                f"{state}: step {r['step']} of {r['steps']}, lr {r['lr']:.3g}, {r['tokens']} tokens",
                markup=False,
            )

    commands = Commands()
    commands.read_stdin(reply)
    trainer = Trainer(cfg, run or Path(cfg.train.out_dir), events, commands, control=True)
    trainer.quiet_after_signal = True  # after a signal's save the command only says so and exits
    bar.update(task, completed=trainer.step)
    from valle_cli.train import distributed

    try:
        with contextlib.nullcontext() if eval_only else bar:  # --eval trains nothing: no training bar
            info = trainer.train(eval_only=eval_only)
    except BaseException:
        distributed.teardown(wait=False)
        raise
    distributed.teardown()  # a process group left alive can abort the process at exit (gloo threads)
    console.print(f"stopped at step {info.step}; run folder {info.run}", markup=False)
    if info.signal is not None:  # saved: say so, and exit as an interrupted program does (130, or 143)
        console.print(
            f"interrupted ({info.signal}): step {info.step} is saved; rerun the same command to resume",
            markup=False,
        )
        raise typer.Exit(143 if info.signal == "SIGTERM" else 130)


EXPECT_AFTER = 10  # steps timed before `valle train` says how long the run will take


def expected_time(first: tuple[float, int], now: tuple[float, int], steps: int) -> str:
    """One line: the measured time per step, and the rest of the run at that pace (evaluations and saves
    come on top); a run of days on this machine gets the remedies."""
    per_step = (now[0] - first[0]) / max(now[1] - first[1], 1)
    left = per_step * max(steps - now[1], 0)
    finish = time.strftime("%a %H:%M", time.localtime(time.time() + left))
    span = _span(left)
    about = "" if span == "under a minute" else "about "
    line = f"{per_step:.2f} s/step here: the {steps - now[1]} steps left take {about}{span} (until {finish})"
    if left > 24 * 3600:
        line += "; for a shorter run lower train.steps, pick a smaller preset (tiny), or train on a GPU"
    return line


def _span(seconds: float) -> str:
    if seconds >= 2 * 24 * 3600:
        return f"{seconds / 86400:.1f} days"
    h, m = divmod(round(seconds / 60), 60)
    return f"{h} h {m:02d} min" if h else f"{m} min" if m else "under a minute"


def progress_bar(console, get_time=None):
    """One live progress line (step, loss, lr, tokens/s, ETA); events and command replies print above it."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("train"),
        BarColumn(bar_width=24),
        MofNCompleteColumn(),
        TextColumn("{task.fields[stats]}"),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
        speed_estimate_period=24 * 3600,  # Rich's default (30 s) shows no ETA at all once a step takes longer
        get_time=get_time,
    )


def _try_me(console, output: Path, text: str | None, audio: Path | None, steps: int) -> None:
    from valle_cli.errors import ValleError
    from valle_cli.train.tryme import DEFAULT_TEXT, try_me

    if audio is not None and not text:
        raise ValleError(
            "--audio needs --text, the words spoken in it", 'e.g. --audio me.wav --text "Hello there."'
        )

    def events(kind: str, p: dict) -> None:
        if kind == "step" and (p["step"] % 50 == 0 or p["step"] == 1):
            console.print(f"step {p['step']:>4} loss {p['loss']:.3f}", markup=False)

    report = try_me(output, text or DEFAULT_TEXT, audio, steps, events)
    levels = " ".join(f"{m:.0%}" for m in report.level_match)
    console.print(
        f"trained {report.steps} steps in {report.train_seconds:.0f} s (loss {report.first_loss:.2f} -> "
        f"{report.last_loss:.3f}); synthesized in {report.synth_seconds:.1f} s",
        markup=False,
    )
    console.print(
        f"generated {report.generated_frames} frames for a {report.frames}-frame utterance"
        f"{', stopped by itself' if report.stopped else ', did not stop'}; tokens equal to the real ones per RVQ "
        f"level: {levels}",
        markup=False,
    )
    console.print(
        f"listen: {output / 'try-me.wav'} (voice: {report.voice}; prompt: its first 3 s)", markup=False
    )
