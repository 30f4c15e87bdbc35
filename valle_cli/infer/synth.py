"""Text + reference voice -> speech, with a loaded model: the engine behind `valle synth`.

Each non-empty line of the text is phonemized and generated separately (KV-cached AR, then NAR), with the
reference clips (concatenated, then trimmed to `prompt_seconds`) as the prompt; the lines are joined with short
silences into one waveform. The codec and symbol map are the ones the model was trained with (from its
metadata); a language the model never saw, empty text, unreadable or too-short references are `ValleError`s.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from valle_cli.errors import AudioError, TextError, ValleError
from valle_cli.infer.engine import SamplingConfig, generate
from valle_cli.infer.load import Loaded

MIN_PROMPT_SECONDS = 1.0
GAP_SECONDS = 0.25


@dataclass
class SynthResult:
    audio: np.ndarray  # (T,) float32
    sample_rate: int
    lines: int
    frames: int
    seconds: float  # wall time
    stopped: list[bool]


def _codec(meta: dict, device: str):
    from valle_cli.codecs.base import build_codec
    from valle_cli.config import CodecConfig

    c = meta["codec"]
    return build_codec(
        CodecConfig(name=c["name"], bandwidth=float(c.get("bandwidth", 6.0)), path=c.get("path")), device
    )


def prompt_codes(codec, refs: list[Path], seconds: float, levels: int) -> torch.Tensor:
    from valle_cli.audio.io import load_audio

    if not refs:
        raise AudioError("no reference audio given", "pass --ref voice.wav (3-6 s of the voice to clone)")
    wavs = [load_audio(r, codec.sample_rate) for r in refs]
    wav = np.concatenate(wavs)[: int(seconds * codec.sample_rate)]
    if wav.size < MIN_PROMPT_SECONDS * codec.sample_rate:
        raise AudioError(
            f"the reference audio is {wav.size / codec.sample_rate:.2f} s; at least {MIN_PROMPT_SECONDS:.0f} s is needed",
            "use a longer clip (3-6 s works best)",
        )
    return codec.encode(torch.from_numpy(wav)[None, None])[0, :levels].cpu()


def synthesize(
    loaded: Loaded,
    text: str,
    refs: list[Path],
    language: str = "en",
    sampling: SamplingConfig | None = None,
    prompt_seconds: float = 6.0,
    device: str = "cpu",
    progress: Callable[[int, int], None] | None = None,
) -> SynthResult:
    from valle_cli.text import language_code, phonemize
    from valle_cli.text.symbols import SymbolMap

    t0 = time.time()
    meta, model = loaded.meta, loaded.model
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise TextError("the text is empty", "give at least one word to speak")
    lang = language_code(language)
    languages = meta.get("languages") or ["en"]
    if lang not in languages:
        raise TextError(
            f"the model was not trained on language {lang!r}",
            f"it knows: {', '.join(languages)}; use --language",
        )
    symbols = SymbolMap.from_dict(meta["symbols"])
    codec = _codec(meta, device)
    prompt = prompt_codes(codec, refs, prompt_seconds, model.n_levels)
    pieces, stopped, frames = [], [], 0
    gap = np.zeros(int(GAP_SECONDS * codec.sample_rate), dtype=np.float32)
    for i, line in enumerate(lines):
        ipa = phonemize(line, lang)
        ids = torch.tensor(symbols.encode(ipa))
        out = generate(model, ids, prompt, languages.index(lang), sampling)
        stopped.append(out.stopped)
        if out.codes.shape[1]:
            frames += out.codes.shape[1]
            pieces.append(codec.decode(out.codes[None].to(codec.device))[0, 0].cpu().numpy())
        if i + 1 < len(lines):
            pieces.append(gap)
        if progress:
            progress(i + 1, len(lines))
    if not frames:
        raise ValleError(
            "the model produced no audio (it stopped at once)", "check the model; try --ar-temp 1.0"
        )
    audio = np.concatenate(pieces).astype(np.float32)
    return SynthResult(audio, codec.sample_rate, len(lines), frames, time.time() - t0, stopped)
