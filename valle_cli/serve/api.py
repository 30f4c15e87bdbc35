"""The HTTP API (FastAPI): OpenAI's speech, transcription and models endpoints, voice management, health.

Every error is JSON in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, never a stack trace
(those go to the server's log). With an API key set, every /v1 route wants `Authorization: Bearer KEY`
(what OpenAI clients send); /health stays open and says nothing private. Bodies are limited before they are
read (1 MiB of JSON; uploads up to `limits.max_upload_bytes`). Generation runs on one worker through the
bounded queue (jobs.py): a full queue answers 429 with Retry-After, a job past its time 503.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
import time
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from fastapi import Depends, FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException

from valle_cli import __version__
from valle_cli.errors import ValleError
from valle_cli.serve import formats
from valle_cli.serve.jobs import Cancelled, Job, JobQueue, QueueClosed, QueueFull, Stopping
from valle_cli.serve.models import Registry, UnknownModel
from valle_cli.serve.settings import ServeSettings
from valle_cli.serve.voices import RANDOM, VoiceStore

log = logging.getLogger("valle.serve")
UPLOAD_DECODERS = 2  # voice uploads decoded at once (on threads); more get a 429
UPLOAD_PATHS = ("/v1/voices", "/v1/audio/transcriptions", "/ui/")  # bodies up to the upload limit


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.headers = headers or {}


def error_response(status: int, message: str, kind: str = "invalid_request_error", param=None, code=None,
                   headers=None) -> JSONResponse:  # fmt: skip
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


class SpeechRequest(BaseModel):
    """OpenAI's /v1/audio/speech body, plus valle's own optional fields (language and sampling)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    input: str = Field(..., description="The text to speak.")
    voice: str = Field(RANDOM, description=f"A registered voice's name, or '{RANDOM}'.")
    response_format: Literal["mp3", "opus", "aac", "flac", "wav", "pcm"] = "mp3"
    speed: float = Field(1.0, ge=0.25, le=4.0)
    stream_format: Literal["audio", "sse"] | None = None
    instructions: str | None = None
    # valle's own
    stream: bool | None = Field(
        None,
        description="pcm, wav, mp3 and opus stream as they are made (as OpenAI's audio does); false: one whole response, "
        "with X-Valle-Audio-Seconds and X-Valle-Real-Time-Factor headers",
    )
    language: str = "en"
    seed: int | None = Field(None, ge=0, lt=2**63, strict=True)  # true is not a seed
    split_sentences: bool = True
    ar_temp: float | None = Field(None, ge=0.0, le=5.0)
    nar_temp: float | None = Field(None, ge=0.0, le=5.0)
    top_k: int | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    min_p: float | None = Field(None, ge=0.0, lt=1.0)
    top_nsigma: float | None = Field(None, ge=0.0)
    repetition_penalty: float | None = Field(None, ge=0.5, le=5.0)

    @field_validator("model", "input", "voice", "instructions", "language")
    @classmethod
    def _unicode(cls, value: str | None) -> str | None:
        """JSON may escape a lone surrogate (\\ud800): not text, and it breaks every encoder downstream."""
        if value is not None:
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError("not valid Unicode text (it holds a lone surrogate)") from None
        return value


