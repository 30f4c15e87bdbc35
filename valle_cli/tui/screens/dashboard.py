"""The control room: curves, numbers, log, checkpoints, and the commands (keys and buttons).

Two background threads feed it with typed messages (messages.py): one reads the run folder every half second
(new metrics records, log lines, checkpoints; whether a training it started has ended), one asks the trainer
for its status every second over the control socket. Commands go out from short-lived worker threads, each
on its own connection, and their replies come back as `CommandDone`. The UI thread never blocks on I/O.
"""

from __future__ import annotations

import subprocess
import threading
import time
from typing import ClassVar

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.widgets import Button, Header, RichLog, Static
from textual.worker import get_current_worker

from valle_cli.train.control import ControlClient, ControlError
from valle_cli.tui.messages import ChildExited, CommandDone, RunChanged, TrainerStatus
from valle_cli.tui.screens.dialogs import ChoiceDialog, LrDialog
from valle_cli.tui.source import OUTPUT_NAME, History, RunFiles, Target, tail
from valle_cli.tui.widgets import CheckpointList, Curves, Stats

FILES_EVERY = 0.5  # seconds between reads of the run folder
STATUS_EVERY = 1.0  # seconds between status requests
STATUS_TIMEOUT = 5.0  # no status reply within this: the trainer is busy (a long step, eval or save)
COMMAND_TIMEOUT = 3600.0  # an eval or export on a big model can take long; leaving the TUI closes the socket
REDRAW_EVERY = 0.5


