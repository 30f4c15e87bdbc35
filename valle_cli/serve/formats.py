"""Audio out: the response formats of OpenAI's speech endpoint that this machine can encode.

wav (16-bit), flac, mp3 and opus (Ogg) through libsndfile when it has the encoder, and pcm: raw 16-bit
little-endian mono at 24 kHz, as OpenAI sends it. aac has no encoder in libsndfile, so it is not offered.

Streaming (chunks sent as the model speaks each sentence, `StreamEncoder`) works for every format but flac:
- pcm as is; wav with a header whose sizes say "unknown length" (0xFFFFFFFF), as streaming servers do;
- opus: Ogg pages are written in order and never revisited; libsndfile closes a page about once a second of
  audio, so the stream runs up to a second behind the model;
- mp3 at a constant bit rate (80 kbps at 24 kHz; the rate scales with the sample rate), so that a reader which
  cannot see the whole file first (libsndfile, hence Python's soundfile) still gets its length right from the
  size. The LAME tag that tells decoders to trim the encoder's delay and padding is written on closing, over
  bytes already sent, so a streamed mp3 reads back about 80 ms longer than the whole file (silence at its
  ends). mp3 needs soundfile 0.13 or newer (the bit-rate settings).
- flac is sent whole: its header holds the length, and libsndfile cannot read a FLAC stream whose header
  says "unknown".
"""

from __future__ import annotations

import io
import struct

import numpy as np

PCM_RATE = 24000
STREAMABLE = ("pcm", "wav", "mp3", "opus")
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
MP3_SETTINGS = {"compression_level": 0.5, "bitrate_mode": "CONSTANT"}  # 80 kbps at 24 kHz, 64 kbps at 16 kHz


def available() -> list[str]:
    """The formats this libsndfile (and soundfile) can write, plus pcm."""
    import inspect

    import soundfile as sf

    have = sf.available_formats()
    out = [f for f, (container, subtype) in _SOUNDFILE.items() if container in have
           and subtype in sf.available_subtypes(container)]  # fmt: skip
    if "compression_level" not in inspect.signature(sf.SoundFile).parameters:  # soundfile < 0.13
        out = [f for f in out if f != "mp3"]
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
    extra = MP3_SETTINGS if fmt == "mp3" else {}
    sf.write(buf, np.clip(audio, -1.0, 1.0), sr, format=container, subtype=subtype, **extra)
    return buf.getvalue()


class _Sink(io.BytesIO):
    """A file libsndfile writes into while the bytes already taken are on their way to a client: `take()` is
    what was appended since the last call. A write back into bytes already sent (a header fixed up on close)
    changes only the copy kept here."""

    _sent = 0

    def take(self) -> bytes:
        with self.getbuffer() as view:  # released before the next write (a live view blocks resizing)
            data = bytes(view[self._sent :])
        self._sent += len(data)
        return data


class StreamEncoder:
    """The bytes of one streamed response in `fmt` (one of STREAMABLE): `feed(chunk, sr)` for each piece of
    audio as it is made, `close()` once at the end; each returns the bytes ready to send (maybe none)."""

    def __init__(self, fmt: str):
        if fmt not in STREAMABLE:
            raise ValueError(f"{fmt} is not streamed")
        self.fmt = fmt
        self._file = None
        self._sink = _Sink()
        self._sr: int | None = None

    def feed(self, chunk: np.ndarray, sr: int) -> bytes:
        import soundfile as sf

        chunk = np.clip(np.asarray(chunk, dtype=np.float32), -1.0, 1.0)
        if self.fmt == "pcm":
            return pcm16(_resampled(chunk, sr, PCM_RATE))
        head = b""
        if self._sr is None:
            self._sr = sr if self.fmt != "opus" or sr in _OPUS_RATES else 48000
            if self.fmt == "wav":
                head = wav_stream_header(self._sr)
            else:
                container, subtype = _SOUNDFILE[self.fmt]
                extra = MP3_SETTINGS if self.fmt == "mp3" else {}
                self._file = sf.SoundFile(self._sink, "w", samplerate=self._sr, channels=1, format=container,
                                          subtype=subtype, **extra)  # fmt: skip
        chunk = _resampled(chunk, sr, self._sr)
        if self.fmt == "wav":
            return head + pcm16(chunk)
        self._file.write(chunk)
        return self._sink.take()

    def close(self) -> bytes:
        if self._file is None:
            return b""
        self._file.close()
        self._file = None
        return self._sink.take()


def wav_stream_header(sr: int) -> bytes:
    """A 16-bit mono WAV header whose sizes say 'unknown' (streamed: the length is not known yet)."""
    unknown = 0xFFFFFFFF
    return (
        b"RIFF" + struct.pack("<I", unknown) + b"WAVE"
        + b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, sr, sr * 2, 2, 16)
        + b"data" + struct.pack("<I", unknown)
    )  # fmt: skip