class BodyLimit:
    """ASGI middleware: refuse a body over the limit (413) from its Content-Length, or as it streams in."""

    def __init__(self, app, json_limit: int, upload_limit: int):
        self.app, self.json_limit, self.upload_limit = app, json_limit, upload_limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.upload_limit + 65536 if scope["path"].startswith(UPLOAD_PATHS) else self.json_limit
        length = dict(scope.get("headers") or []).get(b"content-length")
        too_big = error_response(413, f"request body over {limit} bytes", code="body_too_large")
        if length is not None and length.isdigit() and int(length) > limit:
            return await too_big(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise ApiError(413, f"request body over {limit} bytes", code="body_too_large")
            return message

        try:
            await self.app(scope, limited, send)
        except ApiError as exc:
            await error_response(exc.status, exc.message, code=exc.code)(scope, receive, send)


def create_app(settings: ServeSettings, registry: Registry, voices: VoiceStore, queue: JobQueue) -> FastAPI:
    limits = settings.limits
    decode_slots = asyncio.Semaphore(UPLOAD_DECODERS)
    app = FastAPI(
        title="valle",
        version=__version__,
        description="Zero-shot text-to-speech with VALL-E: an OpenAI-compatible speech API.",
        docs_url=None,  # Swagger's page loads scripts from a CDN: offline it is blank; /openapi.json is here
        redoc_url=None,
    )
    app.state.settings, app.state.registry, app.state.voices, app.state.queue = (
        settings,
        registry,
        voices,
        queue,
    )
    available = formats.available()

    def require_key(request: Request) -> None:
        if not settings.api_key:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode(), settings.api_key.encode()
        ):
            raise ApiError(
                401,
                "missing or wrong API key: send `Authorization: Bearer KEY`",
                "authentication_error",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )

    # -- errors -------------------------------------------------------------------------------------------------

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return error_response(exc.status, exc.message, exc.kind, exc.param, exc.code, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path"))
        message = first.get("msg", "invalid request")
        if first.get("type") == "extra_forbidden":
            message = "unknown field"
        elif first.get("type") == "json_invalid":
            message = "the body is not valid JSON"
        return error_response(400, f"{where}: {message}" if where else message, param=where or None)

    @app.exception_handler(HTTPException)
    async def _http(request, exc: HTTPException):
        messages = {404: f"no route {request.method} {request.url.path}", 405: "method not allowed"}
        return error_response(exc.status_code, messages.get(exc.status_code, str(exc.detail)))

    @app.exception_handler(ValleError)
    async def _valle(request, exc: ValleError):
        status = getattr(exc, "status", 404 if isinstance(exc, UnknownModel) else 400)
        message = exc.message + (f"; {exc.remedy}" if exc.remedy else "")
        return error_response(status, message)

    @app.exception_handler(QueueFull)
    async def _full(request, exc):
        return error_response(
            429,
            f"busy: {queue.size} generations are already waiting or running; retry shortly",
            "rate_limit_error",
            code="queue_full",
            headers={"Retry-After": "5"},
        )

    @app.exception_handler(QueueClosed)
    async def _closed(request, exc):
        return error_response(503, "the server is shutting down", "server_error", code="shutting_down")

    @app.exception_handler(Cancelled)
    async def _cancelled(request, exc):  # a waiting whole-file job dropped by the server's stop
        return error_response(503, "the server is shutting down", "server_error", code="shutting_down")

    @app.exception_handler(TimeoutError)
    async def _timeout(request, exc):
        return error_response(
            503, f"generation took longer than {limits.timeout_seconds:g} s and was stopped", "server_error",
            code="timeout",
        )  # fmt: skip

    @app.exception_handler(Exception)
    async def _internal(request, exc):
        if isinstance(exc, Stopping):  # a stream cut by the server's stop, its response started: expected
            return error_response(503, "the server is shutting down", "server_error", code="shutting_down")
        log.exception("internal error on %s %s", request.method, request.url.path)
        return error_response(500, "internal error (details are in the server's log)", "server_error")

    # -- routes -------------------------------------------------------------------------------------------------

    @app.get("/health")
    async def health() -> dict:
        return {
            "status": "ok",
            "version": __version__,
            "model": registry.default,
            "dtype": registry.dtype,
            "queue": {
                "in_flight": queue.in_flight,
                "size": queue.size,
                "served": queue.served,
                "rejected": queue.rejected,
                "batches": queue.batch_calls,
                "batched_jobs": queue.batched_jobs,
            },
            "formats": available,
        }

    @app.get("/v1/models", dependencies=[Depends(require_key)])
    async def list_models() -> dict:
        return {
            "object": "list",
            "data": [
                {
                    "id": e.id,
                    "object": "model",
                    "created": 0,
                    "owned_by": "valle",
                    "default": e.id == registry.default,
                }
                for e in registry.entries.values()
            ],
        }

    @app.post("/v1/audio/speech", dependencies=[Depends(require_key)], response_class=Response)
    async def speech(req: SpeechRequest):
        text = req.input.strip()
        if not text:
            raise ApiError(400, "input is empty: give the text to speak", param="input")
        if len(req.input) > limits.max_text_chars:
            raise ApiError(
                400, f"input is {len(req.input)} characters; this server takes at most {limits.max_text_chars}",
                param="input", code="input_too_long",
            )  # fmt: skip
        if req.response_format not in available:
            needs = (
                " (mp3 needs soundfile 0.13 or newer and libsndfile 1.1 or newer)"
                if req.response_format == "mp3"
                else ""
            )
            raise ApiError(
                400, f"response_format {req.response_format!r} cannot be encoded here{needs}; use one of: "
                f"{', '.join(available)}", param="response_format",
            )  # fmt: skip
        if req.speed != 1.0:
            raise ApiError(
                400, "speed other than 1.0 is not supported: VALL-E sets its own pace from the reference voice "
                "(a faster-speaking reference gives faster speech)", param="speed",
            )  # fmt: skip
        if req.instructions:
            raise ApiError(
                400,
                "instructions are not supported: the reference voice sets the style",
                param="instructions",
            )
        model_id = registry.resolve(req.model)
        refs = [] if req.voice == RANDOM else [voices.audio_path(req.voice)]
        if req.stream is False and req.stream_format is not None:
            raise ApiError(
                400, "stream: false asks for one whole response; leave out stream_format", param="stream"
            )
        if req.stream is True and req.response_format not in formats.STREAMABLE:
            raise ApiError(
                400, f"response_format {req.response_format!r} is only sent whole (its header holds the length); "
                f"streaming sends {', '.join(formats.STREAMABLE)}", param="stream",
            )  # fmt: skip
        if req.stream_format is not None or (
            req.stream is not False and req.response_format in formats.STREAMABLE
        ):
            return await stream_speech(req, model_id, text, refs)  # OpenAI streams audio by default
        t0 = time.time()
        # requests that wait together with the same settings run as one batch (each row samples from its own
        # generator: a seeded request makes the same random draws in a batch as alone)
        key = ("speech", model_id, *(getattr(req, k) for k in BATCH_KEY))
        audio, sr = await queue.run_batched(
            key,
            (text, refs, req),
            lambda jobs, items: _synthesize_batch(jobs, registry, model_id, items, limits),
        )
        body = await asyncio.to_thread(formats.encode, audio, sr, req.response_format)  # never on the loop
        seconds = len(audio) / sr
        return Response(
            body,
            media_type=formats.CONTENT_TYPES[req.response_format],
            headers={
                "X-Valle-Model": model_id,
                "X-Valle-Audio-Seconds": f"{seconds:.3f}",
                "X-Valle-Real-Time-Factor": f"{(time.time() - t0) / max(seconds, 1e-9):.3f}",
            },
        )

    async def stream_speech(req: SpeechRequest, model_id: str, text: str, refs: list[Path]):
        fmt = req.response_format
        if fmt not in formats.STREAMABLE:
            raise ApiError(
                400, f"streaming sends {', '.join(formats.STREAMABLE)}; response_format {fmt!r} is only sent whole "
                "(its header holds the length; omit stream_format)", param="response_format",
            )  # fmt: skip
        chunks = queue.stream(
            lambda job: _synthesize_stream(job, registry, model_id, text, refs, req, limits)
        )
        # the first chunk before any response: a failure (model, voice, text) is still a proper JSON error
        first = await anext(chunks, None)

        async def audio_bytes():
            if first is None:
                return
            encoder = formats.StreamEncoder(fmt)
            chunk, sr = first
            try:
                while True:
                    data = await asyncio.to_thread(encoder.feed, chunk, sr)  # encoding: never on the loop
                    if data:
                        yield data
                    nxt = await anext(chunks, None)
                    if nxt is None:
                        break
                    chunk, sr = nxt
                data = await asyncio.to_thread(encoder.close)
                if data:
                    yield data
            finally:  # the client left or generation failed: stop the job now, not when collected
                await chunks.aclose()

        if req.stream_format in (None, "audio"):
            return StreamingResponse(
                audio_bytes(), media_type=formats.CONTENT_TYPES[fmt], headers={"X-Valle-Model": model_id}
            )

        async def events():
            try:
                async for data in audio_bytes():
                    delta = {"type": "speech.audio.delta", "audio": base64.b64encode(data).decode()}
                    yield f"data: {json.dumps(delta)}\n\n"
                yield f"data: {json.dumps({'type': 'speech.audio.done'})}\n\n"
            except (QueueFull, QueueClosed, TimeoutError, ValleError) as exc:
                message = exc.message if isinstance(exc, ValleError) else type(exc).__name__
                yield f"data: {json.dumps({'type': 'error', 'error': {'message': message}})}\n\n"

        return StreamingResponse(
            events(), media_type="text/event-stream", headers={"X-Valle-Model": model_id}
        )

    @app.post("/v1/audio/transcriptions", dependencies=[Depends(require_key)])
    async def transcriptions(
        file: UploadFile = File(...),
        model: str | None = Form(None),
        language: str = Form("en"),
        response_format: Literal["json", "text", "verbose_json"] = Form("json"),
        prompt: str | None = Form(None, description="Accepted for compatibility; not used."),
        temperature: float | None = Form(None, description="Accepted for compatibility; decoding is greedy."),
    ):
        model_id = registry.resolve(model)
        data = await file.read()
        if not data:
            raise ApiError(400, "file is empty", param="file")
        result = await queue.run(lambda job: _transcribe(job, registry, model_id, data, language, settings))
        if response_format == "text":
            return PlainTextResponse(result.ipa)
        body = {"text": result.ipa}
        if response_format == "verbose_json":
            body.update(
                task="transcribe", language=language, duration=result.audio_seconds, phonemes=True,
                finished=result.finished, model=model_id,
            )  # fmt: skip
        return body

    @app.get("/v1/voices", dependencies=[Depends(require_key)])
    async def list_voices() -> dict:
        return {"object": "list", "data": [asdict(v) for v in voices.list()]}

    @app.post("/v1/voices", dependencies=[Depends(require_key)], status_code=201)
    async def add_voice(
        name: str = Form(...),
        file: UploadFile = File(...),
        transcript: str | None = Form(None),
        replace: bool = Form(False),
    ) -> dict:
        data = await file.read()
        if not data:
            raise ApiError(400, "file is empty", param="file")
        if decode_slots.locked():  # decoding is CPU work: a few at a time, never on the event loop
            raise ApiError(429, "busy: other uploads are being decoded; retry shortly", "rate_limit_error",
                           code="uploads_busy", headers={"Retry-After": "2"})  # fmt: skip
        async with decode_slots:
            voice = await asyncio.to_thread(voices.add, name, data, transcript, replace)
        return asdict(voice)

    @app.delete("/v1/voices/{name}", dependencies=[Depends(require_key)])
    async def delete_voice(name: str) -> dict:
        voices.delete(name)
        return {"name": name, "deleted": True}

    app.add_middleware(BodyLimit, json_limit=limits.max_json_bytes, upload_limit=limits.max_upload_bytes)
    return app


# -- work done on the generation worker ------------------------------------------------------------------------


def _options(req: SpeechRequest, loaded, limits):
    from valle_cli.infer.engine import SamplingConfig
    from valle_cli.infer.synth import SynthOptions

    frame_rate = float(loaded.meta.get("codec", {}).get("frame_rate", 75.0))
    sampler = {k: getattr(req, k) for k in ("top_k", "top_p", "min_p", "top_nsigma", "repetition_penalty")
               if getattr(req, k) is not None}  # fmt: skip
    sampling = SamplingConfig(
        ar_temp=req.ar_temp if req.ar_temp is not None else 0.95,
        nar_temp=req.nar_temp if req.nar_temp is not None else 0.0,
        max_ar_steps=int(limits.max_output_seconds * frame_rate),
        seed=req.seed,
        **sampler,
    )
    return SynthOptions(language=req.language, split_sentences=req.split_sentences), sampling


CHARS_PER_SECOND = 14  # about how many characters of English text a second of speech says (progress totals)


def _synthesize(
    job: Job, registry: Registry, model_id: str, text, refs, req, limits, report=None
) -> tuple[np.ndarray, int]:
    """The whole waveform. `report(what, done, total)`, when given, hears every step (the web UI's progress
    bar: what = "sentences 1-3 of 3: level 0"); a job nobody waits for stops at its next step."""
    from valle_cli.infer.synth import segments, synthesize

    loaded = registry.get(model_id)
    job.check()
    options, sampling = _options(req, loaded, limits)
    segs = segments(text, options.split_sentences)
    n = len(segs)
    finished = [0]
    frame_rate = float(loaded.meta.get("codec", {}).get("frame_rate", 75.0))

    def segment_done(done: int, total: int) -> None:
        finished[0] = done
        job.check()

    batch = 1 if options.rolling_context else max(1, options.batch_size)

    def step(phase: str, done: int, total: int | None) -> None:
        job.check()
        if report is not None:
            first, last = finished[0] + 1, min(finished[0] + batch, n)
            what = f"sentence {first}" if first == last else f"sentences {first}-{last}"
            if (
                total is None
            ):  # a classic AR's frames: the bar needs a total, so an estimate that never ends early
                chars = max(len(seg.text) for seg in segs[first - 1 : last])
                total = max(int(chars / CHARS_PER_SECOND * frame_rate), done + 1)
                phase += " (frames, estimated)"
            report(f"{what} of {n}: {phase}", done, total)

    with torch.inference_mode():  # on the worker thread: the grad mode is per thread
        result = synthesize(
            loaded, text, refs, options, sampling, registry.device, progress=segment_done, steps=step
        )
    return result.audio, result.sample_rate


# the request fields a batch must share (with the model): they set the options and the sampling of all its rows
BATCH_KEY = ("language", "split_sentences", "seed", "ar_temp", "nar_temp", "top_k", "top_p", "min_p",
             "top_nsigma", "repetition_penalty")  # fmt: skip


def _synthesize_batch(jobs: list[Job], registry: Registry, model_id: str, items, limits) -> list:
    """Whole waveforms for requests that waited together (same model and `BATCH_KEY` fields): their
    segments share the model's padded batches. One (audio, sample rate) or error per request; if the shared call
    fails, each request runs again alone, so one request's failure stays its own; the batch stops early only
    when every one of its requests was abandoned."""
    from valle_cli.infer.synth import synthesize_many

    loaded = registry.get(model_id)
    options, sampling = _options(items[0][2], loaded, limits)

    def step(phase: str, done: int, total: int | None) -> None:
        if all(job.cancelled.is_set() for job in jobs):
            raise Cancelled()

    def run(some) -> list:
        with torch.inference_mode():  # on the worker thread: the grad mode is per thread
            return synthesize_many(
                loaded,
                [(text, refs) for text, refs, _ in some],
                options,
                sampling,
                registry.device,
                steps=step,
            )

    try:
        results = run(items)
    except Cancelled:
        raise
    except Exception:  # the shared call failed (one request's padding ran out of memory, ...): each alone
        if len(items) == 1:
            raise
        results = []
        for job, item in zip(jobs, items, strict=True):
            try:
                job.check()
                results.append(run([item])[0])
            except Exception as exc:  # Cancelled included: it answers only that request
                results.append(exc)
    return [r if isinstance(r, Exception) else (r.audio, r.sample_rate) for r in results]


def _synthesize_stream(job: Job, registry: Registry, model_id: str, text, refs, req, limits):
    from valle_cli.infer.synth import synthesize_stream

    loaded = registry.get(model_id)
    job.check()
    options, sampling = _options(req, loaded, limits)
    with torch.inference_mode():  # the generator runs on the worker thread
        yield from synthesize_stream(loaded, text, refs, options, sampling, registry.device)


def _transcribe(
    job: Job, registry: Registry, model_id: str, data: bytes, language: str, settings, report=None
):
    """The model's own IPA transcript of the uploaded audio. `report(what, done, total)`, when given, hears
    every symbol (the web UI's progress bar); a job nobody waits for stops at its next symbol."""
    import soundfile as sf

    from valle_cli.errors import AudioError
    from valle_cli.infer.stt import stt, supports_stt

    limits = settings.limits
    tmp = settings.home / "tmp" / f"transcribe-{uuid.uuid4().hex}"
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp.write_bytes(data)
        try:
            info = sf.info(str(tmp))
        except (sf.LibsndfileError, RuntimeError, TypeError):
            raise ApiError(
                400, "file is not audio this server can read (wav, flac, ogg, opus, mp3)", param="file"
            ) from None
        if info.duration > limits.max_transcribe_seconds:
            raise ApiError(
                413, f"the audio is {info.duration:.1f} s long; this server transcribes at most "
                f"{limits.max_transcribe_seconds:g} s", param="file",
            )  # fmt: skip
        loaded = registry.get(model_id)
        job.check()
        if not supports_stt(loaded.meta):
            raise ApiError(
                400,
                f"model {model_id!r} was not trained for speech-to-text",
                param="model",
                code="stt_not_supported",
            )
        try:
            with torch.inference_mode():

                def heard(_path, symbols: int, expected: int) -> None:
                    job.check()
                    if report is not None:
                        report("symbols heard (the total is an estimate)", symbols, expected)

                return next(stt(loaded, [tmp], language, registry.device, progress=heard))
        except AudioError as exc:
            raise ApiError(400, exc.message.replace(str(tmp), "the uploaded file"), param="file") from None
    finally:
        tmp.unlink(missing_ok=True)
