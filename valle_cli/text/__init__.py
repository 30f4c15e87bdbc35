"""Text front end: phonemize text with espeak-ng and map IPA symbols to token ids."""

from valle_cli.text.phonemize import LANGUAGES, check_espeak, espeak_voice, language_code, phonemize
from valle_cli.text.symbols import SymbolMap, default_symbol_map

__all__ = [
    "LANGUAGES",
    "SymbolMap",
    "check_espeak",
    "default_symbol_map",
    "espeak_voice",
    "language_code",
    "phonemize",
]
