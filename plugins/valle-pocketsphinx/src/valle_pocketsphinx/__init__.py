"""valle transcriber plugin: offline English speech recognition with PocketSphinx.

Implements valle's transcriber protocol: `transcribe(wav, sample_rate, language) -> list[Segment]`, where a
segment has `start` and `end` in seconds and `text`. Audio is resampled to 16 kHz. One decoder is kept per
instance (creating one loads the models, ~0.3 s); its cepstral-mean estimate is reset before every file, so a
file's transcript never depends on the files decoded before it. Only English is supported; other languages
raise ValueError with the remedy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__version__ = "0.1.1"


@dataclass(frozen=True)
class Segment:
    start: float
    end: float
    text: str


class PocketsphinxTranscriber:
    name = "pocketsphinx"
    languages = ("en",)
    sample_rate = 16_000

    def __init__(self, **options):
        from pocketsphinx import Decoder

        self._decoder = Decoder(samprate=self.sample_rate, loglevel="FATAL", **options)

    def transcribe(self, wav: np.ndarray, sample_rate: int, language: str = "en") -> list[Segment]:
        """Mono float waveform -> word-timed segments split at pauses of 0.3 s or more."""
        if language.split("-")[0].lower() != "en":
            raise ValueError(
                f"pocketsphinx transcribes English only, not {language!r}; use the whisper transcriber"
            )
        audio = np.asarray(wav, dtype=np.float32).reshape(-1)
        if sample_rate != self.sample_rate:
            import soxr

            audio = soxr.resample(audio, sample_rate, self.sample_rate)
        pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()
        d = self._decoder
        d.reinit_feat()  # fresh feature state (cepstral mean): otherwise it carries over from the last file
        d.start_utt()
        d.process_raw(pcm, full_utt=True)
        d.end_utt()
        words = [
            (seg.start_frame / 100.0, seg.end_frame / 100.0, seg.word)
            for seg in d.seg()
            if not seg.word.startswith(("<", "[")) and seg.word not in ("(NULL)",)
        ]
        segments: list[Segment] = []
        group: list[tuple[float, float, str]] = []
        for w in words:
            if group and w[0] - group[-1][1] >= 0.3:
                segments.append(_join(group))
                group = []
            group.append(w)
        if group:
            segments.append(_join(group))
        return segments

    def transcribe_text(self, wav: np.ndarray, sample_rate: int, language: str = "en") -> str:
        return " ".join(s.text for s in self.transcribe(wav, sample_rate, language))


def _join(words: list[tuple[float, float, str]]) -> Segment:
    text = " ".join(w[2].split("(")[0] for w in words)  # "read(2)" is an alternate pronunciation of "read"
    return Segment(words[0][0], words[-1][1], text)
