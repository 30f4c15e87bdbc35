"""The `valle` command shell: help, version, errors, debug tracebacks."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

VERBS = [
    "prepare",
    "dataset",
    "train",
    "export",
    "synth",
    "stt",
    "plot",
    "serve",
    "tui",
    "plugins",
    "config",
    "codec",
]


def run(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "valle_cli.cli.app", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
    )


def test_help_lists_every_verb_with_a_line_of_help():
    proc = run("--help")
    assert proc.returncode == 0, proc.stderr
    for verb in VERBS:
        lines = [ln for ln in proc.stdout.splitlines() if f" {verb} " in ln]
        assert lines, f"{verb} missing from --help"
        assert len(lines[0].split(verb, 1)[1].strip()) > 15, f"{verb} has no real help line"


def test_help_does_not_import_torch_and_is_quick():
    code = (
        "import sys, time; t = time.time()\n"
        "from valle_cli.cli.app import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules, 'valle --help imported torch'\n"
        "assert 'numpy' not in sys.modules, 'valle --help imported numpy'\n"
        "print('ELAPSED', time.time() - t)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert float(proc.stdout.split("ELAPSED")[1]) < 30  # generous: only catches an import that hangs


def _every_command():
    from valle_cli.cli.app import command

    tree = command()
    for name, cmd in tree.commands.items():
        yield [name], cmd
        for sub, subcmd in getattr(cmd, "commands", {}).items():
            yield [name, sub], subcmd


def test_help_fits_80_columns_and_shows_examples_that_use_real_options():
    """At 80 columns no option name is cut and no Python type is printed; every verb ends with examples, and
    every option an example uses exists (so the examples cannot rot)."""
    import shlex

    import typer._click as ck

    from valle_cli.cli.app import EXAMPLES, command

    tree = command()
    seen = set()
    for group in [tree, *(c for c in tree.commands.values() if hasattr(c, "commands"))]:  # command lists
        ctx = ck.Context(group, info_name="valle", terminal_width=80, max_content_width=80)
        listing = group.get_help(ctx)
        cut = [ln for ln in listing.splitlines() if ln.endswith("...") and not ln.startswith("Usage:")]
        assert not cut, listing  # no command's line cut short
    for path, cmd in _every_command():
        parent = ck.Context(tree, info_name="valle")
        ctx = ck.Context(
            cmd, info_name=" ".join(path), parent=parent, terminal_width=80, max_content_width=80
        )
        text = cmd.get_help(ctx)
        where = f"valle {' '.join(path)} --help"
        assert max(len(line) for line in text.splitlines()) <= 80, where
        assert "…" not in text and not re.search(r"<[A-Za-z_][\w.\[\], ]*>", text), (where, text)  # <bool>
        for param in cmd.params:
            for opt in param.opts + param.secondary_opts:
                assert opt in text, (where, opt)
        if len(path) == 1:
            assert "Examples:\n    valle " in text or "Examples:\n    torchrun" in text, where
    for verb, lines in EXAMPLES.items():
        for line in lines:
            words = shlex.split(line.split("  #")[0].replace("$KEY", "k"))
            words = (
                words[words.index("valle") + 1 :]
                if "valle" in words
                else words[words.index("valle_cli") + 1 :]
            )
            cmd, rest = tree.commands[words[0]], words[1:]
            if rest and rest[0] in getattr(cmd, "commands", {}):
                cmd, rest = cmd.commands[rest[0]], rest[1:]
            known = {o for p in cmd.params for o in p.opts + p.secondary_opts}
            for word in rest:
                if word.startswith("-"):
                    assert word in known, (line, word)
                    seen.add(verb)
    assert seen >= {"prepare", "train", "synth", "export", "eval", "plot", "serve", "config"}


def test_version():
    from valle_cli import __version__

    proc = run("--version")
    assert proc.returncode == 0
    assert proc.stdout.strip() == f"valle {__version__}"


def test_tui_refuses_what_is_neither_a_run_nor_a_config(tmp_path):
    proc = run("tui", str(tmp_path))
    assert proc.returncode != 0 and "is not a run folder" in proc.stderr and "Traceback" not in proc.stderr
    proc = run("tui", "tiny", "--set", "train.stesp=3")
    assert proc.returncode == 2 and "did you mean 'train.steps'" in proc.stderr


def test_errors_are_one_line_with_remedy_and_debug_shows_traceback():
    proc = run("config", "tiny", "--set", "model.d_modle=32")
    assert proc.returncode == 2
    assert "unknown config key 'model.d_modle'" in proc.stderr
    assert "did you mean 'model.d_model'" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = run("--debug", "config", "tiny", "--set", "model.d_modle=32")
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "ConfigError" in proc.stderr


def test_usage_errors_come_from_click():
    proc = run("config", "--no-such-flag")
    assert proc.returncode == 2
    assert "No such option" in proc.stderr


def test_config_writes_resolved_yaml(tmp_path):
    out = tmp_path / "resolved.yaml"
    proc = run("config", "small", "--set", "train.lr=3e-4", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    from valle_cli.config import load_config

    cfg = load_config(out)
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.model.d_model == 384
