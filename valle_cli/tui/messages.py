"""Typed messages that the dashboard's background workers post to the UI thread."""

from __future__ import annotations

from textual.message import Message

from valle_cli.tui.source import Checkpoint


class RunChanged(Message):
    """Whatever appeared in the run folder since the last poll."""

    def __init__(
        self,
        records: list[dict],
        log: list[str],
        checkpoints: list[Checkpoint] | None,
        total_steps: int | None,
    ):
        super().__init__()
        self.records, self.log, self.checkpoints, self.total_steps = records, log, checkpoints, total_steps


class TrainerStatus(Message):
    """The trainer's `status` reply, or None when no trainer answers: `busy` when one is connected but did
    not answer in time (a long step, eval or save), otherwise none serves the run (finished, killed, not
    started yet)."""

    def __init__(self, status: dict | None, busy: bool = False):
        super().__init__()
        self.status, self.busy = status, busy


class CommandDone(Message):
    """The reply to a command sent from the UI ({"ok": False, "error": ...} when it could not be sent);
    `text` is the command as typed (`lr 0.0003`)."""

    def __init__(self, command: str, text: str, reply: dict):
        super().__init__()
        self.command, self.text, self.reply = command, text, reply


class ChildExited(Message):
    """The training the TUI started has ended; `output` is the end of RUN/train.out."""

    def __init__(self, code: int, output: list[str]):
        super().__init__()
        self.code, self.output = code, output
