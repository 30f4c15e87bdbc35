"""Generate the default model's training corpus and its evaluation set, offline.

    python recipes/default-model/make_corpus.py WORK [--scale 1.0] [--workers 2]

Writes
    WORK/voices/{espeak,mbrola,piper}/{speaker}/NNNNN.wav + .txt   training speech (valle prepare's layout)
    WORK/eval/texts.txt                                             valle's held-out sentences
    WORK/eval/refs/us2/NN.wav + .txt                                them, spoken by mbrola us2 (never trained on)
    WORK/eval/impostors/{speaker}/NN.wav                            some of them in every training voice

Speakers: espeak-ng en-us with 25 voice variants, the mbrola voices us1, us3 and en1 at two pitches each, and
the piper "joe" voice. mbrola us2 is held out for evaluation. Sentences come from sentences.py (varied,
deterministic, none of them held out) plus valle's own training sentences; each utterance gets its own
speaking rate and a small pitch jitter around its speaker's pitch. `--scale 1.0` is about three hours.
Re-running skips files that exist, so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import random
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sentences import generate

ESPEAK_VARIANTS = [
    "m1",
    "m2",
    "m3",
    "m4",
    "m5",
    "m6",
    "m7",
    "f1",
    "f2",
    "f3",
    "f4",
    "f5",
    "klatt",
    "klatt3",
    "croak",
    "grandpa",
    "Alex",
    "Andy",
    "Annie",
    "belinda",
    "david",
    "ed",
    "edward",
    "max",
    "steph",
]
HELD_OUT_VOICE = "us2"


@dataclass(frozen=True)
class Speaker:
    group: str
    name: str
    voice: str  # valle_cli.audio.speech voice string
    pitch: int
    utterances: int  # at --scale 1


def speakers() -> list[Speaker]:
    from valle_cli.audio.speech import espeak_variants, mbrola_voices, piper_available

    installed = set(espeak_variants())
    out = [
        Speaker("espeak", f"en-us-{v}", f"espeak:en-us+{v}", 50, 70)
        for v in ESPEAK_VARIANTS
        if v in installed
    ]
    mbrola = set(mbrola_voices())
    for name, pitches in (("us1", (50, 70)), ("us3", (50, 32)), ("en1", (50, 66))):
        if name in mbrola:
            out += [Speaker("mbrola", f"{name}-p{p}", f"mbrola:{name}", p, 250) for p in pitches]
    if piper_available():
        out.append(Speaker("piper", "joe", "piper:joe", 50, 400))
    return out


Job = tuple[str, str, int, int, Path]  # text, voice, speed, pitch, output file


def _speak(job: Job) -> float:
    import soundfile as sf

    from valle_cli.audio.speech import say

    text, voice, speed, pitch, path = job
    if path.exists() and path.with_suffix(".txt").exists():
        return 0.0
    wav, sr = say(text, voice, speed=speed, pitch=pitch)
    tmp = path.with_suffix(".tmp.wav")
    sf.write(tmp, wav, sr, subtype="PCM_16")
    tmp.replace(path)
    path.with_suffix(".txt").write_text(text + "\n", encoding="utf-8")
    return wav.size / sr


def jobs(work: Path, scale: float, seed: int = 0) -> list[Job]:
    """Training speech, then the evaluation set."""
    from valle_cli.assets import sentences as shipped

    pool = shipped("train") + generate(6000, seed=seed, exclude=set(shipped("held-out")))
    r = random.Random(seed)
    out = []
    for spk in speakers():
        folder = work / "voices" / spk.group / spk.name
        folder.mkdir(parents=True, exist_ok=True)
        for i, text in enumerate(r.sample(pool, max(1, round(spk.utterances * scale)))):
            speed = r.randint(140, 185)
            pitch = max(0, min(99, spk.pitch + r.randint(-5, 5)))
            out.append((text, spk.voice, speed, pitch, folder / f"{i:05d}.wav"))
    return out + eval_jobs(work / "eval")


def eval_jobs(folder: Path) -> list[Job]:
    """valle's held-out sentences (texts.txt) in the held-out voice (refs/us2/) and 5 of them in every training
    voice (impostors/SPEAKER/): the inputs of `valle eval --texts --refs --impostors`."""
    from valle_cli.assets import sentences as shipped

    held_out = shipped("held-out")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "texts.txt").write_text("\n".join(held_out) + "\n", encoding="utf-8")
    refs = folder / "refs" / HELD_OUT_VOICE
    refs.mkdir(parents=True, exist_ok=True)
    out = [(t, f"mbrola:{HELD_OUT_VOICE}", 160, 50, refs / f"{i:02d}.wav") for i, t in enumerate(held_out)]
    for spk in speakers():
        voice = folder / "impostors" / spk.name
        voice.mkdir(parents=True, exist_ok=True)
        out += [(t, spk.voice, 160, spk.pitch, voice / f"{i:02d}.wav") for i, t in enumerate(held_out[:5])]
    return out


def speak_all(todo: list[Job], workers: int = 2) -> float:
    """Speak every job (skipping files that exist); returns the seconds of new speech."""
    seconds = 0.0
    with ProcessPoolExecutor(workers) as pool:
        for i, s in enumerate(pool.map(_speak, todo, chunksize=16), 1):
            seconds += s
            if i % 500 == 0 or i == len(todo):
                print(f"{i}/{len(todo)} files, {seconds / 3600:.2f} h of new speech", flush=True)
    return seconds


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("work", type=Path)
    ap.add_argument("--scale", type=float, default=1.0, help="Utterances per speaker, relative (1 = ~3 h).")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    from valle_cli.audio.speech import mbrola_voices

    if HELD_OUT_VOICE not in mbrola_voices():
        sys.exit(
            f"mbrola {HELD_OUT_VOICE} is needed for the evaluation references: "
            f"sudo apt-get install mbrola mbrola-{HELD_OUT_VOICE} (Debian contrib/non-free)"
        )
    speak_all(jobs(args.work, args.scale, args.seed), args.workers)
    print(f"{len(speakers())} training speakers -> {args.work}/voices; evaluation set -> {args.work}/eval")


if __name__ == "__main__":
    main()
