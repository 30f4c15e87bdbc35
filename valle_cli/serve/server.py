"""Running the server: the pieces wired together, uvicorn on the chosen address, and a clean stop."""

from __future__ import annotations

import asyncio
import logging
import shutil
import socket

from valle_cli.codecs.base import resolve_device
from valle_cli.serve.api import create_app
from valle_cli.serve.jobs import JobQueue
from valle_cli.serve.models import Registry, parse_models
from valle_cli.serve.settings import ServeSettings
from valle_cli.serve.voices import VoiceStore


def build(settings: ServeSettings):
    """(ASGI app, registry, queue) for the settings; folders are created 0700 (they hold users' voices)."""
    home = settings.home
    for sub in ("", "voices", "tmp"):
        (home / sub).mkdir(parents=True, exist_ok=True, mode=0o700)
    for stale in (home / "tmp").iterdir():  # uploads left by a killed server (and the UI's upload cache)
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
    registry = Registry(parse_models(settings.models), settings.device, settings.dtype)
    before_job = None
    if str(resolve_device(settings.device)) == "cpu":
        from valle_cli import threads

        before_job = threads.per_job  # the cores free now, read before every job
    queue = JobQueue(settings.limits.queue_size, settings.limits.timeout_seconds, before_job,
                     settings.limits.max_batch)  # fmt: skip
    voices = VoiceStore(home / "voices", home / "tmp", settings.limits.max_reference_seconds,
                        settings.limits.max_voices)  # fmt: skip
    app = create_app(settings, registry, voices, queue)
    if settings.ui:
        from valle_cli.serve.ui import build_ui, mount

        app = mount(app, build_ui(settings, registry, voices, queue), settings)
    return app, registry, queue


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: any free port), so the caller knows the address before serving."""
    from valle_cli.errors import ValleError

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ValleError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}",
            "pick another --port (or stop what uses it)" if exc.errno == 98 else "check --host",
        ) from None
    sock.listen(128)
    return sock


MAX_IN_FLIGHT = 64  # requests being answered at once; more get 503 (except /health)
MAX_RECEIVING = 16  # requests still sending their bodies (uploads); more get 503
REQUEST_SECONDS = 10.0  # to send a request's headers, from connecting or from the previous response
MIN_UPLOAD_RATE = 64 * 1024  # bytes/s a body must keep up on average (after REQUEST_SECONDS of grace)


def _has_body(scope) -> bool:
    headers = dict(scope.get("headers") or [])
    length = headers.get(b"content-length", b"")
    return (length.isdigit() and int(length) > 0) or b"chunked" in headers.get(b"transfer-encoding", b"")


class InFlightLimit:
    """ASGI middleware: at most `limit` requests in the app at once (503 beyond), /health always answered.
    A request with a body counts against `receiving` (a smaller limit) until its body is in, and only then
    against `limit`: slow uploads cannot take the slots of everything else, and idle or half-open
    connections (which never reach the app) count nowhere."""

    def __init__(self, app, limit: int = MAX_IN_FLIGHT, receiving: int = MAX_RECEIVING):
        self.app, self.limit, self.max_receiving = app, limit, receiving
        self.active = self.receiving = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] == "/health":
            return await self.app(scope, receive, send)
        uploading = _has_body(scope)
        if self.active >= self.limit or (uploading and self.receiving >= self.max_receiving):
            from valle_cli.serve.api import error_response

            busy = error_response(503, "too many requests in flight; retry shortly", "server_error", code="busy",
                                  headers={"Retry-After": "2"})  # fmt: skip
            return await busy(scope, receive, send)
        state = {"uploading": uploading}
        if uploading:
            self.receiving += 1
        else:
            self.active += 1

        async def counted():
            message = await receive()
            body_done = message["type"] == "http.request" and not message.get("more_body", False)
            if state["uploading"] and (body_done or message["type"] == "http.disconnect"):
                state["uploading"] = False  # the body is in: from now on an ordinary request
                self.receiving -= 1
                self.active += 1
            return message

        try:
            await self.app(scope, counted, send)
        finally:
            if state["uploading"]:
                self.receiving -= 1
            else:
                self.active -= 1


def guarded_h11(request_seconds: float = REQUEST_SECONDS, min_rate: float = MIN_UPLOAD_RATE):
    """uvicorn's h11 protocol with deadlines against slow or stalled clients (slowloris): whenever the server
    waits for a request (its headers, on a new connection or after a response), they must arrive within
    `request_seconds`; a body must then average `min_rate` bytes/s after `request_seconds` of grace. A client
    that falls behind is disconnected. While the app works on a request that is fully in, no deadline runs."""
    import time

    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11(H11Protocol):
        _deadline = None
        _body_start = 0.0
        _body_bytes = 0

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _arm(self, seconds: float) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(seconds, self._check)

        def _guard(self, new_request: bool = False) -> None:
            """Arm or disarm after h11's state changed: waiting for headers keeps its first deadline, a new
            request's body starts the rate check, a request fully in stops all checks."""
            state = self.conn.their_state
            if state is h11.IDLE:
                if self._deadline is None:
                    self._arm(request_seconds)
            elif state is h11.SEND_BODY:
                if new_request or self._deadline is None:
                    self._body_start, self._body_bytes = time.monotonic(), 0
                    self._arm(request_seconds)
            else:
                self._disarm()

        def _check(self) -> None:
            self._deadline = None
            if self.transport.is_closing():
                return
            if self.conn.their_state is h11.SEND_BODY:
                owed = (time.monotonic() - self._body_start - request_seconds) * min_rate
                if self._body_bytes >= owed:  # keeping up: look again in a second
                    self._deadline = self.loop.call_later(1.0, self._check)
                    return
            elif self.conn.their_state is not h11.IDLE:
                return  # the request is in; the app has it
            self.transport.close()  # the app, if it has the request, sees a disconnect

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm(request_seconds)

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self.conn.their_state is h11.SEND_BODY:
                self._body_bytes += len(data)
            super().data_received(data)

        def handle_events(self) -> None:
            cycle = self.cycle
            super().handle_events()
            self._guard(new_request=self.cycle is not cycle)

        def on_response_complete(self) -> None:
            cycle = self.cycle
            super().on_response_complete()  # may start a pipelined request
            if not self.transport.is_closing():
                self._guard(new_request=self.cycle is not cycle)

    return GuardedH11


