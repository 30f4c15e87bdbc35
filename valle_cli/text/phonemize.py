"""Text -> IPA phonemes with espeak-ng, through phonemizer's espeak backend.

Choices: stress marks are kept (they carry prosody the model can use), punctuation is kept (pauses and
intonation), words are separated by a space and phones are not separated (the tokenizer splits the IPA string
into symbols). Language short codes (en, de, fr, ja, ...) map to espeak-ng voices; full espeak codes (en-gb,
fr-be) are accepted as they are. espeak-ng switching language mid-sentence inserts "(en)" flags, which are
removed. `PHONEMIZER_ESPEAK_LIBRARY` is honoured (phonemizer reads it) and checked here so that a wrong path
gets a clear message.

Backends are cached per language: creating one starts espeak-ng, which costs ~50 ms.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import sys

from valle_cli.errors import TextError

# Short code -> espeak-ng voice. The short code is what configs, metadata and the model's language tokens use.
LANGUAGES: dict[str, str] = {
    "en": "en-us",
    "de": "de",
    "fr": "fr-fr",
    "ja": "ja",
    "es": "es",
    "it": "it",
    "pt": "pt",
    "nl": "nl",
    "pl": "pl",
    "ru": "ru",
    "ko": "ko",
}

_CJK_IDEOGRAPH = re.compile(r"[\u4e00-\u9fff\u3400-\u4dbf]")


def _install_hint() -> str:
    if sys.platform == "darwin":
        return "install it with `brew install espeak-ng`"
    if sys.platform.startswith("win"):
        return (
            "install espeak-ng from its releases page and set PHONEMIZER_ESPEAK_LIBRARY to the path of "
            "libespeak-ng.dll"
        )
    return "install it with `sudo apt-get install espeak-ng` (or your distribution's espeak-ng package)"


def espeak_voice(language: str) -> str:
    """Map a short language code (or an espeak-ng voice name) to the espeak-ng voice to use."""
    lang = language.strip().lower().replace("_", "-")
    if lang in LANGUAGES:
        return LANGUAGES[lang]
    if lang in LANGUAGES.values() or lang in _espeak_voices():
        return lang
    known = ", ".join(sorted(LANGUAGES))
    raise TextError(
        f"unknown language {language!r}",
        f"use a short code ({known}) or an espeak-ng voice listed by `espeak-ng --voices`",
    )


def language_code(language: str) -> str:
    """The short code stored in metadata for a language or espeak voice (en-us -> en)."""
    lang = language.strip().lower().replace("_", "-")
    if lang in LANGUAGES:
        return lang
    for short, voice in LANGUAGES.items():
        if voice == lang:
            return short
    return lang


def check_espeak() -> None:
    """Raise a TextError naming the remedy if espeak-ng cannot be used."""
    lib = os.environ.get("PHONEMIZER_ESPEAK_LIBRARY")
    if lib and not os.path.isfile(lib):
        raise TextError(
            f"PHONEMIZER_ESPEAK_LIBRARY points to {lib}, which does not exist",
            "set it to the full path of libespeak-ng (e.g. /usr/lib/x86_64-linux-gnu/libespeak-ng.so.1) or unset it",
        )
    from phonemizer.backend import EspeakBackend

    if not EspeakBackend.is_available():
        if lib:
            raise TextError(
                f"PHONEMIZER_ESPEAK_LIBRARY points to {lib}, which is not a working libespeak-ng",
                "set it to the full path of libespeak-ng, or unset it to use the installed one",
            )
        raise TextError("espeak-ng is not installed (phonemizer cannot find libespeak-ng)", _install_hint())


@functools.lru_cache(maxsize=1)
def _espeak_voices() -> frozenset[str]:
    try:
        from phonemizer.backend import EspeakBackend

        return frozenset(EspeakBackend.supported_languages())
    except Exception:  # espeak missing: reported by check_espeak when phonemizing
        return frozenset()


@functools.lru_cache(maxsize=16)
def _backend(voice: str):
    check_espeak()
    from phonemizer.backend import EspeakBackend

    return EspeakBackend(
        voice,
        preserve_punctuation=True,
        with_stress=True,
        language_switch="remove-flags",
        logger=_quiet_logger(),
    )


def _quiet_logger():
    import logging

    logger = logging.getLogger("valle.phonemizer")
    logger.setLevel(logging.ERROR)
    return logger


def phonemize(text: str | list[str], language: str = "en") -> str | list[str]:
    """IPA for one text or a list of texts (a list is phonemized in one call, which is much faster).

    Raises TextError for empty text, text without pronounceable symbols, an unknown language, or missing
    espeak-ng.
    """
    single = isinstance(text, str)
    texts = [text] if single else list(text)
    voice = espeak_voice(language)
    for t in texts:
        if not t or not t.strip():
            raise TextError("the text is empty", "give at least one word to speak")
        if voice == "ja" and _CJK_IDEOGRAPH.search(t):
            raise TextError(
                "espeak-ng cannot read kanji (it spells them as 'Chinese letter')",
                "write Japanese text in kana (hiragana/katakana)",
            )
    from phonemizer.separator import Separator

    out = _backend(voice).phonemize(
        [" ".join(t.split()) for t in texts], separator=Separator(phone=None, word=" "), strip=True, njobs=1
    )
    for t, p in zip(texts, out, strict=True):
        if not any(ch.isalpha() for ch in p):
            raise TextError(
                f"the text {t[:60]!r} has no pronounceable words in language {language!r}",
                "check the text and the language",
            )
    return out[0] if single else out


def espeak_binary() -> str | None:
    return shutil.which("espeak-ng")
