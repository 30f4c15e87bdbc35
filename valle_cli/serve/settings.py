"""What a server allows and where it keeps its files.

The server's own folder (`--home`, default ~/.local/share/valle/serve) holds `voices/` (registered reference
clips) and `tmp/` (uploads while they are checked). No request names a file: voices are names, models are the
names the operator gave on the command line, uploads are bytes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

LOOPBACK = ("127.0.0.1", "::1", "localhost")


def default_home() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "valle" / "serve"


@dataclass
class Limits:
    max_text_chars: int = 4096  # OpenAI's limit for /v1/audio/speech input
    max_upload_bytes: int = 25 * 1024 * 1024  # OpenAI's limit for transcription uploads
    max_reference_seconds: float = 60.0  # a voice clip
    max_transcribe_seconds: float = 120.0  # audio sent for transcription
    max_output_seconds: float = 30.0  # per text segment (bounds the AR steps)
    max_json_bytes: int = 1024 * 1024
    queue_size: int = 16  # generation jobs waiting or running; one more gets 429
    max_batch: int = 8  # whole-file speech jobs run together at most (serve/jobs.py)
    timeout_seconds: float = 300.0  # a job not finished by then is cancelled (503)
    max_voices: int = 200


@dataclass
class ServeSettings:
    models: list[str]  # "name=SOURCE" or SOURCE (a run folder, checkpoint, exported file or hub id)
    home: Path = field(default_factory=default_home)
    host: str = "127.0.0.1"
    port: int = 7860
    api_key: str | None = None
    device: str = "cpu"
    dtype: str = "fp32"  # as `valle synth --dtype`: fp32, fp16, bf16, int8, int4
    limits: Limits = field(default_factory=Limits)
    datasets: list[Path] = field(default_factory=list)  # prepared datasets the UI may browse
    ui: bool = True  # the web UI at /ui

    @property
    def loopback(self) -> bool:
        return self.host in LOOPBACK
