"""The transcriber protocol and how a config picks one.

A transcriber is a `valle.transcribers` plugin: a class whose instances have

    transcribe(wav: np.ndarray (T,) float, sample_rate: int, language: str) -> list[Segment]

where a segment has `start` and `end` (seconds) and `text`. `valle prepare` uses it for audio without a
transcript (and cuts long recordings at segment boundaries); `valle eval` uses it to measure word error rates.
"""

from __future__ import annotations

from typing import Any, Protocol

from valle_cli import plugins
from valle_cli.errors import PluginError, ValleError


class Segment(Protocol):
    start: float
    end: float
    text: str


class Transcriber(Protocol):
    def transcribe(self, wav: Any, sample_rate: int, language: str = "en") -> list[Segment]: ...


def build_transcriber(name: str, **options: Any) -> Transcriber:
    """Instantiate the transcriber plugin `name` (e.g. the config's `data.transcriber`)."""
    cls = plugins.load("transcriber", name)
    try:
        return cls(**options)
    except ValleError:
        raise
    except Exception as exc:
        raise PluginError(
            f"transcriber {name!r} could not start: {type(exc).__name__}: {exc}",
            "check its installation (`valle plugins`) or choose another with --set data.transcriber=NAME",
        ) from exc
