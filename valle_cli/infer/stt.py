"""Speech to phonemes with the model's own `stt` task: the engine behind `valle stt`.

The audio is encoded with the model's codec; the sequence is `[language] [stt] [level] <sep0> audio <sep1>`
followed by BOS, and the text head predicts phonemes one at a time (KV-cached, greedy) until EOS. It works only
for models trained with `train.stt_prob > 0`; the metadata's `stt_prob` says whether that is so, and a model
without it is refused with that remedy rather than left to print noise.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from valle_cli.errors import ValleError
from valle_cli.infer.engine import Decoder
from valle_cli.infer.load import Loaded
from valle_cli.model.valle import Sample


@dataclass
class SttResult:
    ipa: str
    ids: list[int]
    seconds: float  # wall time
    audio_seconds: float
    finished: bool  # EOS reached (False: hit max_symbols)


@torch.inference_mode()
def transcribe_codes(
    model,
    codes: torch.Tensor,
    bos_id: int,
    eos_id: int,
    language: int = 0,
    max_symbols: int = 1000,
    use_cache: bool = True,
    progress: Callable[[int], None] | None = None,
) -> tuple[list[int], bool]:
    """Audio codes (Q, F) -> phoneme ids (without BOS/EOS) and whether EOS was reached; greedy.
    `progress(n)` hears the count of symbols after each one."""
    dev = model.sep.device
    q = model.n_levels
    empty = torch.zeros(q, 0, dtype=torch.long, device=dev)
    sample = Sample(empty[0], codes[:q].to(dev), empty, 0, language, "stt")
    pre, _, _ = model.prefix(sample)
    prefix = torch.cat([pre, model.text_emb(torch.tensor([bos_id], device=dev))])
    use_cache = use_cache and model.backbone.supports_cache
    dec = Decoder(model.backbone, [prefix], model.text_emb, model.text_head, use_cache)
    ids: list[int] = []
    for _ in range(max_symbols):
        token = int(dec.logits()[0].argmax())
        if token == eos_id:
            return ids, True
        ids.append(token)
        if progress:
            progress(len(ids))
        dec.feed(torch.tensor([token]))
    return ids, False


def supports_stt(meta: dict) -> bool:
    """Whether a model was trained on the speech-to-text task (train.stt_prob > 0)."""
    return float(meta.get("config", {}).get("train", {}).get("stt_prob", 0.0)) > 0


def max_stt_seconds(model, frame_rate: float) -> float:
    """The longest audio the model transcribes in one pass: three quarters of its context (max_position) hold
    the audio frames, the rest the header and the phonemes."""
    return int(model.cfg.max_position * 0.75 - 8) / frame_rate


def check_lengths(audio: list[Path], cap: float) -> None:
    """Refuse any file longer than `cap` seconds, from its header (nothing is decoded)."""
    from valle_cli.audio.io import audio_seconds
    from valle_cli.errors import AudioError

    for path in audio:
        seconds = audio_seconds(path)
        if seconds > cap:
            raise AudioError(
                f"{path} is {seconds:.1f} s long; this model transcribes at most {cap:.1f} s at a time (its "
                "context)",
                "cut it into utterances first: `valle prepare` cuts long recordings at pauses, or e.g. "
                f"`sox {path} part.wav trim 0 {int(cap)}`",
            )


SYMBOLS_PER_SECOND = 15  # about how many phoneme symbols a second of speech holds: a progress bar's total


def stt(
    loaded: Loaded,
    audio: list[Path],
    language: str = "en",
    device: str = "cpu",
    progress: Callable[[Path, int, int], None] | None = None,
) -> Iterator[SttResult]:
    """Transcribe each file in turn (the codec is built once). `progress(path, symbols, expected)` hears every
    symbol (expected: an estimate from the audio's length, raised when passed)."""
    from valle_cli.audio.io import load_audio
    from valle_cli.infer.synth import model_codec, model_language
    from valle_cli.text.symbols import SymbolMap

    meta, model = loaded.meta, loaded.model
    if not supports_stt(meta):
        raise ValleError(
            f"{loaded.source} was not trained for speech-to-text (train.stt_prob is 0)",
            "train or fine-tune with --set train.stt_prob=0.2 to teach it the stt task",
        )
    lang = model_language(meta, language)
    codec = model_codec(meta, model, device)
    symbols = SymbolMap.from_dict(meta["symbols"])
    check_lengths(audio, max_stt_seconds(model, codec.frame_rate))  # every file, before transcribing any
    for path in audio:
        t0 = time.time()
        wav = load_audio(path, codec.sample_rate, min_duration=0.2)
        codes = codec.encode(torch.from_numpy(wav)[None, None])[0]
        room = model.cfg.max_position - codes.shape[-1] - 8  # the phonemes share the context with the audio
        cap = max(1, min(1000, room))
        expected = min(cap, max(1, round(wav.size / codec.sample_rate * SYMBOLS_PER_SECOND)))

        def heard(n: int, path: Path = path, expected: int = expected, cap: int = cap) -> None:
            if progress:
                progress(path, n, max(expected, n + 1) if n < cap else n)

        ids, finished = transcribe_codes(
            model, codes, symbols.bos_id, symbols.eos_id, lang, cap, progress=heard
        )
        yield SttResult(symbols.decode(ids), ids, time.time() - t0, wav.size / codec.sample_rate, finished)
