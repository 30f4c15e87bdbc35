"""The engine of `valle eval`: synthesize every item, judge it, aggregate per voice and overall.

Per item: the output's word errors against the text (ASR), its similarity to the voice (cosine between the
output's speaker embedding and the mean embedding of the voice's other clips), the same two for the ground
truth when there is one (the ceiling), the real-time factor, optionally the phoneme error rate of the
model's own speech-to-text on the output (models trained with stt), the free-running duration error (the
length of the output's speech against the ground truth's, silences trimmed from both ends, as a fraction of
the ground truth's), whether the AR stopped by itself, and, given impostor voices, whether the output is
closer to its own voice than to every impostor.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from valle_cli.eval.items import Item
from valle_cli.eval.judges import EvalError
from valle_cli.metrics import cosine, edit_distance, speech_seconds, word_errors


@dataclass
class Scored:
    voice: str
    text: str
    hypothesis: str
    errors: int
    words: int
    similarity: float
    audio_seconds: float
    synth_seconds: float
    truth_hypothesis: str | None = None
    truth_errors: int | None = None
    truth_similarity: float | None = None
    phoneme_errors: int | None = None
    phonemes: int | None = None
    closest_to_own: bool | None = None
    output: str | None = None
    duration_error: float | None = None  # (output speech - truth speech) / truth speech, seconds trimmed
    stopped: bool = True  # every segment ended by itself (not at the AR step limit)


@dataclass
class Summary:
    n: int
    wer: float
    similarity: float
    rtf: float
    truth_wer: float | None = None
    truth_similarity: float | None = None
    per: float | None = None
    closest_to_own: float | None = None
    duration_error: float | None = None  # mean |relative duration error| against the ground truth
    stopped: float | None = None  # fraction of items that ended by themselves


@dataclass
class Report:
    model: str
    transcriber: str
    verifier: str
    overall: Summary
    voices: dict[str, Summary]
    items: list[Scored] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def summarize(rows: list[Scored]) -> Summary:
    def mean(values):
        values = [v for v in values if v is not None]
        return float(np.mean(values)) if values else None

    def rate(errors, totals):
        pairs = [(e, n) for e, n in zip(errors, totals, strict=True) if e is not None]
        return sum(e for e, _ in pairs) / max(sum(n for _, n in pairs), 1) if pairs else None

    closest = [r.closest_to_own for r in rows if r.closest_to_own is not None]
    return Summary(
        n=len(rows),
        wer=rate([r.errors for r in rows], [r.words for r in rows]),
        similarity=mean(r.similarity for r in rows),
        rtf=sum(r.synth_seconds for r in rows) / max(sum(r.audio_seconds for r in rows), 1e-9),
        truth_wer=rate([r.truth_errors for r in rows], [r.words for r in rows]),
        truth_similarity=mean(r.truth_similarity for r in rows),
        per=rate([r.phoneme_errors for r in rows], [r.phonemes for r in rows]),
        closest_to_own=float(np.mean(closest)) if closest else None,
        duration_error=mean(None if r.duration_error is None else abs(r.duration_error) for r in rows),
        stopped=float(np.mean([r.stopped for r in rows])) if rows else None,
    )


EMBED_SECONDS = 60.0  # of a reference or impostor file, for its voice embedding
MAX_TRUTH_SECONDS = 120.0  # a ground-truth recording of one sentence


class Embeddings:
    """Speaker embeddings of files, computed once each."""

    def __init__(self, verifier):
        self.verifier, self._cache = verifier, {}

    def of_file(self, path: Path) -> np.ndarray:
        from valle_cli.audio.io import load_audio

        if path not in self._cache:
            wav = load_audio(path, 16000, allow_silent=True, end=EMBED_SECONDS)  # a voice, not the whole file
            self._cache[path] = self.verifier.embed(wav, 16000)
        return self._cache[path]

    def voice(self, paths: list[Path]) -> np.ndarray:
        return np.mean([self.of_file(p) for p in paths], axis=0)


def evaluate(
    loaded,
    items: list[Item],
    asr,
    verifier,
    language: str = "en",
    seed: int = 0,
    device: str = "cpu",
    impostors: dict[str, list[Path]] | None = None,
    outputs: Path | None = None,
    progress: Callable[[int, int], None] | None = None,
    sampling: dict | None = None,
) -> Report:
    """Synthesize every item (seed + k for the k-th; `sampling`: SamplingConfig settings such as ar_temp,
    top_k, top_p) and judge it."""
    import torch

    from valle_cli.audio.io import audio_seconds, load_audio, save_audio
    from valle_cli.infer.engine import SamplingConfig
    from valle_cli.infer.synth import SynthOptions, synthesize

    for item in items:  # before any synthesis: a ground truth of hours would be read whole by the judges
        seconds = audio_seconds(item.truth) if item.truth is not None else 0.0
        if seconds > MAX_TRUTH_SECONDS:
            raise EvalError(
                f"the ground truth {item.truth} is {seconds:.0f} s long; valle eval compares "
                f"sentences, at most {MAX_TRUTH_SECONDS:.0f} s each",
                "give each sentence its own recording (valle prepare cuts long recordings at pauses)",
            )
    emb = Embeddings(verifier)
    impostor_voices = {name: emb.voice(paths) for name, paths in (impostors or {}).items()}
    stt = _SttJudge(loaded, language, device)
    rows: list[Scored] = []
    for k, item in enumerate(items):
        with torch.inference_mode():
            result = synthesize(
                loaded, item.text, [item.prompt], SynthOptions(language=language, split_sentences=True),
                SamplingConfig(seed=seed + k, **(sampling or {})), device,
            )  # fmt: skip
        audio, sr = result.audio, result.sample_rate
        target = emb.voice(item.others or [item.prompt])
        out_emb = verifier.embed(audio, sr)
        hyp = asr(audio, sr)
        errors, words = word_errors(item.text, hyp)
        row = Scored(item.voice, item.text, hyp, errors, words, cosine(out_emb, target), len(audio) / sr,
                     result.seconds, stopped=all(result.stopped))  # fmt: skip
        if item.truth is not None:
            truth = load_audio(item.truth, sr, allow_silent=True)
            row.truth_hypothesis = asr(truth, sr)
            row.truth_errors = word_errors(item.text, row.truth_hypothesis)[0]
            row.truth_similarity = cosine(emb.of_file(item.truth), target)
            truth_speech = speech_seconds(truth, sr)
            if truth_speech > 0:
                row.duration_error = (speech_seconds(audio, sr) - truth_speech) / truth_speech
        if stt.available:
            row.phoneme_errors, row.phonemes = stt.errors(audio, sr, item.text)
        if impostor_voices:
            own = row.similarity
            row.closest_to_own = all(own > cosine(out_emb, v) for name, v in impostor_voices.items()
                                     if name != item.voice)  # fmt: skip
        if outputs is not None:
            name = f"{k:04d}-{item.voice.replace('/', '-')}.wav"
            save_audio(outputs / name, audio, sr)
            row.output = name
        rows.append(row)
        if progress:
            progress(k + 1, len(items))
    voices = {v: summarize([r for r in rows if r.voice == v]) for v in dict.fromkeys(r.voice for r in rows)}
    return Report(str(loaded.source), asr.name, verifier.name, summarize(rows), voices, rows)


class _SttJudge:
    """Phoneme errors of the model's own speech-to-text on the output (models trained with stt only)."""

    def __init__(self, loaded, language: str, device: str):
        meta = loaded.meta
        from valle_cli.infer.stt import supports_stt

        self.available = supports_stt(meta)
        if not self.available:
            return
        from valle_cli.infer.synth import model_codec, model_language
        from valle_cli.text.symbols import SymbolMap

        self.model, self.language = loaded.model, language
        self.codec = model_codec(meta, loaded.model, device)
        self.symbols = SymbolMap.from_dict(meta["symbols"])
        self.lang = model_language(meta, language)

    def errors(self, audio: np.ndarray, sr: int, text: str) -> tuple[int, int]:
        import torch

        from valle_cli.audio.io import resample
        from valle_cli.infer.stt import transcribe_codes
        from valle_cli.text import phonemize

        wav = torch.from_numpy(resample(audio, sr, self.codec.sample_rate))[None, None]
        with torch.inference_mode():
            codes = self.codec.encode(wav)[0]
            ids, _ = transcribe_codes(self.model, codes, self.symbols.bos_id, self.symbols.eos_id, self.lang)
        want = self.symbols.encode(phonemize(text, self.language), add_bos_eos=False)
        return edit_distance(want, ids), len(want)
