"""Text + reference voice -> speech, with a loaded model: the engine behind `valle synth`.

- Text: every non-empty line (and with `split_sentences` every sentence of it) is a segment, generated
  separately; segments are joined with short silences (`gap_seconds` between lines, half that between sentences)
  into **one** waveform.
- Voice: the reference clips are concatenated and trimmed to the longest prompt the model was trained with
  (`data.prompt_duration`); with `prompt_seconds` set, trimmed or repeated to exactly that (repeating a short
  clip, as the original does; never when continuing it). No reference at all means no prompt: a random voice
  (`--seed` keeps it).
- Continuation (VALL-E's other mode): with `prompt_text` (the reference's transcript), every segment is spoken
  as the continuation of the reference: its text is the transcript plus the segment, and the response starts
  with the codes of the whole reference (not returned; the prompt slot still holds the trimmed one).
  `prompt_prefix` does that for the first segment, whose text already starts with the transcript (the
  original's `--input-prompt-prefix`). With `rolling_context` each segment continues
  the previous generated one instead, which keeps voice and prosody steady across long texts.
- Segments without rolling context are generated in batches of `batch_size` (padded; same output as one by one).
- Streaming: `synthesize_stream` yields audio chunks as they are produced (infer/stream.py).

The codec and symbol map are the ones the model was trained with (its metadata); a language the model never
saw, text with nothing to pronounce, unreadable or too-short references, a codec that does not fit the model
are `ValleError`s with a remedy.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from valle_cli.errors import AudioError, TextError, ValleError
from valle_cli.infer.engine import Generated, Request, SamplingConfig, StepProgress, generate_batch
from valle_cli.infer.load import Loaded

MIN_PROMPT_SECONDS = 1.0
# a sentence ends at . ! ? … (or their CJK forms) followed by space or the end, unless it is a common abbreviation
_SENTENCE_END = re.compile(r"(?<=[.!?…。！？])[\"')\]]*\s+")
_ABBREVIATIONS = {"mr.", "mrs.", "ms.", "dr.", "st.", "prof.", "sr.", "jr.", "vs.", "etc.", "e.g.", "i.e."}


@dataclass
class SynthOptions:
    language: str = "en"
    prompt_seconds: float | None = None  # None: the model's longest training prompt, never repeated
    split_sentences: bool = False
    prompt_text: str | None = None  # the reference's transcript: continue the reference
    prompt_prefix: bool = False  # the text already starts with the reference's transcript
    rolling_context: bool = False  # each segment continues the previous one
    batch_size: int = 8
    gap_seconds: float = 0.25


@dataclass
class Segment:
    text: str
    line: int
    gap_after: float  # seconds of silence after it (0 for the last)


@dataclass
class SynthResult:
    audio: np.ndarray  # (T,) float32
    sample_rate: int
    lines: int
    frames: int
    seconds: float  # wall time
    stopped: list[bool]  # per segment: the AR emitted STOP
    segments: int = 0
    codes: list[torch.Tensor] = field(default_factory=list)  # (Q, F) per segment


def split_sentences(line: str) -> list[str]:
    """Sentences of one line; abbreviations like 'Dr.' do not end a sentence."""
    parts, current = [], ""
    for piece in _SENTENCE_END.split(line):
        current = f"{current} {piece}".strip() if current else piece.strip()
        words = current.split()
        if words and words[-1].lower() not in _ABBREVIATIONS:
            parts.append(current)
            current = ""
    if current:
        parts.append(current)
    return [p for p in parts if p]


def segments(text: str, sentences: bool = False, gap: float = 0.25) -> list[Segment]:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise TextError("the text is empty", "give at least one word to speak")
    out: list[Segment] = []
    for i, line in enumerate(lines):
        pieces = split_sentences(line) if sentences else [line]
        for j, piece in enumerate(pieces):
            out.append(Segment(piece, i, gap / 2 if j + 1 < len(pieces) else gap))
    out[-1].gap_after = 0.0
    return out


def model_language(meta: dict, language: str) -> int:
    from valle_cli.text import language_code

    lang = language_code(language)
    languages = meta.get("languages") or ["en"]
    if lang not in languages:
        raise TextError(
            f"the model was not trained on language {lang!r}",
            f"it knows: {', '.join(languages)}; use --language",
        )
    return languages.index(lang)


def model_codec(meta: dict, model, device: str):
    """The codec the model was trained with, checked against the model's token shape."""
    from valle_cli.codecs.base import codec_from_header

    codec = codec_from_header(meta["codec"], device)
    if codec.codebook_size != model.codebook_size or codec.n_codebooks < model.n_levels:
        raise ValleError(
            f"the codec {meta['codec']['name']!r} here has {codec.n_codebooks} levels x {codec.codebook_size} codes, but the "
            f"model was trained on {model.n_levels} x {model.codebook_size}",
            "use the codec files the model was trained with (codec.path in its config) or re-export the model",
        )
    n_symbols = len(meta["symbols"]["symbols"])
    if model.text_emb.num_embeddings != n_symbols:
        raise ValleError(
            f"the model's symbol map has {n_symbols} symbols but its weights expect "
            f"{model.text_emb.num_embeddings}",
            "the export is inconsistent: export it again from its run folder",
        )
    return codec


