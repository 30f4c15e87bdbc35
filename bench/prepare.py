"""`valle prepare` throughput: utterances per second and hours of audio per hour of wall time.

Generates a multi-speaker corpus offline (espeak-ng variants and mbrola voices, the English train sentences,
sidecar transcripts) in a temporary folder, then runs the real prepare pipeline on it with the offline `mel`
codec and with EnCodec 24 kHz at 6 kbps. EnCodec runs with random weights (the pretrained ones cannot be
downloaded here); its compute cost is the same as the pretrained model's.

Usage:  python bench/prepare.py [--utterances 240] [--workers 2] [--write]
`--write` replaces the "valle prepare throughput" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import soundfile as sf
from report import command, write_section  # bench/ is on sys.path when run as a script

VOICES = [
    "espeak:en-us+f3",
    "espeak:en-gb+m3",
    "espeak:en-us+klatt",
    "espeak:en-us+m7",
    "mbrola:us1",
    "mbrola:us2",
    "mbrola:en1",
    "espeak:en-us+Alicia",
]


def make_corpus(root: Path, n: int) -> float:
    from valle_cli.assets import sentences
    from valle_cli.audio.speech import mbrola_voices, say

    voices = [v for v in VOICES if not v.startswith("mbrola:") or v.split(":")[1] in mbrola_voices()]
    texts = sentences("train")
    seconds = 0.0
    for i in range(n):
        voice, text = voices[i % len(voices)], texts[i % len(texts)]
        folder = root / "bench" / voice.replace(":", "_").replace("+", "_")
        folder.mkdir(parents=True, exist_ok=True)
        wav, sr = say(text, voice, speed=140 + 10 * (i % 5))
        sf.write(folder / f"u{i:05d}.wav", wav, sr)
        (folder / f"u{i:05d}.txt").write_text(text)
        seconds += len(wav) / sr
    return seconds


class RandomEncodec:
    """EnCodec 24 kHz with random weights, registered for the benchmark only (no download possible here)."""

    @classmethod
    def from_config(cls, cfg):
        from valle_cli.codecs.encodec_codec import EncodecCodec

        return EncodecCodec(cfg.bandwidth, pretrained=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--utterances", type=int, default=240)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--index-size", type=int, default=1_000_000, help="utterances in the index-opening test")
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()

    from valle_cli import plugins
    from valle_cli.config import CodecConfig
    from valle_cli.prepare.pipeline import PrepareOptions, prepare

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        voices = Path(tmp) / "voices"
        audio_seconds = make_corpus(voices, args.utterances)
        print(f"corpus: {args.utterances} utterances, {audio_seconds / 60:.1f} min", flush=True)
        with plugins.overridden("codec", add={"encodec-random": RandomEncodec}):
            for label, name in (
                ("mel (offline)", "mel"),
                ("EnCodec 6 kbps, random weights", "encodec-random"),
            ):
                out = Path(tmp) / f"ds-{name}"
                opts = PrepareOptions(
                    voices=voices,
                    output=out,
                    codec=CodecConfig(name=name),
                    device="cpu",
                    workers=args.workers,
                    batch_size=16,
                )
                t0 = time.perf_counter()
                report = prepare(opts)
                wall = time.perf_counter() - t0
                row = {
                    "codec": label,
                    "utterances": report.utterances,
                    "audio_h": report.seconds / 3600,
                    "wall_s": wall,
                    "utt_per_s": report.utterances / wall,
                    "audio_h_per_h": report.seconds / wall,
                }
                rows.append(row)
                print(
                    f"{label:32s} {row['utt_per_s']:.2f} utterances/s, {row['audio_h_per_h']:.1f} h of audio "
                    f"per hour ({wall:.1f} s wall)",
                    flush=True,
                )
    index = bench_index(args.index_size)
    if args.write:
        write_figures(args, rows, index)


def bench_index(n: int) -> dict:
    """Write the index of an n-utterance dataset (synthetic metadata) and time opening it and reading a row."""
    from valle_cli.data.dataset import Utterance, open_dataset, write_index
    from valle_cli.text import default_symbol_map

    sm = default_symbol_map()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        utts = [
            Utterance(
                uid=f"g{i % 7}/spk{i % 2000:04d}/utt{i:07d}",
                group=f"g{i % 7}",
                speaker=f"spk{i % 2000:04d}",
                language="en",
                text="",
                phonemes="ðə kwˈɪk bɹˈaʊn fˈɑːks dʒˈʌmps",
                duration=3.0,
                frames=225,
                source="",
                similar=[],
            )
            for i in range(n)
        ]
        t0 = time.perf_counter()
        write_index(root, utts, {"codec": {"frame_rate": 75.0, "name": "mel"}}, sm)
        build = time.perf_counter() - t0
        del utts
        t0 = time.perf_counter()
        ds = open_dataset(root)
        opened = time.perf_counter() - t0
        t0 = time.perf_counter()
        total = float(ds.durations().sum())
        _ = [ds.phonemes(i) for i in range(0, n, max(1, n // 1000))]
        _ = ds.uid(n - 1), ds.speaker(n - 1)
        access = time.perf_counter() - t0
    print(
        f"index of {n} utterances: written in {build:.1f} s, opened in {opened * 1000:.1f} ms, "
        f"total duration + 1000 rows in {access * 1000:.1f} ms ({total / 3600:.0f} h)",
        flush=True,
    )
    return {"n": n, "build_s": build, "open_ms": opened * 1000, "access_ms": access * 1000}


def write_figures(args, rows, index) -> None:
    import torch

    cmd = command("prepare.py")
    lines = [
        f"Command: `{cmd}`  ",
        f"Machine: {platform.machine()}, 2 CPU cores, torch {torch.__version__}, no GPU; {args.workers} loader "
        "workers, batches of 16. Corpus: espeak-ng and mbrola voices, English sentences of 2-4 s with sidecar "
        "transcripts (so no transcriber runs). Times include discovery, loading, resampling, phonemization, "
        "quantization, similar lists and the index.",
        "",
        "| codec | utterances | audio h | wall s | utterances/s | hours of audio per hour |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['codec']} | {r['utterances']} | {r['audio_h']:.3f} | {r['wall_s']:.1f} | "
            f"{r['utt_per_s']:.2f} | {r['audio_h_per_h']:.1f} |"
        )
    lines += [
        "",
        f"Opening a dataset of {index['n']:,} utterances (synthetic index, same format): "
        f"{index['open_ms']:.1f} ms; summing all durations and reading 1,000 phoneme rows: "
        f"{index['access_ms']:.1f} ms. Writing that index took {index['build_s']:.1f} s.",
        "",
    ]
    write_section("valle prepare throughput", lines)


if __name__ == "__main__":
    main()
