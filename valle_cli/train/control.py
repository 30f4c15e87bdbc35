"""The training control channel: a Unix socket that only the run's owner can reach, speaking versioned JSON.

Where: `RUN/control.sock` (or, when that path is too long for a Unix socket, a private 0700 folder under the
temp dir), announced in `RUN/control.json` (`{"protocol": 1, "socket": PATH, "pid": PID}`, mode 0600). The
socket is created with mode 0600 and every connection's peer credentials (SO_PEERCRED) must be this user's, so
nobody else on the machine can steer the run. A second `valle train` on the same run folder finds the live
socket and stops with a clear error; a stale one left by a killed run is replaced.

Protocol 1, newline-delimited JSON, UTF-8, one object per line (at most 64 KiB):

    server, on connect:  {"v": 1, "type": "hello", "run": "...", "pid": 123, "commands": [...]}
    client request:      {"v": 1, "id": 7, "cmd": "lr", "value": 0.0003}
    server reply:        {"v": 1, "id": 7, "ok": true, "command": "lr", ...}
                         {"v": 1, "id": 7, "ok": false, "error": "lr value 'abc' is not a number"}

Commands: status, save, quit, lr VALUE, eval, export, pause, resume (train/commands.py parses and validates
them: the same handler serves stdin). Replies come when the trainer has applied the command, between steps.
Malformed JSON, a missing or unknown `cmd`, a wrong `v` or an oversized line get an error reply; a client that
disconnects, even mid-line, only ends its own connection. Replies never block the trainer: each client has
its own queue, written by its own thread; a client that lets MAX_QUEUED replies pile up unread is dropped.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import socket
import stat
import struct
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

from valle_cli.errors import ValleError
from valle_cli.train.commands import NAMES, Commands

PROTOCOL = 1
MAX_LINE = 64 * 1024
MAX_QUEUED = 256  # unread replies per client before it is dropped
_SUN_PATH_MAX = 100  # sockaddr_un holds 108 bytes; keep a margin


class ControlError(ValleError):
    pass


def socket_path_for(run: Path) -> tuple[Path, Path | None]:
    """(socket path, private folder made for it or None)."""
    inside = run.resolve() / "control.sock"
    if len(os.fsencode(inside)) <= _SUN_PATH_MAX:
        return inside, None
    folder = Path(tempfile.mkdtemp(prefix="valle-control-"))  # 0700
    return folder / "control.sock", folder


def _ours(path: Path, run: Path) -> bool:
    """Whether `path` (read from a run's control.json) can be a socket this run made: a socket, not a link,
    owned by this user, at RUN/control.sock or in a private valle-control-* folder of the temp dir."""
    try:
        st = path.lstat()
    except OSError:
        return False
    if not stat.S_ISSOCK(st.st_mode) or st.st_uid != os.getuid() or path.name != "control.sock":
        return False
    if path.parent == run.resolve():
        return True
    temp = Path(tempfile.gettempdir()).resolve()
    if not (path.parent.parent == temp and path.parent.name.startswith("valle-control-")):
        return False
    try:  # the private folder mkdtemp made: a real folder (not a link to one elsewhere), ours, 0700
        folder = path.parent.lstat()
    except OSError:
        return False
    return stat.S_ISDIR(folder.st_mode) and folder.st_uid == os.getuid() and not folder.st_mode & 0o077


def _alive(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


def _peer_uid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


def to_line(request: dict) -> str:
    """A protocol request -> the command line `Commands` parses. Raises ValueError with the reason."""
    if request.get("v", PROTOCOL) != PROTOCOL:
        raise ValueError(
            f"protocol version {request.get('v')!r} is not supported; this trainer speaks {PROTOCOL}"
        )
    cmd = request.get("cmd")
    if not isinstance(cmd, str) or not cmd:
        raise ValueError(f"a request needs a 'cmd' (one of: {', '.join(NAMES)})")
    value = request.get("value")
    return cmd if value is None else f"{cmd} {value}"


class ControlServer:
    """Serves the control socket of one run from daemon threads; `close()` removes it."""

    def __init__(self, run: Path, commands: Commands, claimed: Callable[[], object] | None = None):
        """`claimed` runs once no other live trainer serves the run, before control.json is written."""
        self.run, self.commands = Path(run), commands
        self.info_path = self.run / "control.json"
        self.path, self._private = self._claim()
        if claimed is not None:
            claimed()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._closed = threading.Event()
        from valle_cli.fsutil import atomic_path

        try:
            old = os.umask(0o177)  # the socket is born 0600: no window where others could connect
            try:
                self.sock.bind(str(self.path))
            finally:
                os.umask(old)
            os.chmod(self.path, 0o600)
            self.sock.listen(8)
            self.sock.settimeout(0.2)
            info = {"protocol": PROTOCOL, "socket": str(self.path), "pid": os.getpid()}
            with atomic_path(self.info_path, ControlError) as tmp:
                Path(tmp).write_text(json.dumps(info))
                os.chmod(tmp, 0o600)
        except BaseException:  # (a full disk): no socket or private folder left behind that nothing serves
            self.sock.close()
            with contextlib.suppress(OSError):
                if stat.S_ISSOCK(self.path.lstat().st_mode):
                    self.path.unlink()
            if self._private is not None:
                with contextlib.suppress(OSError):
                    self._private.rmdir()
            raise
        self._thread = threading.Thread(target=self._accept, name="valle-control", daemon=True)
        self._thread.start()

    def _claim(self) -> tuple[Path, Path | None]:
        """A socket path for this run, refusing if a live trainer already serves it."""
        self.run.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(OSError, ValueError, KeyError):
            old = Path(json.loads(self.info_path.read_text())["socket"])
            if old.exists() and _alive(old):
                raise ControlError(
                    f"another valle train is already running on {self.run}",
                    "stop it first (`quit` in its terminal or `valle tui`), or use another run folder",
                )
            if _ours(old, self.run):  # left by a killed run; never trust a path read from disk
                old.unlink(missing_ok=True)
                if old.parent != self.run.resolve():
                    with contextlib.suppress(OSError):
                        old.parent.rmdir()  # its private folder
        path, private = socket_path_for(self.run)
        with contextlib.suppress(FileNotFoundError):
            mode = path.lstat().st_mode
            if path.exists() and _alive(path):
                raise ControlError(f"another valle train is already running on {self.run}", "stop it first")
            if not stat.S_ISSOCK(mode):  # never remove what valle did not make (a link included)
                kind = "a link" if stat.S_ISLNK(mode) else "not a socket"
                raise ControlError(
                    f"{path} is in the way of the run's control socket ({kind})",
                    "move or rename it, then start again",
                )
            path.unlink()  # a dead socket (a killed run)
        return path, private

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), name="valle-control-conn", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        out: queue.Queue[bytes | None] = queue.Queue(MAX_QUEUED)
        gone = threading.Event()

        def send(obj: dict) -> None:  # called from the training loop too: must never block
            if gone.is_set():
                return
            try:
                out.put_nowait((json.dumps({"v": PROTOCOL, **obj}) + "\n").encode())
            except queue.Full:  # the client does not read its replies: drop it, not the training's pace
                gone.set()
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)

        def write() -> None:
            while not (gone.is_set() or self._closed.is_set()):
                try:
                    data = out.get(timeout=0.5)
                except queue.Empty:
                    continue
                if data is None:
                    return
                view = memoryview(data)
                while view and not (gone.is_set() or self._closed.is_set()):
                    try:
                        view = view[conn.send(view) :]
                    except TimeoutError:
                        continue
                    except OSError:
                        gone.set()
                        return

        with conn:
            try:
                if _peer_uid(conn) != os.getuid():
                    conn.sendall(
                        b'{"v": 1, "ok": false, "error": "permission denied: this run belongs to another user"}\n'
                    )
                    return
            except OSError:
                return
            conn.settimeout(0.5)
            writer = threading.Thread(target=write, name="valle-control-write", daemon=True)
            writer.start()
            send({"type": "hello", "run": str(self.run), "pid": os.getpid(), "commands": list(NAMES)})
            buffer = b""
            try:
                while not (self._closed.is_set() or gone.is_set()):
                    try:
                        chunk = conn.recv(65536)
                    except TimeoutError:
                        continue
                    except OSError:
                        return
                    if not chunk:
                        return  # the client left (a partial line is dropped)
                    buffer += chunk
                    while b"\n" in buffer:
                        line, buffer = buffer.split(b"\n", 1)
                        if len(line) > MAX_LINE:
                            send({"ok": False, "error": f"request longer than {MAX_LINE} bytes; closing"})
                            return
                        if line.strip():
                            self._handle(line, send)
                    if len(buffer) > MAX_LINE:
                        send({"ok": False, "error": f"request longer than {MAX_LINE} bytes; closing"})
                        return
            finally:
                with contextlib.suppress(queue.Full):
                    out.put_nowait(
                        None
                    )  # the writer sends what is queued (a final error included), then ends
                writer.join(timeout=2.0)
                gone.set()

    def _handle(self, raw: bytes, send) -> None:
        try:
            request = json.loads(raw.decode("utf-8"))
            if not isinstance(request, dict):
                raise ValueError("a request must be a JSON object")
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            if isinstance(exc, RecursionError):
                reason = "nested too deeply"
            else:
                reason = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
            send({"ok": False, "error": f"malformed request: {reason}"})
            return
        rid = request.get("id")
        try:
            line = to_line(request)
        except ValueError as exc:
            send({"id": rid, "ok": False, "error": str(exc)})
            return
        self.commands.submit(line, lambda reply: send({"id": rid, **reply}))

    def close(self) -> None:
        self._closed.set()
        with contextlib.suppress(OSError):
            self.sock.close()
        self.path.unlink(missing_ok=True)
        if self._private is not None:
            with contextlib.suppress(OSError):
                self._private.rmdir()
        with contextlib.suppress(OSError, ValueError, KeyError):
            if json.loads(self.info_path.read_text()).get("pid") == os.getpid():
                self.info_path.unlink()

    def __enter__(self) -> ControlServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ControlClient:
    """Talks to a run's control socket (the TUI, tests, scripts). `connect=False` leaves the connection to
    `connect()`, so another thread can `abort()` it even while it waits for the hello line."""

    def __init__(self, run: Path, timeout: float = 10.0, connect: bool = True):
        self.run = Path(run)
        try:
            self.info = json.loads((self.run / "control.json").read_text())
        except (OSError, ValueError):
            raise ControlError(
                f"{self.run} has no running training to talk to (no control.json)",
                "start it with `valle train` (or `valle tui CONFIG`); a finished run can only be viewed",
            ) from None
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self._file = None
        self._next = 0
        self.hello: dict = {}
        if connect:
            self.connect()

    def connect(self) -> None:
        try:
            self.sock.connect(self.info["socket"])
        except PermissionError:
            self.close()
            raise ControlError(
                f"permission denied on {self.info['socket']}", "run as the user who started training"
            ) from None
        except (OSError, KeyError, TypeError):
            self.close()
            raise ControlError(
                f"the training of {self.run} is not running any more",
                "restart it with the same command to resume",
            ) from None
        self._file = self.sock.makefile("rb")
        try:
            self.hello = self._read()
        except BaseException:
            self.close()
            raise
        if self.hello.get("v") != PROTOCOL:
            self.close()
            raise ControlError(
                f"the trainer speaks protocol {self.hello.get('v')}; this valle speaks {PROTOCOL}"
            )

    def abort(self) -> None:
        """Unblock whatever thread waits on this connection (it then fails and closes it); thread-safe."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def _read(self) -> dict:
        line = self._file.readline()
        if not line:
            raise ControlError("the trainer closed the connection")
        return json.loads(line)

    def request(self, cmd: str, value: float | None = None) -> dict:
        """Send one command and wait for its reply (commands are applied between training steps)."""
        self._next += 1
        req = {"v": PROTOCOL, "id": self._next, "cmd": cmd}
        if value is not None:
            req["value"] = value
        self.sock.sendall((json.dumps(req) + "\n").encode())
        while True:
            reply = self._read()
            if reply.get("id") == self._next or reply.get("id") is None:
                return reply

    def close(self) -> None:
        with contextlib.suppress(OSError):
            if self._file is not None:
                self._file.close()
        with contextlib.suppress(OSError):
            self.sock.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