class Dashboard(Screen):
    CSS_PATH = "dashboard.tcss"
    AUTO_FOCUS = None  # keys go to the bindings; a focused button would take Enter
    BINDINGS: ClassVar = [
        Binding("s", "command('save')", "Save"),
        Binding("e", "command('eval')", "Eval"),
        Binding("x", "command('export')", "Export"),
        Binding("l", "lr", "Set lr"),
        Binding("p", "pause", "Pause/resume"),
        Binding("k", "stop", "Stop training"),
        Binding("c", "chart", "Loss/acc"),
        Binding("q", "leave", "Leave"),
    ]

    def __init__(self, target: Target, child: subprocess.Popen | None = None):
        super().__init__()
        self.target, self.child = target, child
        self.history = History()
        self.status: dict | None = None  # the last status reply; None when no trainer answers
        self.busy = False  # connected, but the last status request was not answered in time
        self.total_steps: int | None = None
        self.child_code: int | None = None
        self.stopping = False
        self._leave_after_quit = False
        self._dirty = True
        self._clients: set[ControlClient] = set()
        self._clients_lock = threading.Lock()
        self.checkpoints: list = []
        self._want_paused: bool | None = None  # a pause/resume sent, not yet seen in a status reply
        self._stop = threading.Event()  # set when the screen goes: the polling threads end at once

    # -- layout ------------------------------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(id="top"):
            with Vertical(id="side"):
                yield Stats(id="stats")
            with Vertical(id="chart"):
                yield Curves(self.history, id="curves")
                yield Static(id="legend")
        with Horizontal(id="bottom"):
            yield RichLog(id="log", max_lines=1000, markup=False, wrap=True, min_width=1)
            yield CheckpointList(id="checkpoints")
        with Horizontal(id="actions"):
            for label, action in (
                ("Save s", "command('save')"),
                ("Eval e", "command('eval')"),
                ("Export x", "command('export')"),
                ("lr l", "lr"),
                ("Pause p", "pause"),
                ("Stop k", "stop"),
                ("Chart c", "chart"),
                ("Leave q", "leave"),
            ):
                ident = action.split("'")[1] if "'" in action else action
                yield Button(label, id=f"do-{ident}", action=f"screen.{action}", compact=True)

    def on_mount(self) -> None:
        self.app.sub_title = str(self.target.run)
        self.query_one("#side").border_title = "run"
        self.query_one("#bottom #log").border_title = "log"
        self.query_one("#checkpoints").border_title = "checkpoints, age"
        self._set_chart_title()
        if self.child is not None:
            self.write_log(f"started valle train (pid {self.child.pid}); its output: {OUTPUT_NAME}")
        self.watch_files()
        self.watch_status()
        self.set_interval(REDRAW_EVERY, self._redraw)
        self._redraw()

    def on_unmount(self) -> None:
        self._stop.set()
        self.workers.cancel_node(self)
        with self._clients_lock:
            for client in list(self._clients):
                client.abort()  # the worker waiting on it fails at once and closes it; no wait here

    # -- state -------------------------------------------------------------------------------------------------

    @property
    def live(self) -> bool:
        """A trainer answers (or is connected but busy) on the control socket."""
        return self.status is not None or self.busy

    @property
    def child_running(self) -> bool:
        """The training this TUI started has not exited (it may not serve its socket yet)."""
        return self.child is not None and self.child_code is None and self.child.poll() is None

    @property
    def state(self) -> str:
        if self.status is not None:
            return "stopping" if self.stopping else ("paused" if self.status.get("paused") else "running")
        if self.busy:
            return "busy"
        if self.child_running:
            return "stopping" if self.stopping else "starting"
        if self.child_code not in (None, 0):
            return f"exited ({self.child_code})"
        last = self.history.last.get("step", 0)
        if self.total_steps and last >= self.total_steps:
            return "finished"
        return "not running" if self.history.train else "no data yet"

    def _set_chart_title(self) -> None:
        self.query_one("#chart").border_title = self.query_one(Curves).title()
        self.query_one("#chart").border_subtitle = "c: loss/acc"

    def _redraw(self) -> None:
        stats = self.query_one(Stats)
        stats.show(self.state, self.history, self.total_steps, self.status)
        self.query_one(CheckpointList).show(self.checkpoints)  # also keeps the ages current
        if self._dirty:
            self._dirty = False
            curves = self.query_one(Curves)
            curves.refresh()
            self.query_one("#legend", Static).update(curves.legend())
        pause = self.query_one("#do-pause", Button)
        pause.label = "Resume p" if self.state == "paused" else "Pause p"

    def write_log(self, line: str, style: str | None = None) -> None:
        self.query_one("#log", RichLog).write(Text(line, style=style or ""))

    # -- messages from the workers -----------------------------------------------------------------------------

    @on(RunChanged)
    def run_changed(self, message: RunChanged) -> None:
        if message.records:
            self.history.add(message.records)
            self._dirty = True
        today = time.strftime("%Y-%m-%d ")
        for line in message.log:
            line = line.removeprefix(today)  # train.log stamps date and time; today's date is noise here
            self.write_log(line, "yellow" if " warning: " in line else None)
        if message.checkpoints is not None:
            self.checkpoints = message.checkpoints
        self.total_steps = message.total_steps

    @on(TrainerStatus)
    def trainer_status(self, message: TrainerStatus) -> None:
        was_live = self.live
        self.status, self.busy = message.status, message.busy
        if self.status is not None and self._want_paused == self.status.get("paused"):
            self._want_paused = None
        if was_live and not self.live:
            self.stopping = False
            self._want_paused = None
            self.write_log("training is not running any more", "bold")
        self._redraw()

    @on(CommandDone)
    def command_done(self, message: CommandDone) -> None:
        reply = message.reply
        if reply.get("ok"):
            self.write_log(f"> {message.text}: done", "green")
        else:
            error = reply.get("error", "no reply")
            self.write_log(f"> {message.text}: {error}", "red")
            self.notify(error, title=f"{message.text} failed", severity="error")
        if message.command == "quit":
            if not reply.get("ok"):
                self.stopping = self._leave_after_quit = False
            elif self._leave_after_quit:
                self.app.exit("stopped")

    @on(ChildExited)
    def child_exited(self, message: ChildExited) -> None:
        self.child_code = message.code
        if message.code != 0:
            self.write_log(f"training exited with code {message.code}; the end of {OUTPUT_NAME}:", "bold red")
            for line in message.output:
                self.write_log("  " + line, "red")
            self.notify(f"see {self.target.run / OUTPUT_NAME}", title="training failed", severity="error")
        self._redraw()

    # -- workers -----------------------------------------------------------------------------------------------

    @work(thread=True, exclusive=True, group="files")
    def watch_files(self) -> None:
        worker = get_current_worker()
        files = RunFiles(self.target.run)
        total = None
        reported_exit = False
        while not worker.is_cancelled and not self._stop.is_set():
            records, log, checkpoints = (
                files.new_records(),
                files.new_log_lines(),
                files.checkpoints_if_changed(),
            )
            new_total = files.read_total_steps()
            if records or log or checkpoints is not None or new_total != total:
                total = new_total
                self.post_message(RunChanged(records, log, checkpoints, total))
            if self.child is not None and not reported_exit and self.child.poll() is not None:
                reported_exit = True
                self.post_message(ChildExited(self.child.returncode, tail(self.target.run / OUTPUT_NAME)))
            self._stop.wait(FILES_EVERY)

    def _open(self, timeout: float) -> ControlClient:
        client = ControlClient(self.target.run, timeout=timeout, connect=False)
        with self._clients_lock:
            self._clients.add(client)  # from now on, leaving can abort it (even while it waits for hello)
        try:
            client.connect()
        except BaseException:
            self._close(client)
            raise
        return client

    def _close(self, client: ControlClient) -> None:
        with self._clients_lock:
            self._clients.discard(client)
        client.close()

    @work(thread=True, exclusive=True, group="status")
    def watch_status(self) -> None:
        worker = get_current_worker()
        client = None
        while not worker.is_cancelled and not self._stop.is_set():
            try:
                if client is None:
                    client = self._open(STATUS_TIMEOUT)
                reply = client.request("status")
                self.post_message(TrainerStatus(reply if reply.get("ok") else None))
            except TimeoutError:
                if client is not None:
                    self._close(client)
                    client = None
                self.post_message(TrainerStatus(None, busy=True))
            except (ControlError, OSError, ValueError):
                if client is not None:
                    self._close(client)
                    client = None
                self.post_message(TrainerStatus(None))
            self._stop.wait(STATUS_EVERY)
        if client is not None:
            self._close(client)

    @work(thread=True, group="commands")
    def send(self, command: str, value: float | None = None) -> None:
        client = None
        try:
            client = self._open(COMMAND_TIMEOUT)
            reply = client.request(command, value)
        except ControlError as exc:
            reply = {"ok": False, "error": exc.message}
        except TimeoutError:
            reply = {
                "ok": False,
                "error": f"no reply within {COMMAND_TIMEOUT:g} s; the trainer may still apply it",
            }
        except (OSError, ValueError) as exc:
            reply = {"ok": False, "error": f"no reply from the trainer ({exc})"}
        finally:
            if client is not None:
                self._close(client)
        text = command if value is None else f"{command} {value:g}"
        self.post_message(CommandDone(command, text, reply))

    # -- actions -----------------------------------------------------------------------------------------------

    def _require_live(self, what: str) -> bool:
        if self.live:
            return True
        self.write_log(f"cannot {what}: training is {self.state}", "yellow")
        self.notify(
            f"training is {self.state}: this run can only be viewed",
            title=f"cannot {what}",
            severity="warning",
        )
        return False

    def action_command(self, command: str) -> None:
        if self._require_live(command):
            self.write_log(f"> {command}")
            self.send(command)

    def action_lr(self) -> None:
        if not self._require_live("set lr"):
            return
        current = (self.status or {}).get("lr", self.history.last.get("lr"))

        def chosen(value: float | None) -> None:
            if value is not None:
                self.write_log(f"> lr {value:g}")
                self.send("lr", value)

        self.app.push_screen(LrDialog(current), chosen)

    def action_pause(self) -> None:
        if self._require_live("pause"):
            paused = self._want_paused if self._want_paused is not None else self.state == "paused"
            self._want_paused = not paused
            self.action_command("resume" if paused else "pause")

    def action_stop(self) -> None:
        if not self.live and not self.child_running:
            self._require_live("stop")
            return

        def chosen(choice: str | None) -> None:
            if choice == "stop":
                self._quit_training()

        self.app.push_screen(
            ChoiceDialog(
                "Stop training?",
                "It saves a checkpoint at the end of the current step and exits; rerun the same "
                "command to resume.",
                [("stop", "Stop training", "error"), ("cancel", "Cancel", "default")],
            ),
            chosen,
        )

    def _quit_training(self) -> None:
        self.stopping = True
        if not self.live and self.child_running:  # still starting: no socket yet, so a signal
            self.write_log(f"> stop: SIGTERM to pid {self.child.pid}")
            self.child.terminate()
            if self._leave_after_quit:
                self.app.exit("stopped")
            return
        self.write_log("> quit")
        self.send("quit")

    def action_chart(self) -> None:
        self.query_one(Curves).cycle()
        self._set_chart_title()
        self._dirty = True
        self._redraw()

    def action_leave(self) -> None:
        if not self.live and not self.child_running:
            self.app.exit(None)
            return

        def chosen(choice: str | None) -> None:
            if choice == "leave":
                self.app.exit("left")  # the CLI says how to come back
            elif choice == "stop":
                self._leave_after_quit = True
                self._quit_training()

        self.app.push_screen(
            ChoiceDialog(
                "Leave the control room?",
                "Training keeps running in the background; `valle tui RUN_DIR` comes back to it. "
                "Or stop it (it saves first).",
                [
                    ("leave", "Leave", "primary"),
                    ("stop", "Stop and leave", "error"),
                    ("cancel", "Cancel", "default"),
                ],
                on_q="leave",  # q q leaves
            ),
            chosen,
        )
