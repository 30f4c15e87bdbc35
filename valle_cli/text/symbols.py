"""The symbol map: IPA symbols <-> token ids, versioned and stable across runs.

A symbol is one Unicode code point of espeak-ng's IPA output (combining diacritics and stress marks are
symbols of their own), so the inventory is fixed and small (623 in version 1): the IPA block, spacing
modifier letters, combining diacritics, the phonetic extensions (espeak-ng writes ᵻ for English -ed/-es),
a-z, digits and punctuation, plus <pad>=0, <bos>=1, <eos>=2, <unk>=3.
The list lives in `symbols_v1.json`; a new symbol means a new version file, never a reshuffle, so models
trained with version 1 keep working. Every checkpoint carries its symbol map, and loading one compares it.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import resources

from valle_cli.errors import TextError

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
LATEST_VERSION = 1


@dataclass(frozen=True)
class SymbolMap:
    version: int
    symbols: tuple[str, ...]
    _index: dict[str, int] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if len(set(self.symbols)) != len(self.symbols):
            raise TextError(f"symbol map version {self.version} has duplicate symbols")
        if self.symbols[:4] != (PAD, BOS, EOS, UNK):
            raise TextError(f"symbol map version {self.version} must start with {PAD} {BOS} {EOS} {UNK}")
        self._index.update({s: i for i, s in enumerate(self.symbols)})

    @property
    def pad_id(self) -> int:
        return 0

    @property
    def bos_id(self) -> int:
        return 1

    @property
    def eos_id(self) -> int:
        return 2

    @property
    def unk_id(self) -> int:
        return 3

    def __len__(self) -> int:
        return len(self.symbols)

    def encode(self, ipa: str, add_bos_eos: bool = True) -> list[int]:
        """IPA string -> ids, one per code point; unknown symbols map to <unk>."""
        ids = [self._index.get(ch, self.unk_id) for ch in ipa]
        return [self.bos_id, *ids, self.eos_id] if add_bos_eos else ids

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> IPA string; specials are dropped."""
        return "".join(self.symbols[i] for i in ids if 3 < i < len(self.symbols))

    def unknown(self, ipa: str) -> list[str]:
        """Symbols of `ipa` that this map does not know (for warnings and dataset stats)."""
        return sorted({ch for ch in ipa if ch not in self._index})

    def to_dict(self) -> dict:
        return {"version": self.version, "symbols": list(self.symbols)}

    @classmethod
    def from_dict(cls, data: dict) -> SymbolMap:
        try:
            return cls(int(data["version"]), tuple(data["symbols"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise TextError(
                f"malformed symbol map ({exc})", "the checkpoint or dataset may be corrupt"
            ) from None

    def check_compatible(self, other: SymbolMap, what: str = "model") -> None:
        """Raise if `other` (e.g. a checkpoint's map) assigns different ids than this one."""
        if self.symbols[: len(other.symbols)] != other.symbols[: len(self.symbols)]:
            raise TextError(
                f"the {what}'s symbol map (version {other.version}) does not match this one (version "
                f"{self.version})",
                "use the symbol map stored with the model, or re-prepare the data with this valle",
            )


@functools.lru_cache(maxsize=4)
def default_symbol_map(version: int = LATEST_VERSION) -> SymbolMap:
    """The shipped symbol map of a version (the latest by default)."""
    try:
        text = resources.files("valle_cli.text").joinpath(f"symbols_v{version}.json").read_text("utf-8")
    except FileNotFoundError:
        raise TextError(
            f"symbol map version {version} is not known to this valle", "upgrade valle to read newer models"
        ) from None
    return SymbolMap.from_dict(json.loads(text))
