"""Audio out: the response formats of OpenAI's speech endpoint that this machine can encode.

wav (16-bit), flac, mp3 and opus (Ogg) through libsndfile when it has the encoder, and pcm: raw 16-bit
little-endian mono at 24 kHz, as OpenAI sends it. Streaming (chunked as the model speaks) works for pcm and
for wav, whose header then says "unknown length" (0xFFFFFFFF), as streaming servers do.
"""

from __future__ import annotations

import io
import struct

import numpy as np

PCM_RATE = 24000
STREAMABLE = ("pcm", "wav")
CONTENT_TYPES = {
    "wav": "audio/wav",
    "flac": "audio/flac",
    "mp3": "audio/mpeg",
    "opus": "audio/ogg; codecs=opus",
    "pcm": "audio/L16; rate=24000; channels=1",
}
_SOUNDFILE = {"wav": ("WAV", "PCM_16"), "flac": ("FLAC", "PCM_16"), "mp3": ("MP3", "MPEG_LAYER_III"),
              "opus": ("OGG", "OPUS")}  # fmt: skip
_OPUS_RATES = (8000, 12000, 16000, 24000, 48000)


def available() -> list[str]:
    """The formats this libsndfile can write, plus pcm."""
    import soundfile as sf

    have = sf.available_formats()
    out = [f for f, (container, subtype) in _SOUNDFILE.items() if container in have
           and subtype in sf.available_subtypes(container)]  # fmt: skip
    return [*out, "pcm"]


def _resampled(audio: np.ndarray, sr: int, to: int) -> np.ndarray:
    from valle_cli.audio.io import resample

    return audio if sr == to else resample(audio, sr, to)


def pcm16(audio: np.ndarray) -> bytes:
    return (np.clip(audio, -1.0, 1.0) * 32767.0).round().astype("<i2").tobytes()


def encode(audio: np.ndarray, sr: int, fmt: str) -> bytes:
    """A whole waveform (T,) float in [-1, 1] as the bytes of `fmt`."""
    import soundfile as sf

    audio = np.asarray(audio, dtype=np.float32)
    if fmt == "pcm":
        return pcm16(_resampled(audio, sr, PCM_RATE))
    container, subtype = _SOUNDFILE[fmt]
    if fmt == "opus" and sr not in _OPUS_RATES:
        audio, sr = _resampled(audio, sr, 48000), 48000
    buf = io.BytesIO()
    sf.write(buf, np.clip(audio, -1.0, 1.0), sr, format=container, subtype=subtype)
    return buf.getvalue()


def wav_stream_header(sr: int) -> bytes:
    """A 16-bit mono WAV header whose sizes say 'unknown' (streamed: the length is not known yet)."""
    unknown = 0xFFFFFFFF
    return (
        b"RIFF" + struct.pack("<I", unknown) + b"WAVE"
        + b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, sr, sr * 2, 2, 16)
        + b"data" + struct.pack("<I", unknown)
    )  # fmt: skip
