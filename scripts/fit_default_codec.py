"""Recipe for the mel codebooks shipped in valle_cli/assets/: generate offline speech, fit, save.

The corpus is the English "train" sentences (the "held-out" ones are kept for benchmarks) spoken by espeak-ng
voices and variants at several speeds and pitches, the mbrola voices us1, us2 and en1 (us3 is held out for the
benchmarks), the piper "joe" voice, and German and French sentences by mbrola de2 and fr1. About 45 minutes of
speech; fitting takes a few minutes on two CPU cores.

Usage:  python scripts/fit_default_codec.py [-o valle_cli/assets/mel_codec_v1.safetensors] [--iters 20]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from valle_cli.assets import sentences
from valle_cli.audio import speech
from valle_cli.audio.io import resample
from valle_cli.codecs.mel_fit import fit_mel_codec

ROOT = Path(__file__).resolve().parents[1]
ESPEAK = [
    "en-us",
    "en-us+f3",
    "en-us+m3",
    "en-gb+f2",
    "en-gb+m7",
    "en-us+klatt",
    "en-us+Alicia",
    "en-us+edward",
    "en-gb-x-rp+f4",
    "en-us+iven3",
]
HELD_OUT_VOICES = ["mbrola:us3"]


def corpus():
    en = sentences("train")
    jobs = []
    for i, v in enumerate(ESPEAK):
        for j, s in enumerate(en):
            jobs.append((s, f"espeak:{v}", 130 + 15 * ((i + j) % 5), 30 + 10 * ((i * 7 + j) % 5)))
    for v in ("us1", "us2", "en1"):
        if v in speech.mbrola_voices():
            jobs += [(s, f"mbrola:{v}", 140 + 10 * (j % 4), 40 + 10 * (j % 3)) for j, s in enumerate(en)]
    for v, lang in (("de2", "de"), ("fr1", "fr")):
        if v in speech.mbrola_voices():
            jobs += [(s, f"mbrola:{v}", 150, 50) for s in sentences("train", lang)]
    if speech.piper_available():
        jobs += [(s, "piper:joe", 140 + 20 * (j % 3), 50) for j, s in enumerate(en)]
    return jobs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-o", "--output", default=str(ROOT / "valle_cli/assets/mel_codec_v1.safetensors"))
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args()
    torch.manual_seed(0)
    jobs = corpus()
    t0 = time.time()
    wavs = []
    for text, voice, speed, pitch in jobs:
        wav, sr = speech.say(text, voice, speed=speed, pitch=pitch)
        wavs.append(resample(wav, sr, 24_000))
    minutes = sum(w.size for w in wavs) / 24_000 / 60
    print(f"corpus: {len(wavs)} utterances, {minutes:.1f} min, made in {time.time() - t0:.0f} s", flush=True)
    t0 = time.time()
    voices = sorted({v for _, v, _, _ in jobs})

    def progress(stage: str, done: int, total: int) -> None:
        if stage.startswith("level") and done == total:
            print(f"  {stage} done at {time.time() - t0:.0f} s", flush=True)

    codec = fit_mel_codec(
        wavs,
        iters=args.iters,
        progress=progress,
        info={
            "corpus_minutes": round(minutes, 1),
            "voices": voices,
            "recipe": "scripts/fit_default_codec.py",
        },
    )
    codec.save(args.output)
    print(f"fitted in {time.time() - t0:.0f} s -> {args.output}")


if __name__ == "__main__":
    main()
