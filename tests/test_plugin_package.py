"""The separately installable plugin under plugins/: `pip install ./plugins/valle-pocketsphinx` makes the
`pocketsphinx` transcriber appear in `valle plugins` and usable from a config.

The package is installed for real with pip (no dependencies: pocketsphinx is in the dev extra) into a
temporary folder put on PYTHONPATH, so the test venv itself is not changed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = ROOT / "plugins" / "valle-pocketsphinx"

pocketsphinx = pytest.importorskip("pocketsphinx")


@pytest.fixture(scope="module")
def installed(pocketsphinx_site):
    assert any(p.name.startswith("valle_pocketsphinx-0.1.1.dist-info") for p in pocketsphinx_site.iterdir())
    return pocketsphinx_site


def _python(code: str, site: Path | None) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "250"}
    if site is not None:
        env["PYTHONPATH"] = str(site)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)


def test_installed_plugin_is_listed_and_loads(installed):
    proc = _python(
        "from valle_cli.cli.app import main; main(['plugins', '--kind', 'transcriber'])", installed
    )
    assert proc.returncode == 0, proc.stderr
    row = [ln for ln in proc.stdout.splitlines() if "pocketsphinx" in ln]
    assert row, proc.stdout
    assert "valle-pocketsphinx" in row[0] and "yes" in row[0]
    assert "transcriber: valle.transcribers" in proc.stdout  # its entry-point group, under the table


def test_plugin_comes_from_the_installed_copy(installed):
    code = (
        "from valle_cli import plugins; import valle_pocketsphinx as m; "
        "info = plugins.discover('transcriber')['pocketsphinx']; print(m.__file__); print(info[0].distribution)"
    )
    proc = _python(code, installed)
    assert proc.returncode == 0, proc.stderr
    assert str(installed) in proc.stdout.splitlines()[0] or "plugins/valle-pocketsphinx" in proc.stdout
    assert proc.stdout.splitlines()[1] == "valle-pocketsphinx"


def test_usable_from_a_config(installed, tmp_path, natural_speech):
    """data.transcriber in a config picks the plugin, which transcribes real speech."""
    import numpy as np

    wav, sr, text = natural_speech
    np.save(tmp_path / "wav.npy", wav)
    (tmp_path / "c.yaml").write_text("preset: tiny\ndata:\n  transcriber: pocketsphinx\n")
    code = (
        "import numpy as np\n"
        "from valle_cli.config import load_config\n"
        "from valle_cli.transcribe import build_transcriber\n"
        "from valle_cli.metrics import wer\n"
        f"cfg = load_config({str(tmp_path / 'c.yaml')!r})\n"
        "t = build_transcriber(cfg.data.transcriber)\n"
        f"segs = t.transcribe(np.load({str(tmp_path / 'wav.npy')!r}), {sr}, 'en')\n"
        "hyp = ' '.join(s.text for s in segs)\n"
        f"print(repr(hyp)); print(wer({text!r}, hyp))\n"
        "assert all(0 <= s.start < s.end for s in segs)\n"
    )
    proc = _python(code, installed)
    assert proc.returncode == 0, proc.stderr
    assert float(proc.stdout.splitlines()[-1]) <= 0.5, proc.stdout


def test_plugin_refuses_other_languages(installed):
    proc = _python(
        "import numpy as np\nfrom valle_cli.transcribe import build_transcriber\n"
        "build_transcriber('pocketsphinx').transcribe(np.zeros(16000, 'float32'), 16000, 'de')",
        installed,
    )
    assert proc.returncode != 0 and "English only" in proc.stderr


def test_prepare_transcribes_and_cuts_a_long_recording(installed, tmp_path):
    """A recording without transcript is transcribed by the plugin and cut into one utterance per sentence."""
    from valle_cli.audio.speech import mbrola_voices, piper_available

    from .corpus import long_recording

    voice = "mbrola:us1" if "us1" in mbrola_voices() else ("piper:joe" if piper_available() else None)
    if voice is None:
        pytest.skip("needs an mbrola or piper voice for recognizable speech")
    texts = long_recording(tmp_path / "voices" / "talks" / "ann" / "talk.wav", voice)
    out = tmp_path / "ds"
    code = (
        "from valle_cli.cli.app import main\n"
        f"main(['prepare', {str(tmp_path / 'voices')!r}, '-o', {str(out)!r}, '--codec', 'mel',"
        " '--transcriber', 'pocketsphinx', '--workers', '1'])\n"
    )
    proc = _python(code, installed)
    assert proc.returncode == 0, proc.stderr
    from valle_cli.data.dataset import open_dataset
    from valle_cli.metrics import wer

    ds = open_dataset(out)
    assert ds.uids() == [f"talks/ann/talk__{k:03d}" for k in range(3)]
    metas = [ds.meta(i) for i in range(3)]
    assert wer(texts, [m.text for m in metas]) < 0.5, [m.text for m in metas]
    for m in metas:
        assert m.end is not None and 0 <= m.start < m.end
        assert 1.0 < m.duration < 4.5  # one sentence plus a little padding, not the whole file
    assert metas[0].end <= metas[1].start + 1e-6 and metas[1].end <= metas[2].start + 1e-6
    assert (out / "transcripts" / "talks" / "ann" / "talk.json").is_file()  # cached for a rerun


def test_transcripts_do_not_depend_on_what_was_decoded_before(installed):
    """One transcriber, files in two orders and each file alone: the same words for every file (pocketsphinx
    would otherwise carry its cepstral mean from one file to the next, and `valle eval`'s WER with it)."""
    from valle_cli.audio.speech import mbrola_voices

    voice = "mbrola:us2" if "us2" in mbrola_voices() else "espeak:en-us"
    code = (
        "from valle_cli.audio.speech import say\n"
        "from valle_cli.transcribe import build_transcriber\n"
        "texts = ['This is a chicken leg in her dish.', 'The weather was cold and windy all day long.',\n"
        "         'Please bring me a cup of hot tea with milk.']\n"
        f"wavs = [say(t, {voice!r}) for t in texts]\n"
        "t = build_transcriber('pocketsphinx')\n"
        "forward = [t.transcribe_text(w, sr) for w, sr in wavs]\n"
        "backward = [t.transcribe_text(w, sr) for w, sr in reversed(wavs)][::-1]\n"
        "alone = [build_transcriber('pocketsphinx').transcribe_text(w, sr) for w, sr in wavs]\n"
        "print(forward, backward, alone)\n"
        "assert forward == backward == alone\n"
    )
    proc = _python(code, installed)
    assert proc.returncode == 0, proc.stderr[-2000:] + proc.stdout
