"""Input discovery: voices/{group}/{speaker}/... audio files and where each one's transcript comes from.

Audio may sit anywhere below a speaker folder (LibriTTS nests chapters, LJSpeech has wavs/). For each file the
transcript is looked up in this order:

1. a sidecar beside the audio: `{stem}.txt`, then `{stem}.lab`;
2. corpus layouts: LibriTTS' `{stem}.normalized.txt`; an LJSpeech-style `metadata.csv` (`id|text` or
   `id|text|normalized text`, the normalized column preferred) or a `transcripts.tsv` (`file<TAB>text`) in the
   audio's folder or any folder above it up to the speaker folder;
3. otherwise none: the transcriber plugin fills it in later (and may cut long recordings into utterances).

The language of a file is the first of: a `--language GROUP[/SPEAKER]=LANG` mapping, a `language.txt` in the
speaker or group folder, the default language.

Transcripts must be UTF-8: a file that is not is skipped with the reason (its text would otherwise be decoded
into wrong phonemes), and so are entries with an audio extension that are no audio file (a broken symbolic
link, a FIFO, a folder named `x.wav`).

Utterance ids are `group/speaker/relative-path-without-extension` (slashes inside the speaker folder become
`__`), stable across runs, so a rerun can recognize finished work.
"""

from __future__ import annotations

import csv
import functools
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from valle_cli.audio.io import supported_extensions
from valle_cli.errors import DatasetError


@dataclass(frozen=True)
class Source:
    """One input audio file and what is known about it before processing."""

    path: Path
    group: str
    speaker: str
    uid: str  # group/speaker/name
    text: str | None  # None: needs the transcriber
    text_from: str  # "sidecar", "lab", "normalized.txt", "metadata.csv", "transcripts.tsv" or "transcriber"
    language: str


class BadTranscript(Exception):
    """A transcript file that cannot be read as text; the message says which and how to fix it."""


def _not_utf8(path: Path, exc: UnicodeDecodeError) -> BadTranscript:
    return BadTranscript(
        f"its transcript {path.name} is not UTF-8 (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}); "
        "convert it to UTF-8 from its encoding, e.g. `iconv -f cp1252 -t utf-8` for a Windows file"
    )


def _decode(path: Path, data: bytes) -> str:
    """UTF-8 (a BOM is dropped), or UTF-16 when a BOM says so (Windows' "Unicode"); anything else raises."""
    try:
        if data.startswith((b"\xff\xfe", b"\xfe\xff")):
            return data.decode("utf-16")
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise _not_utf8(path, exc) from None


_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1f\x7f]")  # C0 controls other than whitespace, and DEL


def _clean(path: Path, text: str) -> str:
    """Whitespace runs made one space; a control character (a NUL: binary data, not a transcript) refuses
    the file."""
    bad = _CONTROL.search(text)
    if bad is not None:
        raise BadTranscript(
            f"its transcript {path.name} holds a control character (0x{ord(bad.group()):02x} at character "
            f"{bad.start()}): not plain text; fix or remove it"
        )
    return " ".join(text.split())


def _read_text(path: Path) -> str:
    return _clean(path, _decode(path, path.read_bytes()))


@functools.lru_cache(maxsize=4096)
def _table(path: Path) -> dict[str, str | BadTranscript] | BadTranscript:
    """Transcripts from metadata.csv (LJSpeech) or transcripts.tsv, keyed by file stem (or why it is unreadable,
    cached like the table)."""
    try:
        return _read_table(path)
    except BadTranscript as exc:
        return exc


def _read_table(path: Path) -> dict[str, str | BadTranscript]:
    """Rows by file stem; a row whose text is not plain text holds the reason instead."""
    import io

    out: dict[str, str | BadTranscript] = {}

    def clean(text: str) -> str | BadTranscript:
        try:
            return _clean(path, text)
        except BadTranscript as exc:
            return exc

    with io.StringIO(_decode(path, path.read_bytes()), newline="") as f:
        if path.name == "metadata.csv":
            for row in csv.reader(f, delimiter="|", quoting=csv.QUOTE_NONE):
                if len(row) >= 2 and row[0].strip():
                    text = row[2] if len(row) >= 3 and row[2].strip() else row[1]
                    out[Path(row[0].strip()).stem] = clean(text)
        else:
            for line in f:
                name, sep, text = line.rstrip("\n").partition("\t")
                if sep and name.strip():
                    out[Path(name.strip()).stem] = clean(text)
    return out