class _CutByStop(logging.Filter):
    """uvicorn logs a response cut by the server's stop (`jobs.Stopping`) as an error with a traceback; it is
    expected then: one line instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        from valle_cli.serve.jobs import Stopping

        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, Stopping):
            record.msg, record.args, record.exc_info, record.exc_text = (
                "a streamed response was cut: the server is stopping",
                (),
                None,
                None,
            )
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


def uvicorn_server(app, log_level: str = "info", request_seconds: float = REQUEST_SECONDS, on_exit=None):
    """The uvicorn server; `on_exit()` runs as soon as a stop is asked for (Ctrl-C, SIGTERM), before uvicorn
    waits for open responses: the CLI cancels the generation jobs there, so responses end at once."""
    import uvicorn

    class Server(uvicorn.Server):
        loop = None

        async def startup(self, sockets=None) -> None:
            self.loop = asyncio.get_running_loop()
            await super().startup(sockets=sockets)

        def handle_exit(self, sig, frame) -> None:
            super().handle_exit(sig, frame)
            if on_exit is not None and self.loop is not None:
                # a signal handler runs between two bytecodes of the loop's thread, maybe inside a lock the
                # queue takes: hand the work to the loop instead of doing it here
                self.loop.call_soon_threadsafe(on_exit)

    config = uvicorn.Config(
        InFlightLimit(app),
        http=guarded_h11(request_seconds),
        log_level=log_level,
        timeout_keep_alive=5,
        timeout_graceful_shutdown=10,
        server_header=False,
    )
    return Server(config)


logging.getLogger("valle.serve").setLevel(logging.INFO)
logging.getLogger("uvicorn.error").addFilter(_CutByStop())
