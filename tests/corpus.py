"""Builds small multi-speaker voices/ folders for the prepare tests, with offline voices only."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import soundfile as sf

from valle_cli.audio.speech import mbrola_voices, say

SENTENCES = [
    "The birds sang in the trees at the break of dawn.",
    "She wrote her name at the top of the page.",
    "The city lights were bright against the dark sky.",
    "They played football in the park after school.",
    "A loud bell rang at the end of the long day.",
]


def _write(path: Path, text: str, voice: str, speed: int = 160) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    wav, sr = say(text, voice, speed=speed)
    sf.write(path, wav, sr)


def build_corpus(root: Path) -> dict:
    """voices/ with sidecar .txt and .lab files, LJSpeech and LibriTTS layouts, a transcripts.tsv, a German
    speaker, mbrola speakers where installed, and a corrupt, an empty and a too-short file."""
    expected: dict[str, str] = {}
    # espeak-ng voices and variants, sidecar transcripts (.txt for one speaker, .lab for the other)
    for speaker, voice, ext in (("anna", "espeak:en-us+f3", ".txt"), ("bob", "espeak:en-gb+m3", ".lab")):
        for i, text in enumerate(SENTENCES[:4]):
            _write(root / "espeak" / speaker / f"{speaker}{i}.wav", text, voice, 150 + 10 * i)
            (root / "espeak" / speaker / f"{speaker}{i}{ext}").write_text(text + "\n")
            expected[f"espeak/{speaker}/{speaker}{i}"] = text
    # LJSpeech layout: metadata.csv (id|text|normalized) + wavs/
    lj = root / "ljspeech" / "lj"
    rows = []
    for i, text in enumerate(SENTENCES[1:4]):
        _write(lj / "wavs" / f"LJ001-000{i}.wav", text, "espeak:en-us+m1")
        rows.append([f"LJ001-000{i}", text.upper(), text])
        expected[f"ljspeech/lj/wavs__LJ001-000{i}"] = text
    with open(lj / "metadata.csv", "w", newline="") as f:
        csv.writer(f, delimiter="|").writerows(rows)
    # LibriTTS layout: {speaker}/{chapter}/{utt}.wav + .normalized.txt (+ .original.txt, ignored)
    for i, text in enumerate(SENTENCES[2:5]):
        stem = f"1034_121119_00000{i}_000000"
        _write(root / "libritts" / "1034" / "121119" / f"{stem}.wav", text, "espeak:en-us+f2")
        (root / "libritts" / "1034" / "121119" / f"{stem}.normalized.txt").write_text(text)
        (root / "libritts" / "1034" / "121119" / f"{stem}.original.txt").write_text(text.upper())
        expected[f"libritts/1034/121119__{stem}"] = text
    # transcripts.tsv, and a German speaker whose language comes from language.txt
    de = root / "misc" / "klaus"
    de_texts = ["Der alte Bäcker öffnet seinen Laden.", "Die Katze schläft auf dem Sofa."]
    for i, text in enumerate(de_texts):
        _write(de / f"k{i}.flac", text, "espeak:de")
        expected[f"misc/klaus/k{i}"] = text
    (de / "transcripts.tsv").write_text("".join(f"k{i}.flac\t{t}\n" for i, t in enumerate(de_texts)))
    (de / "language.txt").write_text("de\n")
    # mbrola voices where installed
    for v in [v for v in ("us1", "us2", "en1") if v in mbrola_voices()]:
        for i, text in enumerate(SENTENCES[:3]):
            _write(root / "mbrola" / v / f"{v}_{i}.wav", text, f"mbrola:{v}")
            (root / "mbrola" / v / f"{v}_{i}.txt").write_text(text)
            expected[f"mbrola/{v}/{v}_{i}"] = text
    # bad files: corrupt, empty, too short
    bad = root / "espeak" / "bob"
    (bad / "corrupt.wav").write_bytes(b"RIFF\x10\x00\x00\x00WAVEjunkjunkjunk" * 4)
    (bad / "corrupt.txt").write_text("never read")
    (bad / "empty.wav").write_bytes(b"")
    (bad / "empty.txt").write_text("never read")
    sf.write(bad / "short.wav", np.zeros(2400, np.float32) + 0.1, 24_000)
    (bad / "short.txt").write_text("too short")
    return expected


def long_recording(path: Path, voice: str) -> list[str]:
    """One file holding three sentences separated by a second of silence, with no transcript."""
    parts, sr = [], None
    texts = SENTENCES[:3]
    for text in texts:
        wav, sr = say(text, voice)
        parts += [wav, np.zeros(sr, np.float32)]
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, np.concatenate(parts[:-1]), sr)
    return texts
