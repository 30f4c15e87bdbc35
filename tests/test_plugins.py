"""The plugin registry: built-ins through entry points, unknown names, broken plugins, overrides."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from valle_cli import plugins
from valle_cli.errors import PluginError


def test_builtin_codecs_are_registered_through_entry_points():
    found = plugins.discover("codec")
    for name in ("encodec", "vocos", "mel"):
        assert name in found
        info = found[name][0]
        assert info.distribution == "valle"
        assert info.target.startswith("valle_cli.codecs.")


def test_listing_names_imports_nothing_heavy():
    code = (
        "import sys\nfrom valle_cli import plugins\n"
        "assert 'mel' in plugins.names('codec')\n"
        "assert 'torch' not in sys.modules\nprint('ok')"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_load_returns_the_class():
    from valle_cli.codecs.mel_codec import MelCodec

    assert plugins.load("codec", "mel") is MelCodec


def test_unknown_name_lists_available_and_suggests():
    with pytest.raises(PluginError) as info:
        plugins.load("codec", "encodek")
    assert "no codec plugin named 'encodek'" in info.value.message
    assert "did you mean 'encodec'" in info.value.remedy
    for name in ("encodec", "mel", "vocos"):
        assert name in info.value.remedy


def test_unknown_kind():
    with pytest.raises(PluginError, match="unknown plugin kind"):
        plugins.names("vocoder")


def fake_plugin(folder, dist: str, version: str, module: str, source: str, entry: str) -> None:
    """A real installed distribution: a module plus a dist-info declaring one valle.codecs entry point."""
    (folder / f"{module}.py").write_text(source)
    info = folder / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[valle.codecs]\n{entry} = {module}:C\n")


def run_plugins_command(site) -> subprocess.CompletedProcess:
    code = f"import sys; sys.path.insert(0, {str(site)!r})\nfrom valle_cli.cli.app import main\nmain(['plugins'])"
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "250"},
    )


@pytest.fixture
def broken_plugin(tmp_path, monkeypatch):
    """A real installed distribution (a dist-info on sys.path) whose codec module fails to import."""
    fake_plugin(
        tmp_path,
        "valle-broken",
        "1.2.3",
        "broken_codec",
        "raise ImportError('needs libfoo, which is missing')\n",
        "broken",
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_broken_plugin_is_reported_not_fatal(broken_plugin):
    rows = {(s.info.kind, s.info.name): s for s in plugins.status()}
    assert rows[("codec", "mel")].loads
    broken = rows[("codec", "broken")]
    assert not broken.loads
    assert "needs libfoo" in broken.error
    assert broken.info.distribution == "valle-broken" and broken.info.version == "1.2.3"
    with pytest.raises(PluginError, match="failed to load.*needs libfoo"):
        plugins.load("codec", "broken")


def test_valle_plugins_command_shows_broken_plugin(broken_plugin):
    proc = run_plugins_command(broken_plugin)
    assert proc.returncode == 0, proc.stderr
    lines = {ln.split("│")[1].strip(): ln for ln in proc.stdout.splitlines() if ln.count("│") > 3}
    assert "yes" in lines["mel"]
    assert "no" in lines["broken"] and "needs libfoo" in lines["broken"]
    assert "valle-broken" in lines["broken"]
    rows = [ln for ln in proc.stdout.splitlines() if ln.count("│") > 3]
    assert all(ln.split("│")[1].strip() for ln in rows)  # one line a plugin: no cell wrapped mid-word
    assert "entry-point groups" in proc.stdout and "backbone: valle.backbones" in proc.stdout


def test_overridden_adds_and_hides():
    sentinel = object()
    with plugins.overridden("codec", add={"fake": sentinel}, hide=["vocos"]):
        assert plugins.load("codec", "fake") is sentinel
        assert "vocos" not in plugins.names("codec")
    assert "vocos" in plugins.names("codec")
    assert "fake" not in plugins.names("codec")


def test_markup_in_a_plugin_error_is_shown_verbatim(tmp_path):
    fake_plugin(
        tmp_path,
        "valle-markup",
        "0.1",
        "markup_codec",
        "raise ImportError('pip install badplug[gpu] [/]')\n",
        "markup",
    )
    proc = run_plugins_command(tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "pip install badplug[gpu] [/]" in proc.stdout
