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


def uvicorn_server(app, log_level: str = "info"):
    import uvicorn

    config = uvicorn.Config(
        app,
        log_level=log_level,
        timeout_keep_alive=5,
        limit_concurrency=64,  # more open connections than this get 503 from uvicorn itself
        timeout_graceful_shutdown=10,
        server_header=False,
    )
    return uvicorn.Server(config)


logging.getLogger("valle.serve").setLevel(logging.INFO)
