"""Whisper transcription through transformers' speech-recognition pipeline (the `whisper` transcriber).

Long recordings are handled by the pipeline's 30-second chunking; segment timestamps come back with the
text, and `valle prepare` cuts utterances at them. The model (default `openai/whisper-small`; any Whisper
checkpoint on the hub or in a local folder works: `--set data.transcriber=whisper` plus the `VALLE_WHISPER_MODEL`
variable) downloads on first use into the Hugging Face cache. Offline with an empty cache, the error says what
to download and offers the offline alternative. Runs on the GPU when there is one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from valle_cli.errors import PluginError

DEFAULT_MODEL = "openai/whisper-small"


@dataclass(frozen=True)
class Segment:
    start: float
    end: float
    text: str


class WhisperTranscriber:
    name = "whisper"

    def __init__(self, model: str | None = None, device: str = "auto", batch_size: int = 4):
        import torch
        from transformers import pipeline

        from valle_cli.hub import snapshot

        model = model or os.environ.get("VALLE_WHISPER_MODEL", DEFAULT_MODEL)
        if Path(model).is_dir():
            path = Path(model)
        else:
            try:
                path = snapshot(model)
            except OSError as exc:
                raise PluginError(
                    f"the Whisper model {model} is not available offline ({exc})",
                    f"on a machine with internet run `hf download {model}` and copy "
                    "~/.cache/huggingface/hub, or set VALLE_WHISPER_MODEL to a local folder; offline English "
                    "alternative: pip install ./plugins/valle-pocketsphinx and --transcriber pocketsphinx",
                ) from None
        if device == "auto":
            device = "cuda:0" if torch.cuda.is_available() else "cpu"
        self.pipe = pipeline(
            "automatic-speech-recognition",
            model=str(path),
            device=device,
            chunk_length_s=30,
            batch_size=batch_size,
            torch_dtype=torch.float16 if device.startswith("cuda") else torch.float32,
        )

    def transcribe(self, wav: np.ndarray, sample_rate: int, language: str = "en") -> list[Segment]:
        """Mono float waveform -> segments with start/end seconds (Whisper's timestamps)."""
        from valle_cli.audio.io import resample

        audio = resample(np.asarray(wav, dtype=np.float32), sample_rate, 16_000)
        out = self.pipe(
            audio,
            return_timestamps=True,
            generate_kwargs={"language": language.split("-")[0], "task": "transcribe"},
        )
        total = len(audio) / 16_000
        segments = []
        for chunk in out.get("chunks") or [{"timestamp": (0.0, total), "text": out.get("text", "")}]:
            start, end = chunk["timestamp"]
            start = 0.0 if start is None else float(start)
            end = total if end is None else min(float(end), total)
            if chunk["text"].strip() and end > start:
                segments.append(Segment(start, end, chunk["text"].strip()))
        return segments
