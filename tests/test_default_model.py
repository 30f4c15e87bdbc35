"""The model used when none is named ($VALLE_DEFAULT_MODEL, else the shipped model plugin), model
plugins, and the shipped model itself (plugins/valle-default-model): it loads offline and speaks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from valle_cli import plugins
from valle_cli.infer.load import (
    SHIPPED_MODEL,
    ModelLoadError,
    default_model,
    export_model,
    load_model,
    resolve_source,
)

SHIPPED = (
    Path(__file__).resolve().parents[1] / "plugins" / "valle-default-model" / "src" / "valle_default_model"
)


@pytest.fixture
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("VALLE_DEFAULT_MODEL", raising=False)


@pytest.fixture(scope="module")
def exported(tiny_model, tmp_path_factory):
    return export_model(tiny_model, tmp_path_factory.mktemp("export") / "m.safetensors")


def test_without_a_named_model_the_shipped_plugin_is_used(offline, exported):
    with plugins.overridden("model", add={SHIPPED_MODEL: lambda: exported}):
        source, why = default_model()
        loaded = load_model(source)
    assert source == str(exported)  # the file itself: a local "valle-default" cannot stand in for it
    assert why.startswith(f"no --model given: using the shipped model {SHIPPED_MODEL}")
    assert loaded.meta["format"] == "valle-model"


def test_no_hub_repository_is_asked_for_by_default(exported, monkeypatch, tmp_path):
    """Online, the default used to be a hub repository nobody publishes (valle-tts/valle-small): every
    `valle synth` without --model asked the hub for it first."""
    from valle_cli import hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("VALLE_DEFAULT_MODEL", raising=False)
    asked = []
    monkeypatch.setattr(hub, "online", lambda *a, **k: asked.append("online") or True)
    monkeypatch.setattr(hub, "cached_snapshot", lambda *a, **k: asked.append("cache"))
    with plugins.overridden("model", add={SHIPPED_MODEL: lambda: exported}):
        source, _ = default_model()
    assert source == str(exported) and asked == []


def test_online_follows_huggingface_hubs_settings(monkeypatch):
    import socket

    from valle_cli import hub

    looked_up = []
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, port: looked_up.append(host) or [])
    for value in ("1", "ON", "yes", "True"):
        monkeypatch.setenv("HF_HUB_OFFLINE", value)
        assert not hub.online()
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", "https://hf-mirror.example.org/")
    assert hub.online() and looked_up == ["hf-mirror.example.org"]


def test_a_shipped_model_without_its_file_is_reported_not_chosen(offline, tmp_path):
    missing = tmp_path / "valle-default.safetensors"
    with plugins.overridden("model", add={SHIPPED_MODEL: lambda: missing}):
        with pytest.raises(ModelLoadError) as err:
            default_model()
        status = {s.info.name: s for s in plugins.status(["model"])}[SHIPPED_MODEL]
    assert "the shipped model is unusable" in err.value.message and str(missing) in err.value.message
    assert "reinstall" in err.value.remedy
    assert not status.loads and "does not exist" in status.error


def test_the_environment_variable_wins(offline, exported, monkeypatch):
    monkeypatch.setenv("VALLE_DEFAULT_MODEL", str(exported))
    with plugins.overridden("model", add={SHIPPED_MODEL: lambda: "/nowhere"}):
        source, why = default_model()
    assert source == str(exported) and "$VALLE_DEFAULT_MODEL" in why


def test_no_shipped_model_names_both_remedies(offline):
    with plugins.overridden("model", hide=[SHIPPED_MODEL]), pytest.raises(ModelLoadError) as err:
        default_model()
    assert "not installed" in err.value.message and "$VALLE_DEFAULT_MODEL is not set" in err.value.message
    assert "--model" in err.value.remedy and "plugins/valle-default-model" in err.value.remedy


def test_model_plugins_by_name_and_their_failures(exported, tiny_model, tmp_path, monkeypatch):
    def broken():
        raise RuntimeError("boom")

    add = {"mine": lambda: exported, "gone": lambda: tmp_path / "missing.safetensors", "broken": broken}
    with plugins.overridden("model", add=add):
        assert resolve_source("mine") == (Path(exported), "mine")
        with pytest.raises(ModelLoadError, match="does not exist"):
            resolve_source("gone")
        with pytest.raises(ModelLoadError, match="failed to give its model file: RuntimeError: boom"):
            resolve_source("broken")
    # a run folder's `latest` pointer file means its newest checkpoint
    assert load_model(tiny_model / "latest").meta["stats"] == load_model(tiny_model).meta["stats"]
    # a local path of the same name wins over the plugin
    (tmp_path / "mine").mkdir()
    monkeypatch.chdir(tmp_path)
    with plugins.overridden("model", add={"mine": lambda: exported}):
        assert resolve_source("mine") == (Path("mine"), Path("mine"))


def test_shipped_model_file_is_what_it_says():
    """The committed model: valle's format, the offline codec, a size a repository can carry."""
    loaded = load_model(SHIPPED / "valle-default.safetensors")
    assert loaded.meta["codec"]["name"] == "mel"
    assert (SHIPPED / "valle-default.safetensors").stat().st_size < 40 * 2**20
    assert (SHIPPED / "reference-us2.flac").stat().st_size < 200 * 2**10


def test_synth_with_no_model_offline_speaks_with_the_shipped_model(tmp_path):
    """README's main job, offline: `valle synth TEXT --ref CLIP` with no --model."""
    import soundfile as sf

    if SHIPPED_MODEL not in plugins.names("model"):
        pytest.skip("the valle-default-model package is not installed (scripts/setup.sh installs it)")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"), "COLUMNS": "200"}
    env.pop("VALLE_DEFAULT_MODEL", None)
    out = tmp_path / "hello.wav"
    proc = subprocess.run(
        [sys.executable, "-m", "valle_cli", "synth", "The little boat sailed across the calm water.",
         "--ref", str(SHIPPED / "reference-us2.flac"), "--seed", "0", "-o", str(out)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, stdin=subprocess.DEVNULL, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert f"using the shipped model {SHIPPED_MODEL}" in proc.stderr
    assert "valle-default.safetensors ->" in proc.stderr and "hit --max-ar-steps" not in proc.stderr
    wav, sr = sf.read(out)
    assert 1.0 < wav.size / sr < 8.0  # a sentence of 8 words, not silence and not a runaway


def test_shipped_model_stops_by_itself_when_greedy():
    """Issue 14: the earlier shipped model droned to --max-ar-steps at --ar-temp 0. A model that follows its
    text ends each sentence by itself, with about its length in speech (2-3 words a second)."""
    from valle_cli.infer.engine import SamplingConfig
    from valle_cli.infer.synth import synthesize

    loaded = load_model(SHIPPED / "valle-default.safetensors")
    lines = ["A quiet river runs past the old mill.", "Please bring me two cups of tea and some bread."]
    for text in lines:
        res = synthesize(loaded, text, [SHIPPED / "reference-us2.flac"], sampling=SamplingConfig(ar_temp=0.0))
        words, seconds = len(text.split()), res.audio.size / res.sample_rate
        assert all(res.stopped), f"{text!r}: greedy decoding did not end by itself"
        assert words / 5 < seconds < words, f"{text!r}: {seconds:.1f} s for {words} words"
