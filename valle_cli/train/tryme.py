"""`valle train --try-me`: the whole pipeline on one utterance, in well under a minute on a CPU.

It speaks a sentence with an offline voice (or takes your recording and its text), prepares a one-utterance
dataset with the offline codec, trains a small model until it has memorized that utterance, then synthesizes
the sentence from its own first three seconds as the prompt, with greedy decoding, and writes the audio. The
report compares the generated tokens with the real ones level by level: a model that learned reproduces them
(and stops at the right frame). It is the quick check that prepare, training, the KV-cached decoder and the
codec all work together on your machine; it is not a voice model (that needs `valle train` on real data).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_TEXT = "The little boat sailed across the calm blue water."
SETTINGS = [
    "model.d_model=128",
    "model.n_heads=4",
    "model.ffn_dim=512",
    "model.n_layers=3",
    "data.val_fraction=0",
    "data.batch_size=1",
    "data.min_duration=0.5",
    "data.num_workers=0",
    "data.prompt_duration=[3.0,3.0]",
    "train.lr=3e-3",
    "train.warmup_steps=20",
    "train.eval_every=100000",
    "train.save_every=100000",
    "train.keep_last=1",
]


@dataclass
class TryMeReport:
    output: Path
    voice: str
    steps: int
    train_seconds: float
    first_loss: float
    last_loss: float
    frames: int
    generated_frames: int
    stopped: bool
    level_match: list[float] = field(default_factory=list)  # fraction of frames equal to the real codes
    synth_seconds: float = 0.0


def _speaker() -> str:
    from valle_cli.audio.speech import mbrola_voices, piper_available

    if "us1" in mbrola_voices():
        return "mbrola:us1"
    return "piper:joe" if piper_available() else "espeak:en-us"


def try_me(
    output: Path,
    text: str = DEFAULT_TEXT,
    audio: Path | None = None,
    steps: int = 400,
    events: Callable[[str, dict], None] | None = None,
) -> TryMeReport:
    import soundfile as sf

    from valle_cli.audio.io import load_audio, save_audio
    from valle_cli.audio.speech import say
    from valle_cli.codecs.base import build_codec
    from valle_cli.config import CodecConfig, load_config
    from valle_cli.data.loader import Item, load_item
    from valle_cli.infer.engine import SamplingConfig, generate
    from valle_cli.prepare.pipeline import PrepareOptions, prepare
    from valle_cli.train.trainer import Trainer

    events = events or (lambda kind, payload: None)
    output.mkdir(parents=True, exist_ok=True)
    folder = output / "voices" / "try-me" / "speaker"
    folder.mkdir(parents=True, exist_ok=True)
    if audio is not None:
        limit = (30.0, "try-me memorizes one utterance: record or cut one sentence")
        wav, sr, voice = load_audio(audio, 24_000, min_duration=1.0, max_duration=limit), 24_000, str(audio)
    else:
        voice = _speaker()
        wav, sr = say(text, voice)
    sf.write(folder / "utterance.wav", wav, sr)
    (folder / "utterance.txt").write_text(text)
    dataset = output / "dataset"
    prepare(
        PrepareOptions(
            voices=output / "voices",
            output=dataset,
            codec=CodecConfig(name="mel"),
            device="cpu",
            workers=1,
            min_duration=0.5,
            max_duration=30.0,
        )
    )
    losses: list[float] = []

    def on_event(kind: str, payload: dict) -> None:
        if kind == "step":
            losses.append(payload["loss"])
        events(kind, payload)

    cfg = load_config(
        "tiny", [f"data.paths=[{dataset}]", f"train.steps={steps}", "data.max_duration=30", *SETTINGS]
    )
    t0 = time.time()
    trainer = Trainer(cfg, output / "run", on_event)
    trainer.train()
    train_seconds = time.time() - t0
    ds = trainer.ds
    item = load_item(ds, Item(0, 0, 0, min(225, ds.frames(0))))
    trainer.model.eval()
    t0 = time.time()
    out = generate(
        trainer.model,
        item["phonemes"],
        item["prompt"],
        sampling=SamplingConfig(ar_temp=0.0, max_ar_steps=2 * ds.frames(0) + 75),
    )
    codec = build_codec(CodecConfig(name="mel"), device="cpu")
    if out.codes.shape[1]:
        save_audio(output / "try-me.wav", codec.decode(out.codes[None])[0, 0], codec.sample_rate)
    synth_seconds = time.time() - t0
    real = item["response"]
    n = min(real.shape[1], out.codes.shape[1])
    match = [float((out.codes[q, :n] == real[q, :n]).float().sum()) / max(real.shape[1], 1) for q in range(8)]
    return TryMeReport(
        output,
        voice,
        trainer.step,
        train_seconds,
        losses[0] if losses else float("nan"),
        losses[-1] if losses else float("nan"),
        int(real.shape[1]),
        int(out.codes.shape[1]),
        out.stopped,
        match,
        synth_seconds,
    )
