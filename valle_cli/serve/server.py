"""Running the server: the pieces wired together, uvicorn on the chosen address, and a clean stop."""

from __future__ import annotations

import logging
import shutil
import socket

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
    registry = Registry(parse_models(settings.models), settings.device)
    queue = JobQueue(settings.limits.queue_size, settings.limits.timeout_seconds)
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
REQUEST_SECONDS = 10.0  # to send a request's headers, from connecting or from the previous response
MIN_UPLOAD_RATE = 64 * 1024  # bytes/s a body must keep up on average (plus REQUEST_SECONDS of slack)


class InFlightLimit:
    """ASGI middleware: at most `limit` requests in the app at once (503 beyond), /health always answered.
    It counts requests, not connections, so idle or half-open connections cannot starve anyone."""

    def __init__(self, app, limit: int = MAX_IN_FLIGHT):
        self.app, self.limit, self.active = app, limit, 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] == "/health":
            return await self.app(scope, receive, send)
        if self.active >= self.limit:
            from valle_cli.serve.api import error_response

            busy = error_response(503, "too many requests in flight; retry shortly", "server_error", code="busy",
                                  headers={"Retry-After": "2"})  # fmt: skip
            return await busy(scope, receive, send)
        self.active += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.active -= 1


def guarded_h11(request_seconds: float = REQUEST_SECONDS, min_rate: float = MIN_UPLOAD_RATE):
    """uvicorn's h11 protocol with deadlines, against slow or stalled clients (slowloris): the request headers
    must arrive within `request_seconds` of connecting (or of the previous response), and the body within
    `request_seconds` + its length / `min_rate`. A client that misses one is disconnected."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11(H11Protocol):
        _deadline = None

        def _arm(self, seconds: float) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(seconds, self._too_slow)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _too_slow(self) -> None:
            self._deadline = None
            if not self.transport.is_closing():
                self.transport.close()  # the app sees a disconnect; the connection is freed

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm(request_seconds)

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def handle_events(self) -> None:
            cycle = self.cycle
            super().handle_events()
            if self.cycle is not None and self.cycle is not cycle:  # headers of a new request arrived
                headers = dict(self.headers)
                length = headers.get(b"content-length", b"")
                chunked = b"chunked" in headers.get(b"transfer-encoding", b"")
                size = int(length) if length.isdigit() else 0
                self._arm(request_seconds * (6 if chunked else 1) + size / min_rate)
            if self.cycle is not None and not self.cycle.more_body:
                self._disarm()  # the whole request is in: the app takes its time

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm(request_seconds)  # the next request's headers (keep-alive may close sooner)

    return GuardedH11


def uvicorn_server(app, log_level: str = "info", request_seconds: float = REQUEST_SECONDS):
    import uvicorn

    config = uvicorn.Config(
        InFlightLimit(app),
        http=guarded_h11(request_seconds),
        log_level=log_level,
        timeout_keep_alive=5,
        timeout_graceful_shutdown=10,
        server_header=False,
    )
    return uvicorn.Server(config)


logging.getLogger("valle.serve").setLevel(logging.INFO)
