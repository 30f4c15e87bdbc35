"""Text front end: espeak-ng phonemization and the versioned symbol map."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from importlib import resources

import pytest

from valle_cli.errors import TextError
from valle_cli.text import default_symbol_map, espeak_voice, language_code, phonemize
from valle_cli.text.symbols import SymbolMap

from .conftest import needs_espeak


@needs_espeak
def test_english_keeps_stress_and_punctuation():
    ipa = phonemize("Hello, world! How are you?", "en")
    assert "ˈ" in ipa  # primary stress
    assert ipa.count(",") == 1 and "!" in ipa and ipa.endswith("?")
    assert ipa.split()[0].startswith("h")


@needs_espeak
@pytest.mark.parametrize(
    "lang, text, expect",
    [
        ("de", "Schön guten Tag.", "ʃ"),
        ("fr", "Bonjour, ça va?", "ʒ"),
        ("ja", "こんにちは。", "k"),
        ("en", "church", "tʃ"),
    ],
)
def test_languages(lang, text, expect):
    ipa = phonemize(text, lang)
    assert expect in ipa


@needs_espeak
def test_batch_matches_single():
    texts = ["The cat sat.", "A dog ran!", "Birds sing at dawn."]
    assert phonemize(texts, "en") == [phonemize(t, "en") for t in texts]


def test_language_codes():
    assert espeak_voice("en") == "en-us"
    assert espeak_voice("FR") == "fr-fr"
    assert espeak_voice("de") == "de"
    assert language_code("en-us") == "en"
    with pytest.raises(TextError, match="unknown language 'klingon'"):
        espeak_voice("klingon")


@needs_espeak
@pytest.mark.parametrize("text", ["", "   ", "\n"])
def test_empty_text(text):
    with pytest.raises(TextError, match="empty"):
        phonemize(text, "en")


@needs_espeak
def test_nothing_pronounceable():
    with pytest.raises(TextError, match="no pronounceable"):
        phonemize("... !!! ???", "en")


@needs_espeak
def test_kanji_gets_a_clear_error():
    with pytest.raises(TextError, match="kanji"):
        phonemize("日本語", "ja")


def test_espeak_library_env_var_pointing_nowhere():
    code = (
        "from valle_cli.text import phonemize\nfrom valle_cli.errors import TextError\n"
        "try:\n    phonemize('hello', 'en')\nexcept TextError as e:\n    print(e.message); print(e.remedy)\n"
    )
    env = {**os.environ, "PHONEMIZER_ESPEAK_LIBRARY": "/nonexistent/libespeak-ng.so"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert "PHONEMIZER_ESPEAK_LIBRARY points to /nonexistent/libespeak-ng.so" in proc.stdout
    assert "set it to the full path" in proc.stdout


def test_espeak_library_env_var_pointing_at_something_else(tmp_path):
    fake = tmp_path / "libespeak-ng.so.1"
    fake.write_bytes(b"")
    code = (
        "from valle_cli.text import phonemize\nfrom valle_cli.errors import TextError\n"
        "try:\n    phonemize('hello', 'en')\nexcept TextError as e:\n    print(e.message); print(e.remedy)\n"
    )
    env = {**os.environ, "PHONEMIZER_ESPEAK_LIBRARY": str(fake)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert "which is not a working libespeak-ng" in proc.stdout, proc.stdout + proc.stderr


def test_missing_espeak_names_the_install_command(monkeypatch):
    """espeak-ng cannot be uninstalled for a test; phonemizer's own availability probe is made to say no."""
    from phonemizer.backend import EspeakBackend

    from valle_cli.text.phonemize import check_espeak

    monkeypatch.delenv("PHONEMIZER_ESPEAK_LIBRARY", raising=False)
    monkeypatch.setattr(EspeakBackend, "is_available", classmethod(lambda cls: False))
    with pytest.raises(TextError) as info:
        check_espeak()
    assert "espeak-ng is not installed" in info.value.message
    assert "apt-get install espeak-ng" in info.value.remedy


def test_symbol_map_is_frozen():
    """Ids must never change for version 1: models trained with it depend on them."""
    data = resources.files("valle_cli.text").joinpath("symbols_v1.json").read_bytes()
    assert hashlib.sha256(data).hexdigest()[:16] == SYMBOLS_V1_SHA
    sm = default_symbol_map()
    assert sm.version == 1 and len(sm) == 623
    assert (sm.pad_id, sm.bos_id, sm.eos_id, sm.unk_id) == (0, 1, 2, 3)
    assert sm.encode("a", add_bos_eos=False) == [sm.symbols.index("a")]


SYMBOLS_V1_SHA = "dc79ee3b0f82c555"  # sha256 of symbols_v1.json; never update it, add symbols_v2.json


@needs_espeak
def test_symbol_map_covers_espeak_output_for_supported_languages():
    sm = default_symbol_map()
    samples = {
        "en": "She sells sea shells; pleasure, judge, thing, this!",
        "de": "Zwölf Boxkämpfer jagen Viktor quer über den Deich.",
        "fr": "Portez ce vieux whisky au juge blond qui fume, l'œuf.",
        "ja": "きょうはいいてんきですね。しゃしん、ちょっと。",
    }
    for lang, text in samples.items():
        ipa = phonemize(text, lang)
        assert sm.unknown(ipa) == [], (lang, sm.unknown(ipa))


@needs_espeak
def test_encode_decode_round_trip():
    sm = default_symbol_map()
    ipa = phonemize("The quick brown fox jumps over the lazy dog.", "en")
    ids = sm.encode(ipa)
    assert ids[0] == sm.bos_id and ids[-1] == sm.eos_id
    assert sm.unk_id not in ids
    assert sm.decode(ids) == ipa


def test_unknown_symbols_map_to_unk():
    sm = default_symbol_map()
    assert sm.encode("a☃", add_bos_eos=False)[1] == sm.unk_id
    assert sm.unknown("a☃") == ["☃"]


def test_symbol_map_serialization_and_compatibility():
    sm = default_symbol_map()
    again = SymbolMap.from_dict(sm.to_dict())
    assert again == sm
    sm.check_compatible(again)
    other = SymbolMap(2, (*sm.symbols[:4], *reversed(sm.symbols[4:])))
    with pytest.raises(TextError, match="does not match"):
        sm.check_compatible(other)
    with pytest.raises(TextError, match="malformed"):
        SymbolMap.from_dict({"symbols": []})


@needs_espeak
def test_espeak_library_env_var_is_honoured():
    import ctypes.util
    import glob

    candidates = glob.glob("/usr/lib/*/libespeak-ng.so*") + glob.glob("/usr/lib/libespeak-ng.so*")
    lib = next(iter(sorted(candidates)), None) or ctypes.util.find_library("espeak-ng")
    if not lib or not os.path.isfile(lib):
        pytest.skip("libespeak-ng not found at a known path")
    code = "from valle_cli.text import phonemize\nprint(phonemize('hello', 'en'))"
    env = {**os.environ, "PHONEMIZER_ESPEAK_LIBRARY": lib}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "həlˈoʊ"


@needs_espeak
def test_symbol_map_covers_the_shipped_sentence_lists():
    """Every sentence valle ships for corpora (English -ed/-es words included) phonemizes without <unk>."""
    from valle_cli.assets import sentences

    sm = default_symbol_map()
    for lang, split in (("en", "train"), ("en", "held-out"), ("de", "train"), ("fr", "train")):
        for ipa in phonemize(sentences(split, lang), lang):
            assert sm.unknown(ipa) == [], (lang, ipa)
    assert sm.unknown(phonemize("He wanted the boxes and watches.", "en")) == []
