"""`valle serve` over real HTTP on loopback, with a tiny model trained for a few steps (speech and stt): the
OpenAI client's request shapes, every audio format, streaming (chunked audio and SSE), voices, auth on and off,
limits and the bounded queue, path-traversal attempts, malformed bodies; and the queue's own rules."""

from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf
from fastapi import FastAPI, Request  # module level: the annotations below are resolved from here

from valle_cli.serve.jobs import JobQueue, QueueFull
from valle_cli.serve.server import bind, build, uvicorn_server
from valle_cli.serve.settings import Limits, ServeSettings

from .conftest import needs_espeak

pytestmark = needs_espeak


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model


class Server:
    def __init__(self, settings: ServeSettings, **server_options):
        self.app, self.registry, self.queue = build(settings)
        self.registry.get(self.registry.default)
        self.sock = bind("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn_server(self.app, log_level="warning", **server_options)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started and time.time() < deadline:
            time.sleep(0.05)
        assert self.server.started

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.queue.close()


def start(model, tmp_path, datasets=(), **limits) -> Server:
    base = {"max_output_seconds": 1.5, "max_upload_bytes": 2 * 1024 * 1024, "max_reference_seconds": 8.0}
    settings = ServeSettings(
        models=[f"tiny={model}"], home=tmp_path / "home", api_key=limits.pop("api_key", None),
        dtype=limits.pop("dtype", "fp32"), limits=Limits(**{**base, **limits}), datasets=list(datasets),
    )  # fmt: skip
    return Server(settings)


@pytest.fixture(scope="module")
def server(model, dataset, tmp_path_factory):
    srv = start(model, tmp_path_factory.mktemp("home"), datasets=[dataset])
    yield srv
    srv.stop()


def clip(seconds: float = 2.0, sr: int = 16000, fmt: str = "WAV") -> bytes:
    """A speech-like test clip (espeak), as file bytes."""
    from valle_cli.audio.speech import say

    wav, rate = say("The quick brown fox jumps over the lazy dog. " * 4, "espeak:en-us+f3", speed=170)
    wav = wav[: int(seconds * rate)]
    buf = io.BytesIO()
    sf.write(buf, wav, rate, format=fmt)
    return buf.getvalue()


def assert_error(resp: httpx.Response, status: int, *words: str) -> dict:
    assert resp.status_code == status, (resp.status_code, resp.text)
    assert resp.headers["content-type"].startswith("application/json")
    err = resp.json()["error"]
    assert "Traceback" not in resp.text
    assert "upload-" not in err["message"] and "transcribe-" not in err["message"]  # no server file names
    for word in words:
        assert word in err["message"], err["message"]
    return err


def test_openai_client_speech_in_every_format(server):
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    for fmt in ("wav", "flac", "mp3", "opus"):
        resp = client.audio.speech.create(
            model="tts-1", voice="random", input="Hello there.", response_format=fmt
        )
        audio, sr = sf.read(io.BytesIO(resp.content))
        assert audio.ndim == 1 and len(audio) / sr > 0.2, fmt
    pcm = client.audio.speech.create(
        model="tiny", voice="random", input="Hello there.", response_format="pcm"
    )
    samples = np.frombuffer(pcm.content, dtype="<i2")
    assert samples.size / 24000 > 0.2 and np.abs(samples).max() > 0
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    # the same seed gives the same audio; "stream": false gives one whole file with its totals in headers
    whole = {"input": "Hi.", "voice": "random", "seed": 3, "response_format": "wav", "stream": False}
    a = httpx.post(server.url + "/v1/audio/speech", json=whole, timeout=120)
    b = httpx.post(server.url + "/v1/audio/speech", json=whole, timeout=120)
    assert a.status_code == 200 and a.content == b.content and "transfer-encoding" not in a.headers
    assert float(a.headers["x-valle-audio-seconds"]) > 0 and a.headers["x-valle-model"] == "tiny"
    # by default wav and pcm stream as they are made, as OpenAI's API does: the same speech
    with client.audio.speech.with_streaming_response.create(
        model="tiny", voice="random", input="Hi.", response_format="wav", extra_body={"seed": 3}
    ) as streamed:
        assert streamed.headers.get("transfer-encoding") == "chunked"
        body = streamed.read()
    streamed_audio, whole_audio = sf.read(io.BytesIO(body))[0], sf.read(io.BytesIO(a.content))[0]
    assert streamed_audio.size == whole_audio.size and np.abs(streamed_audio).max() > 0  # decoded in chunks
    both = {**whole, "stream_format": "audio"}
    assert_error(httpx.post(server.url + "/v1/audio/speech", json=both, timeout=120), 400, "stream_format")
    # mp3 and opus stream too, and what streamed reads back whole with soundfile (libsndfile); flac is sent
    # whole, as its header holds the length
    for fmt in ("mp3", "opus", "flac"):
        one = httpx.post(server.url + "/v1/audio/speech", json={**whole, "response_format": fmt}, timeout=120)
        kept = httpx.post(
            server.url + "/v1/audio/speech",
            json={**whole, "response_format": fmt, "stream": None},
            timeout=120,
        )
        assert ("transfer-encoding" in kept.headers) == (fmt != "flac"), fmt
        (x, sr_x), (y, sr_y) = sf.read(io.BytesIO(one.content)), sf.read(io.BytesIO(kept.content))
        assert sr_x == sr_y and abs(len(x) - len(y)) / sr_x < 0.1, (fmt, len(x), len(y))
    flac = {**whole, "response_format": "flac", "stream": None, "stream_format": "audio"}
    assert_error(httpx.post(server.url + "/v1/audio/speech", json=flac, timeout=120), 400, "sent whole")
    flac = {**whole, "response_format": "flac", "stream": True}
    assert_error(httpx.post(server.url + "/v1/audio/speech", json=flac, timeout=120), 400, "sent whole")


def test_stream_encoder_bytes_read_back_as_the_audio_fed():
    """Each streamable format, fed in pieces as sentences come, reads back (soundfile) as the audio fed: the
    same length within a frame or two, and the same waveform."""
    from valle_cli.serve import formats

    sr = 24000
    t = np.arange(int(3.3 * sr)) / sr
    audio = (0.3 * np.sin(2 * np.pi * 220 * t) * np.sin(2 * np.pi * 0.7 * t)).astype(np.float32)
    pieces = np.split(audio, [int(0.9 * sr), int(2.2 * sr)])
    for fmt in [f for f in formats.STREAMABLE if f in formats.available()]:
        enc = formats.StreamEncoder(fmt)
        sent = [enc.feed(p, sr) for p in pieces]
        sent.append(enc.close())
        data = b"".join(sent)
        assert sum(1 for b in sent if b) >= 2, fmt  # bytes leave before the end
        if fmt == "pcm":
            back, rate = np.frombuffer(data, dtype="<i2") / 32768.0, formats.PCM_RATE
        else:
            back, rate = sf.read(io.BytesIO(data))
        assert abs(len(back) / rate - len(audio) / sr) < 0.1, (fmt, len(back) / rate)
        if rate == sr:  # codec delay aside, the same waveform
            best = max(
                float(np.corrcoef(back[lag : lag + sr], audio[sr : 2 * sr])[0, 1])
                for lag in range(sr - 2000, sr + 2001, 8)
            )
            assert best > 0.9, (fmt, best)
    with pytest.raises(ValueError):
        formats.StreamEncoder("flac")


def test_voices_are_names_and_uploads_are_checked(server):
    url = server.url + "/v1/voices"
    r = httpx.post(url, data={"name": "ann", "transcript": "The quick brown fox."},
                   files={"file": ("../../evil.wav", clip(3.0), "audio/wav")})  # fmt: skip
    assert r.status_code == 201, r.text
    assert r.json()["name"] == "ann" and r.json()["seconds"] == pytest.approx(3.0, abs=0.01)
    assert [v["name"] for v in httpx.get(url).json()["data"]] == ["ann"]
    speech = httpx.post(server.url + "/v1/audio/speech", json={"input": "Hello.", "voice": "ann",
                                                               "response_format": "wav"}, timeout=120)  # fmt: skip
    assert speech.status_code == 200 and sf.read(io.BytesIO(speech.content))[0].size > 0
    assert_error(httpx.post(url, data={"name": "ann"}, files={"file": ("a.wav", clip(2.0))}), 409, "exists")
    assert_error(httpx.post(url, data={"name": "bad"}, files={"file": ("a.wav", b"RIFF not audio")}), 400,
                 "cannot read the uploaded file")  # fmt: skip
    assert_error(
        httpx.post(url, data={"name": "long"}, files={"file": ("a.wav", clip(9.0))}), 413, "at most 8"
    )
    silent = io.BytesIO()
    sf.write(silent, np.zeros(48000, dtype=np.float32), 24000, format="WAV")
    assert_error(
        httpx.post(url, data={"name": "quiet"}, files={"file": ("a.wav", silent.getvalue())}), 400, "silent"
    )
    assert_error(httpx.post(url, data={"name": "random"}, files={"file": ("a.wav", clip())}), 400, "reserved")
    assert_error(httpx.delete(url + "/nobody"), 404, "no voice named 'nobody'")
    assert httpx.delete(url + "/ann").json() == {"name": "ann", "deleted": True}
    assert_error(
        httpx.post(server.url + "/v1/audio/speech", json={"input": "Hi.", "voice": "ann"}),
        404,
        "no voice named",
    )


def test_path_traversal_is_refused(server, tmp_path):
    speech = server.url + "/v1/audio/speech"
    for voice in ("../../../../etc/passwd", "/etc/passwd", "..", "a/b", "ann.wav"):
        assert_error(httpx.post(speech, json={"input": "Hi.", "voice": voice}), 400, "invalid voice name")
    for model in ("/etc/passwd", "../run", str(tmp_path)):
        assert_error(httpx.post(speech, json={"input": "Hi.", "model": model}), 404, "is not served here")
    for name in ("../x", "..", "a/../../b", "x" * 65, "-rf", "_x", "CON", "nul", "Com1"):
        r = httpx.post(server.url + "/v1/voices", data={"name": name}, files={"file": ("a.wav", clip())})
        assert_error(r, 400, "invalid voice name")
    for path in ("/v1/voices/..%2F..%2Fetc%2Fpasswd", "/v1/voices/%2E%2E", "/v1/voices/..%5Cwin"):
        r = httpx.delete(server.url + path)
        assert r.status_code in (400, 404) and "Traceback" not in r.text
    assert not list(tmp_path.rglob("*evil*"))
    assert httpx.get(server.url + "/../../etc/passwd").status_code == 404


def test_malformed_requests_get_json_errors(server):
    speech = server.url + "/v1/audio/speech"
    r = httpx.post(speech, content=b"{not json", headers={"content-type": "application/json"})
    assert_error(r, 400, "not valid JSON")
    assert_error(httpx.post(speech, json=[1, 2]), 400)
    assert_error(httpx.post(speech, json={"voice": "random"}), 400, "input", "Field required")
    assert_error(httpx.post(speech, json={"input": "Hi.", "voise": "ann"}), 400, "voise: unknown field")
    assert_error(httpx.post(speech, json={"input": 5}), 400, "input")
    assert_error(httpx.post(speech, json={"input": "   "}), 400, "input is empty")
    assert_error(httpx.post(speech, json={"input": "Hi.", "speed": 2.0}), 400, "speed other than 1.0")
    assert_error(httpx.post(speech, json={"input": "Hi.", "speed": 9.0}), 400, "speed")
    assert_error(httpx.post(speech, json={"input": "Hi.", "response_format": "aac"}), 400, "use one of: wav")
    assert_error(httpx.post(speech, json={"input": "Hi.", "response_format": "flac", "stream_format": "audio"}),
                 400, "only sent whole")  # fmt: skip
    assert_error(httpx.post(speech, json={"input": "Hi.", "top_p": 0}), 400, "top_p")
    assert_error(httpx.post(speech, json={"input": "Hi.", "seed": 2**70}), 400, "seed")
    assert_error(httpx.post(speech, json={"input": "Hi.", "seed": -1}), 400, "seed")
    lone = httpx.post(
        speech, content=b'{"input": "Hi \\ud800 there."}', headers={"content-type": "application/json"}
    )
    assert_error(lone, 400, "input", "lone surrogate")
    assert_error(httpx.post(speech, json={"input": "x" * 5000}), 400, "at most 4096")
    assert_error(httpx.get(server.url + "/v1/nothing"), 404, "no route")
    assert_error(httpx.get(speech), 405)
    big = httpx.post(
        speech, content=b"{" + b" " * (2 * 1024 * 1024) + b"}", headers={"content-type": "application/json"}
    )
    assert_error(big, 413, "request body over")
    huge = httpx.post(
        server.url + "/v1/voices", data={"name": "big"}, files={"file": ("a.wav", b"0" * (3 * 1024 * 1024))}
    )
    assert_error(huge, 413, "request body over")
    tr = httpx.post(server.url + "/v1/audio/transcriptions", files={"file": ("x.wav", b"plain text")})
    assert_error(tr, 400, "not audio")
    openapi = httpx.get(server.url + "/openapi.json").json()
    assert {"/v1/audio/speech", "/v1/audio/transcriptions", "/v1/models", "/v1/voices", "/health"} <= set(
        openapi["paths"]
    )


def test_streaming_audio_and_sse(server):
    body = {"input": "Hello there. How are you?", "voice": "random", "response_format": "wav",
            "stream_format": "audio", "seed": 1}  # fmt: skip
    with httpx.stream("POST", server.url + "/v1/audio/speech", json=body, timeout=120) as r:
        assert r.status_code == 200 and r.headers.get("transfer-encoding") == "chunked"
        chunks = [c for c in r.iter_bytes() if c]
    data = b"".join(chunks)
    assert data[:4] == b"RIFF" and data[36:40] == b"data" and len(chunks) >= 2
    samples = np.frombuffer(data[44:], dtype="<i2")
    assert samples.size / 24000 > 0.5
    body.update(response_format="pcm", stream_format="sse")
    events = []
    with httpx.stream("POST", server.url + "/v1/audio/speech", json=body, timeout=120) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    import base64

    assert events[-1]["type"] == "speech.audio.done"
    pcm = b"".join(base64.b64decode(e["audio"]) for e in events if e["type"] == "speech.audio.delta")
    assert len(pcm) == len(data) - 44  # the same speech as the wav stream (same seed)


def test_transcription_with_the_openai_client(server):
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    out = client.audio.transcriptions.create(model="whisper-1", file=("a.flac", clip(2.0, fmt="FLAC")))
    assert isinstance(out.text, str)
    text = client.audio.transcriptions.create(
        model="whisper-1", file=("a.wav", clip(2.0)), response_format="text"
    )
    assert isinstance(text, str)
    verbose = httpx.post(server.url + "/v1/audio/transcriptions", data={"response_format": "verbose_json"},
                         files={"file": ("a.wav", clip(2.0))}, timeout=120).json()  # fmt: skip
    assert verbose["duration"] == pytest.approx(2.0, abs=0.01) and verbose["phonemes"] is True


def test_web_ui_progress_reports_every_step_and_a_cancelled_job_stops(server):
    """What the web UI's progress bars hear from the generation thread (speech and speech-to-text)."""
    from valle_cli.serve.api import SpeechRequest, _synthesize, _transcribe
    from valle_cli.serve.jobs import Cancelled, Job

    registry, settings = server.registry, server.app.state.settings
    heard: list = []
    req = SpeechRequest(input="One. Two.", voice="random", seed=1)
    audio, _ = _synthesize(
        Job(), registry, "tiny", req.input, [], req, settings.limits, report=lambda *a: heard.append(a)
    )
    assert len(audio) and heard
    phases = [what for what, _, _ in heard]
    assert phases[0].startswith("sentences 1-2 of 2: level 0") and phases[-1] == "sentences 1-2 of 2: levels"
    assert all(0 < done <= total for _, done, total in heard)  # a classic AR's frames: an estimated total
    symbols: list = []
    _transcribe(Job(), registry, "tiny", clip(1.0), "en", settings, report=lambda *a: symbols.append(a))
    assert symbols and [n for _, n, _ in symbols] == list(range(1, len(symbols) + 1))
    job = Job()

    def leave(*_):  # the client left: the job stops at its next step
        job.cancelled.set()

    with pytest.raises(Cancelled):
        _synthesize(job, registry, "tiny", req.input, [], req, settings.limits, report=leave)


def test_model_errors_name_the_served_model_not_its_path(model, tmp_path):
    """A model without the stt task, and one whose file is broken: clients get the served id, never a path."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from valle_cli.fsutil import save_safetensors
    from valle_cli.train.checkpoint import latest

    src = latest(model) / "model.safetensors"
    with safe_open(str(src), "pt") as f:
        meta = dict(f.metadata())
    config = json.loads(meta["config"])
    config["train"]["stt_prob"] = 0.0
    tts_only = tmp_path / "secret-place" / "tts-only.safetensors"
    tts_only.parent.mkdir()
    save_safetensors(load_file(str(src)), tts_only, {**meta, "config": json.dumps(config)})
    broken = tmp_path / "secret-place" / "broken.safetensors"
    broken.write_bytes(tts_only.read_bytes()[:5000])
    settings = ServeSettings(
        models=[f"speaker={tts_only}", f"broken={broken}"], home=tmp_path / "home",
        limits=Limits(max_output_seconds=1.5, max_upload_bytes=2 * 1024 * 1024),
    )  # fmt: skip
    srv = Server(settings)
    try:
        tr = httpx.post(
            srv.url + "/v1/audio/transcriptions", files={"file": ("a.wav", clip(1.0))}, timeout=120
        )
        body = assert_error(tr, 400, "'speaker' was not trained for speech-to-text")
        gone = httpx.post(srv.url + "/v1/audio/speech", json={"input": "Hi.", "model": "broken"}, timeout=120)
        body2 = assert_error(gone, 503, "'broken' cannot be loaded")
        assert "secret-place" not in json.dumps(body) + json.dumps(body2)
    finally:
        srv.stop()


def test_slow_and_stalled_clients_cannot_starve_the_server(model, tmp_path):
    """Slowloris: 80 connections that never finish their headers, and bodies that stall, are dropped after
    the request deadline; meanwhile /health and every other route answer at once."""
    import socket

    settings = ServeSettings(models=[f"tiny={model}"], home=tmp_path / "home")
    srv = Server(settings, request_seconds=1.0)
    port = int(srv.url.rsplit(":", 1)[1])
    held = []
    try:
        for k in range(80):
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n" if k % 2 else b"POST /v1/voices HTTP/1.1\r\n"
                      b"Host: x\r\nContent-Length: 100000\r\nContent-Type: text/plain\r\n\r\nabc")  # fmt: skip
            held.append(s)
        t0 = time.time()
        assert httpx.get(srv.url + "/health", timeout=30).status_code == 200
        assert httpx.get(srv.url + "/v1/models", timeout=30).status_code == 200
        assert time.time() - t0 < 20  # generous: only catches a server that waits for the held connections
        for s in held:  # every held connection is closed by the server (a recv timeout would fail here)
            s.settimeout(60)
            while s.recv(65536):  # perhaps an error response first, then the close
                pass
        assert httpx.get(srv.url + "/health", timeout=30).status_code == 200
    finally:
        for s in held:
            s.close()
        srv.stop()


def test_api_key_and_a_full_queue(model, tmp_path):
    import openai

    srv = start(model, tmp_path, api_key="s3cret", queue_size=1)
    try:
        health = httpx.get(srv.url + "/health").json()  # open, and says nothing private
        assert health["status"] == "ok" and "s3cret" not in json.dumps(health)
        assert_error(httpx.get(srv.url + "/v1/models"), 401, "API key")
        assert_error(httpx.get(srv.url + "/v1/models", headers={"Authorization": "Bearer nope"}), 401)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong").models.list()
        good = openai.OpenAI(base_url=srv.url + "/v1", api_key="s3cret")
        assert good.models.list().data[0].id == "tiny"

        def call(i):
            return httpx.post(srv.url + "/v1/audio/speech", headers={"Authorization": "Bearer s3cret"},
                              json={"input": f"Sentence number {i}.", "response_format": "wav"}, timeout=120)  # fmt: skip

        with ThreadPoolExecutor(6) as pool:
            replies = list(pool.map(call, range(6)))
        codes = sorted(r.status_code for r in replies)
        assert 200 in codes and 429 in codes and set(codes) <= {200, 429}, codes
        busy = next(r for r in replies if r.status_code == 429)
        assert_error(busy, 429, "busy")
        assert busy.headers["retry-after"] == "5"
        assert srv.queue.in_flight == 0
        counts = httpx.get(srv.url + "/health").json()["queue"]
        assert counts["rejected"] == codes.count(429) and counts["served"] == codes.count(200)
    finally:
        srv.stop()


def test_a_server_with_quantized_weights_speaks(model, tmp_path):
    from valle_cli.model.quant import Int4Linear, Int8Linear

    srv = start(model, tmp_path, dtype="int4")
    try:
        kinds = {type(m) for m in srv.registry.get("tiny").model.modules()}
        assert {Int4Linear, Int8Linear} <= kinds  # int4 where the kernel fits, int8 for the rest
        assert httpx.get(srv.url + "/health").json()["dtype"] == "int4"
        r = httpx.post(srv.url + "/v1/audio/speech", json={"input": "Hello there.", "response_format": "wav",
                                                            "seed": 3}, timeout=120)  # fmt: skip
        assert r.status_code == 200, r.text
        wav, sr = sf.read(io.BytesIO(r.content))
        assert sr > 0 and len(wav) > 0.1 * sr and np.abs(wav).max() > 0.01
    finally:
        srv.stop()


def test_job_queue_bounds_and_timeouts():
    async def main():
        queue = JobQueue(size=1, timeout=0.3)
        gate = threading.Event()
        running = asyncio.ensure_future(queue.run(lambda job: gate.wait(5) and "done"))
        await asyncio.sleep(0.05)
        with pytest.raises(QueueFull):
            await queue.run(lambda job: "never")
        with pytest.raises(TimeoutError):
            await running  # past its time: cancelled, but its slot stays taken until the work stops
        assert queue.in_flight == 1
        gate.set()
        await until_idle(queue)

        def counting(job):
            for i in range(1000):
                job.check()
                time.sleep(0.01)
                yield i

        seen = []
        items = queue.stream(counting)
        async for item in items:
            seen.append(item)
            if len(seen) == 3:
                break
        await items.aclose()  # the client left (what the server does when a connection drops)
        await until_idle(queue)  # the worker stopped at its next check (not after its 1000 items)
        assert len(seen) == 3
        queue.close()

    async def until_idle(queue, hang: float = 120.0):
        """Wait for the worker to free its slot; the bound only catches a hang (a loaded machine is slow)."""
        deadline = time.monotonic() + hang
        while queue.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert queue.in_flight == 0

    asyncio.run(main())


def test_closing_the_queue_ends_running_and_waiting_jobs_at_once():
    """What a server's stop does: the running stream is cut (Stopping), a waiting stream too, a waiting
    whole-file job is refused (Cancelled, a 503), and every slot is freed, without waiting for timeouts."""
    from valle_cli.serve.jobs import Cancelled, Stopping

    async def main():
        queue = JobQueue(size=3, timeout=300)

        def counting(job):
            for i in range(100_000):
                job.check()
                time.sleep(0.01)
                yield i

        running = queue.stream(counting)
        first = await anext(running)  # the worker is busy with it
        waiting = queue.stream(counting)
        whole = asyncio.ensure_future(queue.run(lambda job: "never"))
        await asyncio.sleep(0)
        assert first == 0 and queue.in_flight == 3
        t0 = time.monotonic()
        queue.close()
        with pytest.raises(Stopping):
            async for _ in running:
                pass
        with pytest.raises(Stopping):
            async for _ in waiting:
                pass
        with pytest.raises(Cancelled):
            await whole
        deadline = time.monotonic() + 120  # hang-only
        while queue.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert queue.in_flight == 0 and time.monotonic() - t0 < 120

    asyncio.run(main())


def test_batched_jobs_run_together_by_key_and_each_gets_its_own_answer():
    """Jobs with one key that wait together go to one call (at most max_batch); another key waits for its own
    call; an item's own error reaches only its request; an abandoned waiting job is never run; a stop answers
    the jobs still waiting; every slot is freed."""
    from valle_cli.serve.jobs import Cancelled

    async def main():
        queue = JobQueue(size=12, timeout=300, max_batch=3)
        gate = threading.Event()
        calls: list[tuple[str, list]] = []

        def work(jobs, items):
            calls.append((items[0][0], list(items)))
            return [ValueError(f"bad {i}") if i == "a2" else f"did {i}" for i in items]

        blocker = asyncio.ensure_future(queue.run(lambda job: gate.wait(60) and "free"))
        await asyncio.sleep(0.05)  # the worker is busy: what follows waits together
        names = ["a0", "b0", "a1", "a2", "a3", "b1"]
        tasks = {n: asyncio.ensure_future(queue.run_batched(n[0], n, work)) for n in names}
        gone = asyncio.ensure_future(queue.run_batched("a", "a4", work))
        await asyncio.sleep(0.05)
        gone.cancel()  # its client left while it waited
        await asyncio.sleep(0.05)
        assert queue.in_flight == 7  # the blocker and six waiting
        gate.set()
        assert await blocker == "free"
        got = {}
        for n, t in tasks.items():
            try:
                got[n] = await t
            except ValueError as exc:
                got[n] = str(exc)
        assert got == {"a0": "did a0", "a1": "did a1", "a2": "bad a2", "a3": "did a3", "b0": "did b0",
                       "b1": "did b1"}  # fmt: skip
        # oldest first: a0's key takes three (max_batch), then b's, then the a left over; a4 never ran
        assert [items for _, items in calls] == [["a0", "a1", "a2"], ["b0", "b1"], ["a3"]]
        assert queue.batches[-3:] == [3, 2, 1] and queue.in_flight == 0

        gate.clear()
        blocker = asyncio.ensure_future(queue.run(lambda job: gate.wait(60) and "free"))
        await asyncio.sleep(0.05)
        waiting = [asyncio.ensure_future(queue.run_batched("a", f"late{i}", work)) for i in range(2)]
        await asyncio.sleep(0.05)
        queue.close()  # the server stops: the waiting ones are answered now, not after the blocker
        for t in waiting:
            with pytest.raises(Cancelled):
                await t
        gate.set()
        assert await blocker == "free"  # a running job that never checks finishes; nothing else ran
        assert len(calls) == 3 and queue.in_flight == 0

    asyncio.run(main())


def test_speech_requests_that_wait_together_are_generated_as_one_batch(model, tmp_path, monkeypatch):
    """Four whole-file requests queued behind a busy worker run as one batch; each gets its own text's audio,
    and a seeded one is the same audio as that request alone; a bad text fails only its own request."""
    srv = start(model, tmp_path, queue_size=8)
    try:
        queue, first = srv.queue, threading.Event()

        def hold_first_batch():  # the worker's first batch waits until the others have queued
            if not first.is_set():
                first.set()
                deadline = time.monotonic() + 120  # hang-only
                while queue.in_flight < 5 and time.monotonic() < deadline:
                    time.sleep(0.01)

        queue.before_job = hold_first_batch
        texts = ["The first sentence is short.", "A second one, a little longer than the first.",
                 "The first sentence is short.", "Number four.", "..."]  # fmt: skip

        def call(text):
            body = {"input": text, "response_format": "wav", "stream": False, "seed": 7}
            return httpx.post(srv.url + "/v1/audio/speech", json=body, timeout=300)

        with ThreadPoolExecutor(5) as pool:
            replies = list(pool.map(call, texts))
        queue.before_job = None
        assert max(queue.batches) >= 3, queue.batches  # the four behind the first went together
        assert_error(replies[-1], 400, "no pronounceable words")
        audio = [sf.read(io.BytesIO(r.content))[0] for r in replies[:4]]
        assert all(r.status_code == 200 for r in replies[:4])
        np.testing.assert_allclose(audio[0], audio[2], atol=1e-4)  # one text, one seed: one audio
        alone = sf.read(io.BytesIO(call(texts[1]).content))[0]
        assert queue.batches[-1] == 1
        np.testing.assert_allclose(alone, audio[1], atol=1e-4)  # the same in a batch as alone
        assert not np.allclose(audio[1][:8000], audio[3][:8000], atol=1e-3)  # each got its own text

        # a batch that fails as a whole (say one long request's padding ran out of memory): each runs alone
        from valle_cli.infer import synth

        real = synth.synthesize_many

        def picky(loaded, items, *args, **kw):
            if len(items) > 1:
                raise RuntimeError("out of memory")
            if items[0][0] == texts[3]:
                raise RuntimeError("this one fails alone too")
            return real(loaded, items, *args, **kw)

        monkeypatch.setattr(synth, "synthesize_many", picky)
        first.clear()
        queue.before_job = hold_first_batch
        with ThreadPoolExecutor(5) as pool:
            replies = list(pool.map(call, [*texts[:4], texts[1]]))
        queue.before_job = None
        assert [r.status_code for r in replies] == [200, 200, 200, 500, 200], [r.text for r in replies]
        assert max(queue.batches[-3:]) >= 3
        np.testing.assert_allclose(sf.read(io.BytesIO(replies[1].content))[0], alone, atol=1e-4)
    finally:
        srv.stop()


def test_valle_serve_command_warns_when_public_and_stops_cleanly(model, tmp_path):
    import re
    import signal
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "valle_cli", "serve", "--model", f"tiny={model}", "--host", "0.0.0.0",
           "--port", "0", "--home", str(tmp_path / "home"), "--device", "cpu"]  # fmt: skip
    # SIGINT as at a terminal, even when the tests run in the background (which passes it on ignored)
    restore = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)  # noqa: E731
    proc = subprocess.Popen(
        cmd, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, preexec_fn=restore
    )
    try:
        lines = []
        while not any("valle serve on" in x for x in lines) and len(lines) < 50:
            lines.append(proc.stderr.readline())
        port = int(re.search(r"http://0\.0\.0\.0:(\d+)", "".join(lines)).group(1))
        lines.append(proc.stderr.readline())
        assert "without an API key" in "".join(lines)
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=30).json()["model"] == "tiny"
        # a long streamed answer in flight when the stop comes: cut at once, no traceback in the log
        got: list = []
        long_text = " ".join(["The birch canoe slid on the smooth planks."] * 40)

        def listen():
            body = {"input": long_text, "voice": "random", "response_format": "wav", "seed": 1}
            try:
                with httpx.stream(
                    "POST", f"http://127.0.0.1:{port}/v1/audio/speech", json=body, timeout=600
                ) as r:
                    for chunk in r.iter_bytes():
                        got.append(len(chunk))
            except httpx.HTTPError as exc:  # the cut: the client sees an unfinished body
                got.append(exc)

        client = threading.Thread(target=listen, daemon=True)
        client.start()
        deadline = time.monotonic() + 600  # hang-only: the first audio of a tiny model
        while not got and time.monotonic() < deadline:
            time.sleep(0.05)
        assert got and isinstance(got[0], int)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 130  # a clean stop, with the status of a program stopped by Ctrl-C
        err = proc.stderr.read()
        assert "interrupted (SIGINT)" in err and "Traceback" not in err and "ERROR" not in err, err
        assert "timeout graceful shutdown exceeded" not in err  # the job was cancelled, not waited for
        client.join(timeout=120)
        assert isinstance(got[-1], Exception), got[-3:]  # the cut is visible to the client
    finally:
        if proc.poll() is None:
            proc.kill()
    bad = subprocess.run([sys.executable, "-m", "valle_cli", "serve", "--model", str(tmp_path / "none"),
                          "--home", str(tmp_path / "home")], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert bad.returncode != 0 and "Traceback" not in bad.stderr and "none" in bad.stderr


def test_ui_files_stay_inside_the_servers_folder(server):
    assert httpx.get(server.url + "/", follow_redirects=False).headers["location"] == "/ui/"
    assert httpx.get(server.url + "/ui/").status_code == 200
    for path in ("/ui/gradio_api/file=/etc/passwd", "/ui/gradio_api/file=..%2F..%2F..%2Fetc%2Fpasswd",
                 f"/ui/gradio_api/file={server.registry.entries['tiny'].source}/config.yaml"):  # fmt: skip
        r = httpx.get(server.url + path)
        assert r.status_code in (403, 404) and "root:" not in r.text and "train:" not in r.text


def test_ui_login_uses_the_api_key(model, tmp_path):
    srv = start(model, tmp_path, api_key="s3cret")
    try:
        config = httpx.get(srv.url + "/ui/config")
        assert config.status_code in (401, 403) or config.json().get("auth_required") is True
        bad = httpx.post(srv.url + "/ui/login", data={"username": "me", "password": "nope"})
        assert bad.status_code in (400, 401)
        good = httpx.post(srv.url + "/ui/login", data={"username": "me", "password": "s3cret"})
        assert good.status_code == 200
    finally:
        srv.stop()


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "serve-ui.png"


@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="chromium and chromedriver not installed")
def test_web_ui_synthesizes_in_headless_chromium(server, tmp_path):
    """As a user of the page: a voice registered through the API after the page loaded shows in the dropdown,
    Settings names the model the server has loaded, a reference clip uploaded through the widget is the voice,
    the progress bar names the steps, and the page's <audio> element gets playable audio."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = Options()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,1000"):  # fmt: skip
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    wait = WebDriverWait(driver, 120, poll_frequency=0.2)

    def click_text(selector: str, text: str):
        def find(d):
            return next(
                (e for e in d.find_elements(By.CSS_SELECTOR, selector) if e.text.strip() == text), None
            )

        wait.until(find).click()

    try:
        driver.get(server.url + "/ui/")
        box = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#tts-text textarea"))
        # a voice the API registers after the page was built and loaded
        r = httpx.post(
            server.url + "/v1/voices", data={"name": "late-voice"}, files={"file": ("a.wav", clip())}
        )
        assert r.status_code == 201, r.text
        driver.find_element(By.CSS_SELECTOR, "#tts-voice input").click()  # focus: the list is fetched again
        click_text("li", "late-voice")
        assert wait.until(
            lambda d: (
                d.find_element(By.CSS_SELECTOR, "#tts-voice input").get_attribute("value") == "late-voice"
            )
        )
        # Settings: the model the server loaded after the UI was built (the fixture loads it before serving)
        click_text("button[role=tab]", "Settings")
        wait.until(lambda d: "loaded: tiny" in d.find_element(By.CSS_SELECTOR, "#settings-info").text)
        click_text("button[role=tab]", "Text to speech")
        # a reference clip through the upload widget: it, not the chosen voice, is what is spoken in
        ref = tmp_path / "reference.wav"
        ref.write_bytes(clip(3.0))
        driver.find_element(By.CSS_SELECTOR, "#tts-ref input[type=file]").send_keys(str(ref))
        wait.until(
            lambda d: not d.find_elements(By.CSS_SELECTOR, "#tts-ref input[type=file]")
        )  # now a player
        driver.execute_script(  # every progress line the page shows, however briefly
            "window.seen = [];"
            "new MutationObserver(() => { const t = document.querySelector('#tts-out')?.innerText;"
            "  if (t && t.includes(' of ')) window.seen.push(t); })"
            ".observe(document.body, {subtree: true, childList: true, characterData: true});"
        )
        box.send_keys("Hello there, this is a test. And a second sentence.")
        driver.find_element(By.CSS_SELECTOR, "#tts-go").click()
        audio = wait.until(
            lambda d: d.execute_script(
                "const a = document.querySelector('#tts-out audio');"
                "return a && a.src && a.readyState >= 1 && a.duration > 0 ? [a.src, a.duration] : null;"
            )
        )
        src, duration = audio
        assert 0.2 < duration <= 60
        body = httpx.get(src)  # the element's source is real audio
        data, sr = sf.read(io.BytesIO(body.content))
        assert len(data) / sr == pytest.approx(duration, abs=0.05)
        status = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#tts-status").text)
        assert "of audio from tiny in the uploaded clip" in status, status
        seen = " | ".join(driver.execute_script("return window.seen"))
        assert "sentences 1-2 of 2: level 0" in seen, seen
        if os.environ.get("VALLE_UPDATE_SNAPSHOTS"):
            driver.execute_script("window.scrollTo(0, 0)")
            driver.save_screenshot(str(SCREENSHOT))
    finally:
        driver.quit()
        httpx.delete(server.url + "/v1/voices/late-voice")


def test_request_deadlines_keep_slow_clients_out_and_real_ones_in():
    """The guarded protocol on a small app (no model): a slow dribble after a first request is cut, pipelined
    requests are all answered even when slow, stalled uploads cannot take the slots of other requests."""
    import asyncio
    import socket

    from valle_cli.serve.server import MAX_IN_FLIGHT

    app = FastAPI()

    @app.get("/fast")
    async def fast():
        return {"ok": 1}

    @app.get("/slow")
    async def slow():
        await asyncio.sleep(1.5)
        return {"ok": 2}

    @app.post("/upload")
    async def upload(request: Request):
        return {"n": len(await request.body())}

    @app.get("/health")
    async def health():
        return {"ok": 0}

    sock = bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    server = uvicorn_server(app, log_level="warning", request_seconds=0.5)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)

    def connect():
        s = socket.create_connection(("127.0.0.1", port))
        s.settimeout(30)
        return s

    def read_until(s, marker: bytes, count: int = 1) -> bytes:
        buf = b""
        while buf.count(marker) < count:
            data = s.recv(65536)
            assert data, buf
            buf += data
        return buf

    held = []
    try:
        s = connect()  # keep-alive: a first request, then a new request's headers a byte at a time
        s.sendall(b"GET /fast HTTP/1.1\r\nHost: x\r\n\r\n")
        read_until(s, b'{"ok":1}')
        t0, closed = time.time(), False
        for byte in b"GET /fast HTTP/1.1\r\nHost: x\r\n":
            try:
                s.sendall(bytes([byte]))
                time.sleep(0.2)
            except OSError:
                closed = True
                break
            if time.time() - t0 > 30:
                break
        s.settimeout(30)
        closed = closed or s.recv(65536) == b""
        assert closed  # the whole header, a byte per 0.2 s, is never complete: only the deadline closes it
        s = connect()  # pipelined: the slow second request outlives the header deadline and is answered
        s.sendall(b"GET /fast HTTP/1.1\r\nHost: x\r\n\r\nGET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        assert b'{"ok":2}' in read_until(s, b'{"ok":2}')
        for _ in range(MAX_IN_FLIGHT):  # uploads that never send their bodies
            u = connect()
            u.sendall(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 26214400\r\n\r\n")
            held.append(u)
        assert httpx.get(f"http://127.0.0.1:{port}/fast", timeout=30).status_code == 200
        big = httpx.post(f"http://127.0.0.1:{port}/upload", content=b"x" * 5_000_000, timeout=60)
        assert big.status_code in (200, 503)  # at full speed: in, or told to retry while the slots are full
    finally:
        for u in held:
            u.close()
        server.should_exit = True
        thread.join(timeout=30)


def test_voices_saved_under_the_old_name_rule_stay_usable(tmp_path):
    """`_old` was a valid name before; such a voice is still listed and deletable, but no new one is made."""
    from valle_cli.serve.voices import VoiceError, VoiceStore

    store = VoiceStore(tmp_path / "voices", tmp_path / "tmp", 60.0, 10)
    sf.write(tmp_path / "voices" / "_old.wav", np.zeros(24_000, np.float32), 24_000)
    (tmp_path / "voices" / "_old.json").write_text('{"seconds": 1.0, "created": 0}')
    assert [v.name for v in store.list()] == ["_old"]
    assert store.audio_path("_old").name == "_old.wav"
    with pytest.raises(VoiceError, match="invalid voice name"):
        store.add("_new", clip(2.0))
    store.delete("_old")
    assert store.list() == []


def test_uploads_beyond_the_decoders_get_429_and_health_stays_up(model, tmp_path, monkeypatch):
    """Voice uploads decode on threads, UPLOAD_DECODERS at a time: more at once are refused at once (429 with
    Retry-After), and the server answers /health while the decoders are busy."""
    from concurrent.futures import ThreadPoolExecutor

    from valle_cli.serve.api import UPLOAD_DECODERS
    from valle_cli.serve.voices import VoiceStore

    gate, entered = threading.Event(), threading.Semaphore(0)
    real_add = VoiceStore.add

    def held_add(self, *args, **kwargs):  # the real decode, held until every request has arrived
        entered.release()
        assert gate.wait(60)
        return real_add(self, *args, **kwargs)

    monkeypatch.setattr(VoiceStore, "add", held_add)
    srv = start(model, tmp_path)
    data = clip(2.0)
    try:
        with ThreadPoolExecutor(UPLOAD_DECODERS + 4) as pool:
            busy = [pool.submit(httpx.post, srv.url + "/v1/voices", data={"name": f"v{k}"},
                                files={"file": ("a.wav", data)}, timeout=120)
                    for k in range(UPLOAD_DECODERS)]  # fmt: skip
            for _ in range(UPLOAD_DECODERS):  # both decoders are now taken
                assert entered.acquire(timeout=60)
            more = [pool.submit(httpx.post, srv.url + "/v1/voices", data={"name": f"w{k}"},
                                files={"file": ("a.wav", data)}, timeout=120) for k in range(4)]  # fmt: skip
            refused = [f.result() for f in more]  # answered while the decoders are still held
            assert httpx.get(srv.url + "/health", timeout=30).status_code == 200
            gate.set()
            done = [f.result() for f in busy]
        for r in refused:
            err = assert_error(r, 429, "busy", "uploads")
            assert err["code"] == "uploads_busy" and r.headers["retry-after"] == "2"
        assert [r.status_code for r in done] == [201] * UPLOAD_DECODERS, [r.text for r in done]
        names = {v["name"] for v in httpx.get(srv.url + "/v1/voices", timeout=30).json()["data"]}
        assert {f"v{k}" for k in range(UPLOAD_DECODERS)} <= names and not any(
            n.startswith("w") for n in names
        )
    finally:
        gate.set()
        srv.stop()
