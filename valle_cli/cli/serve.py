"""`valle serve`: the web UI and the OpenAI-compatible HTTP API, on loopback unless told otherwise."""

from __future__ import annotations

import os
from pathlib import Path

import typer

API_KEY_ENV = "VALLE_API_KEY"


def serve(
    model: list[str] = typer.Option(
        None,
        "--model",
        "-m",
        help="A model to serve: RUN_DIR, checkpoint, exported file or hub id; NAME=SOURCE names it. Repeatable; "
        "the first is the default (none: the default model of `valle synth`).",
    ),
    host: str = typer.Option(
        "127.0.0.1", help="Address to listen on (loopback by default; 0.0.0.0 = everyone)."
    ),
    port: int = typer.Option(7860, help="Port (0: any free one)."),
    api_key: str = typer.Option(
        None, "--api-key", help=f"Require `Authorization: Bearer KEY` on the API (or set ${API_KEY_ENV})."
    ),
    home: Path = typer.Option(None, help="The server's own folder (voices, temporary uploads)."),
    device: str = typer.Option("auto", help="cpu, cuda, cuda:N or auto."),
    dtype: str = typer.Option(
        "fp32",
        help="As `valle synth --dtype`: fp32, fp16, bf16, int8 or int4 (int8/int4: a faster AR on a CPU).",
    ),
    max_text_chars: int = typer.Option(4096, help="Longest text per request."),
    max_upload_mb: float = typer.Option(25.0, help="Largest upload (voice clips, audio to transcribe)."),
    max_output_seconds: float = typer.Option(30.0, help="Longest audio per sentence."),
    queue_size: int = typer.Option(16, help="Generations waiting or running at once; more get HTTP 429."),
    max_batch: int = typer.Option(
        8,
        help="Whole-file speech requests with the same settings that wait together run as one batch of at "
        "most this many (1: one at a time).",
    ),
    timeout: float = typer.Option(300.0, help="Seconds a generation may take before it is stopped (503)."),
    dataset: list[Path] = typer.Option(
        None, "--dataset", help="A prepared dataset the UI may browse (repeatable)."
    ),
    ui: bool = typer.Option(True, "--ui/--no-ui", help="Serve the web UI at /ui."),
) -> None:
    """Serve speech synthesis over HTTP: POST /v1/audio/speech (OpenAI's shape), /v1/audio/transcriptions,
    /v1/models, /v1/voices, /health, /openapi.json."""
    from rich.console import Console

    from valle_cli.codecs.base import resolve_device
    from valle_cli.errors import ValleError
    from valle_cli.serve.server import bind, build, uvicorn_server
    from valle_cli.serve.settings import Limits, ServeSettings, default_home

    err = Console(stderr=True, highlight=False, soft_wrap=True)
    if str(resolve_device(device)) == "cpu":
        from valle_cli import threads

        threads.apply()  # the cores other programs leave free when the server starts (valle_cli/threads.py)
    key = api_key or os.environ.get(API_KEY_ENV) or None
    from valle_cli.model.quant import check_dtype, dtype_note

    check_dtype(dtype)
    for name, value in (
        ("--queue-size", queue_size),
        ("--max-batch", max_batch),
        ("--max-text-chars", max_text_chars),
    ):
        if value < 1:
            raise ValleError(f"{name} must be at least 1, got {value}")
    limits = Limits(
        max_text_chars=max_text_chars,
        max_upload_bytes=int(max_upload_mb * 1024 * 1024),
        max_output_seconds=max_output_seconds,
        queue_size=queue_size,
        max_batch=max_batch,
        timeout_seconds=timeout,
    )
    if not model:
        from valle_cli.infer.load import default_model

        source, why = default_model()
        err.print(why, markup=False)
        model = [source]
    settings = ServeSettings(
        models=model, home=home or default_home(), host=host, port=port, api_key=key,
        device=str(resolve_device(device)), dtype=dtype, limits=limits, datasets=list(dataset or []), ui=ui,
    )  # fmt: skip
    for d in settings.datasets:
        from valle_cli.data.dataset import open_dataset

        open_dataset(d).close()  # a wrong --dataset fails now, with the reader's message
    app, registry, queue = build(settings)
    err.print(
        f"loading {registry.default} ..." + (f" (--dtype {dtype})" if dtype != "fp32" else ""), markup=False
    )
    loaded = registry.get(registry.default)  # fail now, with the loader's message, not at the first request
    if note := dtype_note(loaded.model, dtype):
        err.print(note, markup=False)
    sock = bind(host, port)
    shown = f"[{host}]" if ":" in host else host
    where = (
        ("web UI: /ui; " if ui else "")
        + "API: /v1, /openapi.json"
        + (f"; weights {dtype}" if dtype != "fp32" else "")
    )
    err.print(f"valle serve on http://{shown}:{sock.getsockname()[1]}  ({where})", markup=False)
    if not settings.loopback and not key:
        err.print(
            f"warning: listening on {host} without an API key: anyone who can reach this machine can use it "
            f"(set --api-key or ${API_KEY_ENV})",
            style="bold yellow", markup=False,
        )  # fmt: skip
    server = uvicorn_server(app, on_exit=queue.close)  # a stop cancels the jobs at once
    from valle_cli.cli.interrupt import on_interrupt

    on_interrupt(lambda: "the server stopped; its voices and uploads stay in its folder")
    try:
        server.run(sockets=[sock])
    finally:
        queue.close()