def find_transcript(audio: Path, speaker_dir: Path) -> tuple[str | None, str]:
    """(text, where it came from); raises BadTranscript for a transcript file that is not UTF-8 when no other
    transcript of the file is readable (a bad sidecar gives way to a good metadata.csv row)."""
    bad: BadTranscript | None = None
    for suffix, label in ((".txt", "sidecar"), (".lab", "lab"), (".normalized.txt", "normalized.txt")):
        side = audio.with_name(audio.stem + suffix)
        if side.is_file():
            try:
                return _read_text(side), label
            except BadTranscript as exc:
                bad = bad or exc
        elif os.path.lexists(side):  # a broken link, a FIFO, a folder: not silently passed over
            what = "a broken link" if side.is_symlink() and not side.exists() else "not a regular file"
            bad = bad or BadTranscript(f"its transcript {side.name} is {what}; fix or remove it")
    folder = audio.parent
    while True:
        for name in ("metadata.csv", "transcripts.tsv"):
            table = folder / name
            if not table.is_file() and os.path.lexists(table):  # a broken link, a FIFO, a folder
                what = "a broken link" if table.is_symlink() and not table.exists() else "not a regular file"
                bad = bad or BadTranscript(f"its transcript table {table} is {what}; fix or remove it")
                continue
            if table.is_file():
                rows = _table(table)
                if isinstance(rows, BadTranscript):  # another table (or an outer one) may still have it
                    bad = bad or rows
                    continue
                text = rows.get(audio.stem)
                if isinstance(text, BadTranscript):
                    bad = bad or text
                elif text is not None:
                    return text, name
        if folder == speaker_dir or speaker_dir not in folder.parents:
            break
        folder = folder.parent
    if bad is not None:
        raise bad
    return None, "transcriber"


def parse_language_map(items: list[str], default: str) -> tuple[str, dict[str, str]]:
    """`["de", "news=en", "news/anna=fr"]` -> ("de", {"news": "en", "news/anna": "fr"})."""
    mapping: dict[str, str] = {}
    for item in items:
        key, sep, lang = item.partition("=")
        if sep:
            if not key.strip() or not lang.strip():
                raise DatasetError(f"bad --language {item!r}", "use LANG, GROUP=LANG or GROUP/SPEAKER=LANG")
            mapping[key.strip().strip("/")] = lang.strip()
        else:
            default = item.strip()
    return default, mapping


def _language(group_dir: Path, speaker_dir: Path, mapping: dict[str, str], default: str) -> str:
    key = f"{group_dir.name}/{speaker_dir.name}"
    if key in mapping:
        return mapping[key]
    for folder in (speaker_dir, group_dir):
        f = folder / "language.txt"
        if f.is_file():
            try:
                lang = f.read_text(encoding="utf-8").strip()
            except UnicodeDecodeError:
                raise DatasetError(
                    f"{f} is not UTF-8 text", "write a language code such as en or de in it"
                ) from None
            if lang:
                return lang
    return mapping.get(group_dir.name, default)


def _not_audio_file(path: Path) -> str | None:
    """Why an entry with an audio extension is no audio file to read (None: it is a regular file)."""
    if path.is_symlink() and not path.exists():
        return f"a broken symbolic link (to {os.readlink(path)})"
    if path.is_dir():
        return "a folder named like an audio file (audio files inside it are read as usual)"
    if not path.is_file():
        return "not a regular file (a FIFO, socket or device)"
    return None


def check_voices_folder(root: Path) -> list[Path]:
    """The group folders of a voices folder; a missing folder (a typo) or one without groups is named."""
    root = Path(root)
    if not root.is_dir():
        what = "does not exist" if not root.exists() else "is not a folder"
        raise DatasetError(f"{root} {what}", "point valle prepare at voices/ laid out as {group}/{speaker}/")
    groups = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not groups:
        raise DatasetError(
            f"{root} has no group folders",
            "lay audio out as voices/{group}/{speaker}/*.wav (group can be 'default')",
        )
    return groups


def discover(
    root: Path,
    default_language: str = "en",
    languages: dict[str, str] | None = None,
    skipped: list[tuple[str, str]] | None = None,
) -> Iterator[Source]:
    """Every audio file under root/{group}/{speaker}/, sorted, with its transcript (if any) and language.
    Entries that look like audio but cannot be used are appended to `skipped` as (path, reason)."""
    skipped = skipped if skipped is not None else []
    root = Path(root)
    exts = set(supported_extensions())
    for group_dir in check_voices_folder(root):
        for speaker_dir in sorted(
            p for p in group_dir.iterdir() if p.is_dir() and not p.name.startswith(".")
        ):
            lang = _language(group_dir, speaker_dir, languages or {}, default_language)
            for path in sorted(speaker_dir.rglob("*")):
                if path.suffix.lower() not in exts or path.name.startswith("."):
                    continue
                why = _not_audio_file(path)
                if why is not None:
                    skipped.append((str(path), why))
                    continue
                rel = path.relative_to(speaker_dir).with_suffix("")
                name = "__".join(rel.parts)
                try:
                    text, source = find_transcript(path, speaker_dir)
                except BadTranscript as exc:
                    skipped.append((str(path), str(exc)))
                    continue
                yield Source(
                    path=path,
                    group=group_dir.name,
                    speaker=speaker_dir.name,
                    uid=f"{group_dir.name}/{speaker_dir.name}/{name}",
                    text=text,
                    text_from=source,
                    language=lang,
                )
