"""Live training commands: one parser, one queue, any number of channels feeding it.

Commands: `save`, `quit`, `lr VALUE`, `eval`, `export` (as in the original), plus `status`, `pause` and
`resume`. Channels (stdin, and the control socket of train/control.py that `valle tui` uses) call `Commands.submit(line)`, which parses and validates the line and
queues a `Command`; the trainer drains the queue between steps and answers each command through its
`reply`. Parsing errors are answered at once and never reach the trainer.
"""

from __future__ import annotations

import queue
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

NAMES = ("save", "quit", "lr", "eval", "export", "status", "pause", "resume")


@dataclass
class Command:
    name: str
    value: float | None = None
    on_reply: Callable[[dict], None] | None = field(default=None, repr=False)

    def reply(self, ok: bool, **payload) -> None:
        if self.on_reply is not None:
            self.on_reply({"ok": ok, "command": self.name, **payload})


def parse(line: str) -> Command:
    """'lr 1e-3' -> Command('lr', 0.001). Raises ValueError with a message naming the valid commands."""
    parts = line.strip().split()
    if not parts:
        raise ValueError("empty command")
    name, args = parts[0].lower(), parts[1:]
    if name not in NAMES:
        raise ValueError(f"unknown command {name!r}; commands: {', '.join(NAMES)}")
    if name == "lr":
        if len(args) != 1:
            raise ValueError("lr takes one value, e.g. `lr 1e-4`")
        try:
            value = float(args[0])
        except ValueError:
            raise ValueError(f"lr value {args[0]!r} is not a number") from None
        if not 0 < value < 10:
            raise ValueError(f"lr value {value:g} is out of range (0, 10)")
        return Command("lr", value)
    if args:
        raise ValueError(f"{name} takes no arguments")
    return Command(name)


class Commands:
    def __init__(self):
        self._queue: queue.Queue[Command] = queue.Queue()

    def submit(self, line: str, on_reply: Callable[[dict], None] | None = None) -> Command | None:
        try:
            cmd = parse(line)
        except ValueError as exc:
            if on_reply:
                on_reply({"ok": False, "error": str(exc)})
            return None
        cmd.on_reply = on_reply
        self._queue.put(cmd)
        return cmd

    def drain(self) -> list[Command]:
        out = []
        while True:
            try:
                out.append(self._queue.get_nowait())
            except queue.Empty:
                return out

    def read_stdin(self, on_reply: Callable[[dict], None]) -> threading.Thread | None:
        """Feed lines typed on stdin into the queue from a daemon thread (not when stdin is closed)."""
        stream = sys.stdin
        if stream is None or stream.closed:
            return None

        def loop() -> None:
            for line in stream:
                if line.strip():
                    self.submit(line, on_reply)

        thread = threading.Thread(target=loop, name="valle-stdin-commands", daemon=True)
        thread.start()
        return thread
