"""Reference voices registered on the server, by name: `voices/NAME.wav` (mono, 24 kHz) + `voices/NAME.json`
(transcript, duration, when). Names are 1-64 letters, digits, `_` or `-`: never a path. Uploads are decoded
and checked (a real audio file, not silent, not too long) before anything is kept, and written atomically."""

from __future__ import annotations

import contextlib
import json
import logging
import re
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from valle_cli.errors import AudioError, ValleError

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")  # starts with a letter or digit: never an option (-rf)
# names Windows cannot create (a voices folder may be shared or copied there)
RESERVED = {"con", "prn", "aux", "nul", *(f"{p}{i}" for p in ("com", "lpt") for i in range(10))}
RANDOM = "random"  # not a stored voice: no reference at all (a random voice)
SAMPLE_RATE = 24000
MIN_SECONDS = 1.0

log = logging.getLogger("valle.serve")


class VoiceError(ValleError):
    """status: the HTTP status the API answers with."""

    def __init__(self, message: str, remedy: str | None = None, status: int = 400):
        super().__init__(message, remedy)
        self.status = status


@dataclass
class Voice:
    name: str
    seconds: float
    transcript: str | None
    created: float


STORED = re.compile(
    r"[A-Za-z0-9_-]{1,64}"
)  # what earlier versions accepted: still listed, used and deletable


def valid_name(name: object) -> bool:
    return isinstance(name, str) and bool(NAME.fullmatch(name)) and name.lower() not in RESERVED


def stored_name(name: object) -> bool:
    """A name a voice on disk may have (new names must also pass `valid_name`); never a path."""
    return isinstance(name, str) and bool(STORED.fullmatch(name))


def check_name(name: str, new: bool = False) -> str:
    if not (valid_name(name) if new else stored_name(name)):
        raise VoiceError(
            f"invalid voice name {name!r}",
            "use 1-64 letters, digits, '_' or '-', starting with a letter or digit, and not a name Windows "
            "reserves (CON, NUL, COM1...); voices are names, never paths",
        )
    if name == RANDOM:
        raise VoiceError(
            f"'{RANDOM}' is reserved (it means no reference: a random voice)", "pick another name"
        )
    return name


class VoiceStore:
    def __init__(self, folder: Path, tmp: Path, max_seconds: float, max_voices: int):
        self.folder, self.tmp = Path(folder), Path(tmp)
        self.max_seconds, self.max_voices = max_seconds, max_voices
        self.folder.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def _paths(self, name: str) -> tuple[Path, Path]:
        return self.folder / f"{name}.wav", self.folder / f"{name}.json"

    def list(self) -> list[Voice]:
        out = []
        for meta in sorted(self.folder.glob("*.json")):
            with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
                data = json.loads(meta.read_text())
                if stored_name(meta.stem) and (self.folder / f"{meta.stem}.wav").is_file():
                    out.append(Voice(meta.stem, data["seconds"], data.get("transcript"), data["created"]))
        return out

    def get(self, name: str) -> Voice:
        check_name(name)
        for voice in self.list():
            if voice.name == name:
                return voice
        known = ", ".join(v.name for v in self.list()) or "none yet"
        raise VoiceError(
            f"no voice named {name!r} (registered: {known})",
            f"upload one with POST /v1/voices, or use '{RANDOM}' for a random voice",
            status=404,
        )

    def audio_path(self, name: str) -> Path:
        """The clip of a registered voice (for the synthesizer; never exposed to clients)."""
        self.get(name)
        return self._paths(name)[0]

    def add(self, name: str, data: bytes, transcript: str | None = None, replace: bool = False) -> Voice:
        from valle_cli.audio.io import audio_seconds, load_audio, save_audio
        from valle_cli.fsutil import atomic_path

        check_name(name, new=True)
        if transcript is not None and not transcript.strip():
            transcript = None
        upload = self.tmp / f"upload-{uuid.uuid4().hex}"
        try:
            try:
                upload.write_bytes(data)
            except OSError as exc:
                raise self._not_stored("the uploaded clip", exc) from None
            try:
                seconds = audio_seconds(upload)  # from the header: a long clip is refused before decoding
                if seconds > self.max_seconds:
                    raise VoiceError(
                        f"the clip is {seconds:.1f} s long; this server takes at most {self.max_seconds:g} s",
                        "trim it (3-10 s of clean speech is best)",
                        status=413,
                    )
                wav = load_audio(upload, SAMPLE_RATE, min_duration=MIN_SECONDS)
            except AudioError as exc:
                raise VoiceError(exc.message.replace(str(upload), "the uploaded file"), exc.remedy) from None
        finally:
            upload.unlink(missing_ok=True)
        seconds = len(wav) / SAMPLE_RATE
        wav_path, meta_path = self._paths(name)
        with self._lock:
            exists = meta_path.exists()
            if exists and not replace:
                raise VoiceError(
                    f"a voice named {name!r} exists", "delete it first or pick another name", 409
                )
            if not exists and len(self.list()) >= self.max_voices:
                raise VoiceError(
                    f"this server holds at most {self.max_voices} voices", "delete some first", 507
                )
            voice = Voice(name, round(seconds, 3), transcript, time.time())
            try:  # both writes are atomic: a failure leaves the old files or none
                save_audio(wav_path, wav, SAMPLE_RATE)
                with atomic_path(meta_path, VoiceError) as tmp:
                    Path(tmp).write_text(json.dumps(asdict(voice)))
            except (AudioError, VoiceError) as exc:
                if not exists:
                    wav_path.unlink(missing_ok=True)
                raise self._not_stored(f"voice {name!r}", exc) from None
        return voice

    def _not_stored(self, what: str, exc: Exception) -> VoiceError:
        """A failed write (a full disk, most likely): the operator's log gets the path and the reason, the
        client a 507 that names neither."""
        log.error("could not store %s: %s", what, getattr(exc, "message", None) or exc)
        return VoiceError(
            f"the server could not store {what}: its disk is full or cannot be written",
            "retry later; the server's operator can read why in its log",
            status=507,
        )

    def delete(self, name: str) -> None:
        self.get(name)
        with self._lock:
            for path in self._paths(name):
                path.unlink(missing_ok=True)
