"""User-facing errors.

Every failure a user can cause or fix is raised as a `ValleError` (or a subclass): a one-line message saying
what was expected and what was found, plus a remedy saying what to run or change. The CLI edge turns it into
one red line and a non-zero exit; `valle --debug` shows the traceback instead. Engine code raises these and
never prints or exits.
"""

from __future__ import annotations


class ValleError(Exception):
    """A failure with a message for the user and, where one exists, the remedy."""

    exit_code = 1

    def __init__(self, message: str, remedy: str | None = None):
        super().__init__(message)
        self.message = message
        self.remedy = remedy

    def __str__(self) -> str:
        return f"{self.message} ({self.remedy})" if self.remedy else self.message


class ConfigError(ValleError):
    """A configuration file or override is invalid."""

    exit_code = 2


class PluginError(ValleError):
    """A plugin name is unknown or a plugin failed to load."""


class AudioError(ValleError):
    """An audio file is missing, unreadable, empty, silent or too short."""


class TextError(ValleError):
    """Text cannot be phonemized (empty, unknown language, no espeak-ng)."""


class CodecError(ValleError):
    """A codec cannot be built, loaded or used with the given input."""


class DatasetError(ValleError):
    """Input voices or a prepared dataset are missing, malformed, or from an incompatible version."""