def reference_audio(
    codec, refs: list[Path], seconds: float | None = None, cap: float | None = None
) -> np.ndarray | None:
    """The reference clips joined at the codec's rate, (T,) float32; None without refs. `seconds`: only that
    much of each clip is decoded (a prompt needs a few seconds, even of an hours-long file); `cap`: when the
    whole clip is needed, a longer one is refused from its header."""
    from valle_cli.audio.io import load_audio

    if not refs:
        return None
    limit = (
        None if cap is None else (cap, "continue from a shorter clip: its transcript must cover all of it")
    )
    wav = np.concatenate([load_audio(r, codec.sample_rate, end=seconds, max_duration=limit) for r in refs])
    if wav.size < MIN_PROMPT_SECONDS * codec.sample_rate:
        raise AudioError(
            f"the reference audio is {wav.size / codec.sample_rate:.2f} s; at least {MIN_PROMPT_SECONDS:.0f} s is needed",
            "use a longer clip (3-6 s works best)",
        )
    return wav


def prompt_codes(
    codec, wav: np.ndarray | None, seconds: float | None, levels: int, repeat: bool = True
) -> torch.Tensor:
    """Codes (Q, F) of the reference, trimmed (and with `repeat`, repeated) to `seconds` (None: all of it);
    (Q, 0) without a reference."""
    if wav is None:
        return torch.zeros(levels, 0, dtype=torch.long)
    if seconds is not None:
        want = int(seconds * codec.sample_rate)
        if wav.size < want and repeat:
            wav = np.tile(wav, -(-want // wav.size))
        wav = wav[:want]
    return codec.encode(torch.from_numpy(wav.copy())[None, None])[0, :levels].cpu()


class _Speaker:
    """Turns segments into requests: phonemes, prompt, continuation prefix."""

    def __init__(self, loaded: Loaded, refs: list[Path], opts: SynthOptions, device: str):
        from valle_cli.text.symbols import SymbolMap

        self.meta, self.model, self.opts = loaded.meta, loaded.model, opts
        self.lang = model_language(self.meta, opts.language)
        self.lang_code = (self.meta.get("languages") or ["en"])[self.lang]
        self.symbols = SymbolMap.from_dict(self.meta["symbols"])
        self.codec = model_codec(self.meta, self.model, device)
        continuing = bool(opts.prompt_text or opts.prompt_prefix)
        if continuing and not refs:
            raise TextError(
                "continuing the prompt (--prompt-text / --input-prompt-prefix) needs a reference clip",
                "pass --ref voice.wav, the recording of that transcript",
            )
        if opts.prompt_prefix and opts.split_sentences:
            raise TextError(
                "--input-prompt-prefix continues the reference from the first segment only, and splitting "
                "sentences could cut its transcript",
                "give the transcript with --prompt-text instead: every segment then continues the reference",
            )
        trained = (self.meta.get("config", {}).get("data", {}).get("prompt_duration") or [3.0, 6.0])[-1]
        seconds = opts.prompt_seconds or float(trained)
        repeat = opts.prompt_seconds is not None and not continuing
        context = (
            self.model.cfg.max_position / 2 / self.codec.frame_rate
        )  # half the context for the reference
        if opts.prompt_seconds is not None and opts.prompt_seconds > context:
            raise ValleError(
                f"--input-prompt-length {opts.prompt_seconds:g} s is more than this model's context holds for "
                f"a reference ({context:.1f} s of {self.model.cfg.max_position} positions)",
                f"give at most {int(context)} seconds (3-6 s is what models train on)",
            )
        wav = (
            reference_audio(self.codec, refs, cap=context)
            if continuing
            else reference_audio(self.codec, refs, seconds=max(seconds, MIN_PROMPT_SECONDS))
        )
        self.prompt = prompt_codes(self.codec, wav, seconds, self.model.n_levels, repeat)
        # the continuation prefix is the whole reference: its transcript describes all of it
        self.reference = prompt_codes(self.codec, wav, None, self.model.n_levels) if continuing else None

    def phonemes(self, text: str) -> torch.Tensor:
        from valle_cli.text import phonemize

        ids = self.symbols.encode(phonemize(text, self.lang_code))
        if not [i for i in ids[1:-1] if i != self.symbols.unk_id and self.symbols.symbols[i].strip()]:
            raise TextError(
                f"{text!r} has nothing the model can pronounce", "give words in the model's language"
            )
        return torch.tensor(ids)

    def request(
        self, seg: Segment, previous: tuple[str, torch.Tensor] | None = None, first: bool = True
    ) -> Request:
        """The request of a segment: continuing the previous one (rolling context), the reference (with
        --prompt-text every segment, with --input-prompt-prefix the first, whose text starts with the
        transcript), or plain."""
        if previous is not None:
            prev_text, prev_codes = previous
            return Request(self.phonemes(f"{prev_text} {seg.text}"), self.prompt, self.lang, prev_codes)
        if self.opts.prompt_text:
            text = f"{self.opts.prompt_text.strip()} {seg.text}"
            return Request(self.phonemes(text), self.prompt, self.lang, self.reference)
        if self.opts.prompt_prefix and first:
            return Request(self.phonemes(seg.text), self.prompt, self.lang, self.reference)
        return Request(self.phonemes(seg.text), self.prompt, self.lang)


def _speaker(
    loaded: Loaded, refs: list[Path], opts: SynthOptions, device: str, segs: list[Segment]
) -> _Speaker:
    sp = _Speaker(loaded, refs, opts, device)
    for seg in segs:  # phonemize everything first: bad text fails before any generation
        sp.phonemes(seg.text)
    return sp


def _decode(codec, codes: torch.Tensor) -> np.ndarray:
    """(Q, F) codes -> (T,) float32 audio; no frames -> no samples."""
    if not codes.shape[1]:
        return np.zeros(0, dtype=np.float32)
    return codec.decode(codes[None].to(codec.device))[0, 0].cpu().numpy()


def _generate(
    sp: _Speaker,
    segs: list[Segment],
    sampling: SamplingConfig | None,
    progress: Callable[[int, int], None] | None,
    steps: StepProgress | None = None,
) -> list[Generated]:
    outs: list[Generated] = []
    if sp.opts.rolling_context:
        previous = None
        for i, seg in enumerate(segs):
            req = sp.request(seg, previous, first=i == 0)
            outs.extend(generate_batch(sp.model, [req], sampling, progress=steps))
            if outs[-1].codes.shape[1]:
                previous = (seg.text, outs[-1].codes)
            if progress:
                progress(len(outs), len(segs))
        return outs
    reqs = [sp.request(s, first=i == 0) for i, s in enumerate(segs)]
    return _in_batches(sp.model, reqs, sp.opts.batch_size, sampling, steps, progress)


def _in_batches(
    model,
    requests: list[Request],
    size: int,
    sampling: SamplingConfig | None,
    steps: StepProgress | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[Generated]:
    """`generate_batch` over padded batches of at most `size` requests, in order; `progress(done, total)`
    hears each finished batch."""
    outs: list[Generated] = []
    size = max(1, size)
    for i in range(0, len(requests), size):
        outs.extend(generate_batch(model, requests[i : i + size], sampling, progress=steps))
        if progress:
            progress(len(outs), len(requests))
    return outs


def synthesize(
    loaded: Loaded,
    text: str,
    refs: list[Path],
    options: SynthOptions | None = None,
    sampling: SamplingConfig | None = None,
    device: str = "cpu",
    progress: Callable[[int, int], None] | None = None,
    steps: StepProgress | None = None,
) -> SynthResult:
    """One waveform for the whole text. `progress(done, total)` hears each finished segment, `steps` every
    step within one (engine.generate_batch)."""
    t0 = time.time()
    opts = options or SynthOptions()
    segs = segments(text, opts.split_sentences, opts.gap_seconds)
    sp = _speaker(loaded, refs, opts, device, segs)
    return _joined(sp, segs, _generate(sp, segs, sampling, progress, steps), t0)


def synthesize_many(
    loaded: Loaded,
    texts: list[tuple[str, list[Path]]],
    options: SynthOptions | None = None,
    sampling: SamplingConfig | None = None,
    device: str = "cpu",
    steps: StepProgress | None = None,
) -> list[SynthResult | ValleError]:
    """Several texts, each in its own voice (text, reference clips), generated together: the segments of all of
    them share padded batches of `batch_size` rows, as one text's segments do (what `valle serve` does with
    requests that wait together). One result per text, or the `ValleError` its own text or reference met (the
    others still run). Not with `rolling_context` (each segment waits for the one before)."""
    opts = options or SynthOptions()
    if opts.rolling_context:
        raise ValueError("synthesize_many cannot use rolling_context: segments depend on each other")
    t0 = time.time()
    prepared: list[tuple[_Speaker, list[Segment]] | ValleError] = []
    rows: list[tuple[int, Request]] = []  # (text, request) in order
    for k, (text, refs) in enumerate(texts):
        try:
            segs = segments(text, opts.split_sentences, opts.gap_seconds)
            sp = _speaker(loaded, refs, opts, device, segs)
            rows.extend((k, sp.request(seg, first=i == 0)) for i, seg in enumerate(segs))
        except ValleError as exc:
            prepared.append(exc)
            continue
        prepared.append((sp, segs))
    outs: list[list[Generated]] = [[] for _ in texts]
    made = _in_batches(loaded.model, [r for _, r in rows], opts.batch_size, sampling, steps)
    for (k, _), out in zip(rows, made, strict=True):
        outs[k].append(out)
    results: list[SynthResult | ValleError] = []
    for got, made in zip(prepared, outs, strict=True):
        if isinstance(got, ValleError):
            results.append(got)
            continue
        try:
            results.append(_joined(*got, made, t0))
        except ValleError as exc:
            results.append(exc)
    return results


def _joined(sp: _Speaker, segs: list[Segment], outs: list[Generated], t0: float) -> SynthResult:
    """The segments' codes decoded and joined with their gaps into one waveform."""
    sr = sp.codec.sample_rate
    pieces, frames = [], 0
    for seg, out in zip(segs, outs, strict=True):
        frames += out.codes.shape[1]
        pieces.append(_decode(sp.codec, out.codes))
        pieces.append(np.zeros(int(seg.gap_after * sr), dtype=np.float32))
    if not frames:
        raise ValleError(
            "the model produced no audio (it stopped at once)", "check the model; try --ar-temp 1.0"
        )
    return SynthResult(
        np.concatenate(pieces).astype(np.float32),
        sr,
        len({s.line for s in segs}),
        frames,
        time.time() - t0,
        [o.stopped for o in outs],
        len(segs),
        [o.codes for o in outs],
    )


def synthesize_lines(
    loaded: Loaded,
    lines: list[str],
    refs: list[Path],
    options: SynthOptions | None = None,
    sampling: SamplingConfig | None = None,
    device: str = "cpu",
    progress: Callable[[int, int], None] | None = None,
) -> tuple[list[np.ndarray], int, list[bool]]:
    """One waveform per line (`valle synth --batch FILE`), generated in padded batches; the sample rate; and
    per line whether it ended by itself (False: it hit the step limit)."""
    opts = options or SynthOptions()
    segs = [Segment(line.strip(), i, 0.0) for i, line in enumerate(lines)]
    if not segs or any(not s.text for s in segs):
        raise TextError("the batch file has empty lines", "remove them or put one sentence on each line")
    sp = _speaker(loaded, refs, opts, device, segs)
    outs = _generate(sp, segs, sampling, progress)
    return [_decode(sp.codec, o.codes) for o in outs], sp.codec.sample_rate, [o.stopped for o in outs]


def synthesize_stream(
    loaded: Loaded,
    text: str,
    refs: list[Path],
    options: SynthOptions | None = None,
    sampling: SamplingConfig | None = None,
    device: str = "cpu",
    settings=None,
) -> Iterator[tuple[np.ndarray, int]]:
    """(audio chunk, sample rate) as the model produces them; the concatenation is the whole utterance."""
    from valle_cli.infer.stream import ChunkDecoder, StreamSettings, stream_codes

    opts = options or SynthOptions()
    st = settings or StreamSettings()
    segs = segments(text, opts.split_sentences, opts.gap_seconds)
    sp = _speaker(loaded, refs, opts, device, segs)
    sr = sp.codec.sample_rate
    previous = None
    for i, seg in enumerate(segs):
        req = sp.request(seg, previous if opts.rolling_context else None, first=i == 0)
        dec = ChunkDecoder(sp.codec, st.codec_context, st.crossfade)
        chunks = []
        for chunk in stream_codes(sp.model, req, sampling, st):
            chunks.append(chunk.codes)
            audio = dec.push(chunk.codes, chunk.last)
            if audio.size:
                yield audio, sr
        codes = torch.cat(chunks, 1)
        if codes.shape[1]:
            previous = (seg.text, codes)
        if seg.gap_after:
            yield np.zeros(int(seg.gap_after * sr), dtype=np.float32), sr
