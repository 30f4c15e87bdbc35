"""README's shell examples, pasted as a user would: every `valle` command in its bash blocks must parse (its
verb, options and arguments exist), and the cheap ones run in a folder laid out as README assumes (voices/,
dataset/, runs/mine, a clip of speech): help, config, plugins, prepare, dataset stats, synth with the shipped
model and with a run, stt, export, plot. The long ones (train, tui, serve, eval, codec fit) are parsed only;
their own tests run them."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import needs_espeak

pytestmark = needs_espeak

ROOT = Path(__file__).resolve().parents[1]
LONG = {"train", "tui", "serve", "eval", "codec"}  # parsed only


def readme_commands() -> list[list[str]]:
    """Every `.venv/bin/valle ...` line of README's bash blocks, continuation lines joined, comments dropped."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if ".venv/bin/valle " not in line:
                continue
            words = shlex.split(line.split(".venv/bin/valle ", 1)[1], comments=True)
            out.append(words)
    return out


def test_readme_has_the_commands_it_is_checked_for():
    verbs = {words[0] for words in readme_commands()}
    assert {"synth", "prepare", "train", "export", "config", "plugins", "dataset"} <= verbs, verbs


def test_every_readme_command_parses():
    """Options and arguments as README writes them exist (a renamed option fails here, not for a user)."""
    from valle_cli.cli.app import command

    tree = command()
    for words in readme_commands():
        cmd, name, args = tree, "valle", list(words)
        while hasattr(cmd, "commands"):  # a group: its subcommand
            assert args and args[0] in cmd.commands, f"README: valle {shlex.join(words)}: no such command"
            cmd, name, args = cmd.commands[args[0]], args[0], args[1:]
        try:
            cmd.make_context(name, args)
        except Exception as exc:  # click's usage errors (Typer vendors click: no stable import path)
            said = exc.format_message() if hasattr(exc, "format_message") else repr(exc)
            if "does not exist" not in said:  # a file README's reader would have: fine
                raise AssertionError(f"README: valle {shlex.join(words)}: {said}") from None


@pytest.fixture
def readme_folder(dataset, tiny_model, speech_24k, tmp_path):
    """A folder laid out as README's examples assume."""
    import soundfile as sf

    shutil.copytree(dataset.parent / "voices", tmp_path / "voices")
    (tmp_path / "runs").mkdir()
    os.symlink(tiny_model, tmp_path / "runs" / "mine")
    wav, _ = speech_24k
    sr = 24_000
    for name in ("voice.wav", "clip.wav", "speech.wav", "sample.wav"):
        sf.write(tmp_path / name, wav[: 3 * sr], sr)
    (tmp_path / "plugins").symlink_to(ROOT / "plugins")  # the main job's --ref is a path inside the clone
    return tmp_path


def test_the_cheap_readme_commands_run(readme_folder):
    env = {**os.environ, "COLUMNS": "120", "HF_HUB_OFFLINE": "1"}
    ran = []
    for words in readme_commands():
        if words[0] in LONG:
            continue
        proc = subprocess.run([sys.executable, "-m", "valle_cli", *words], cwd=readme_folder, env=env,
                              capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)  # fmt: skip
        assert proc.returncode == 0, (shlex.join(words), proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr
        ran.append(words[0])
    assert {"synth", "prepare", "dataset", "config", "plugins", "export", "stt", "plot"} <= set(ran), ran
    assert (readme_folder / "hello.wav").stat().st_size > 1000 and (readme_folder / "out.wav").is_file()
    assert (readme_folder / "dataset" / "dataset.json").is_file()
    assert (readme_folder / "hub" / "valle-mine" / "model.safetensors").is_file()
    assert (readme_folder / "my-config.yaml").is_file() and (readme_folder / "alignment.png").is_file()
