"""The models a server may serve: the ones its operator named on the command line, by id. A request's
`model` picks one of them by id (or an OpenAI model name, which means the default); it never names a path.
One model is resident at a time (loading another unloads it), loaded on the generation worker."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from valle_cli.errors import ValleError

OPENAI_NAMES = (
    "tts-1",
    "tts-1-hd",
    "gpt-4o-mini-tts",
    "whisper-1",
    "gpt-4o-transcribe",
    "gpt-4o-mini-transcribe",
)


log = logging.getLogger("valle.serve")


class UnknownModel(ValleError):
    pass


class ModelUnavailable(ValleError):
    """A served model that cannot be loaded: the operator's problem, told to clients by its served id only."""

    status = 503


@dataclass
class Entry:
    id: str
    source: str


def parse_models(specs: list[str]) -> list[Entry]:
    """["small=runs/small", "owner/name"] -> entries; ids are unique."""
    out: list[Entry] = []
    for spec in specs:
        name, sep, source = spec.partition("=")
        if not sep:
            source = spec
            p = Path(spec)
            name = spec if not p.exists() else (p.stem if p.is_file() else p.name)
        if not name or not source:
            raise ValleError(f"--model {spec!r}: expected NAME=SOURCE or SOURCE")
        if any(e.id == name for e in out):
            raise ValleError(f"two models are called {name!r}", "name them: --model NAME=SOURCE")
        out.append(Entry(name, source))
    if not out:
        raise ValleError("no model to serve", "give --model RUN_DIR|FILE|HUB_ID (repeatable)")
    return out


class Registry:
    def __init__(self, entries: list[Entry], device: str = "cpu", dtype: str = "fp32"):
        self.entries = {e.id: e for e in entries}
        self.default = entries[0].id
        self.device, self.dtype = device, dtype
        self._loaded: tuple[str, object] | None = None
        self._lock = threading.Lock()

    def resolve(self, model: str | None) -> str:
        """A request's model field -> a served id (None or an OpenAI name: the default)."""
        if model is None or model == "" or model in OPENAI_NAMES:
            return self.default
        if model not in self.entries:
            raise UnknownModel(
                f"model {model!r} is not served here",
                f"use one of: {', '.join(self.entries)} (GET /v1/models)",
            )
        return model

    def set_default(self, model: str) -> None:
        self.default = self.resolve(model)

    @property
    def loaded_id(self) -> str | None:
        return self._loaded[0] if self._loaded else None

    def get(self, model_id: str):
        """The loaded model (`infer.load.Loaded`) for a served id, loading it (and unloading another)."""
        import gc

        from valle_cli.infer.load import load_model

        with self._lock:
            if self._loaded and self._loaded[0] == model_id:
                return self._loaded[1]
            self._loaded = None
            gc.collect()
            source = self.entries[model_id].source
            try:
                loaded = load_model(source, self.device)
            except (
                ValleError
            ) as exc:  # the message names a path on this machine: the log gets it, not clients
                log.error("cannot load model %r from %s: %s", model_id, source, exc)
                raise ModelUnavailable(
                    f"model {model_id!r} cannot be loaded on this server",
                    "its operator can read why in the log",
                ) from None
            from valle_cli.model.quant import set_dtype

            set_dtype(loaded.model, self.dtype)
            self._loaded = (model_id, loaded)
            return loaded
