"""`valle serve` under load: concurrent clients on loopback for a fixed time.

Starts a real `valle serve` process (a tiny model it trains first unless `--model` is given; the offline mel
codec), then runs one client alone and then `--clients` threads that each post whole-file /v1/audio/speech
requests back to back (varied sentences, wav), for `--seconds` each (the many clients in two equal halves).
Reports per row requests served, rejections (429: queue full), other errors, latency percentiles of the served
ones, audio seconds per wall second and the mean batch the server ran (its /health), and the many clients'
throughput against the one's; the time to the first audio byte of a streamed and of a whole response (one
client alone), and the server's resident memory after a warm-up request and after each half (growth between
the halves would be a leak). Also checks that the server still answers /health afterwards.

Usage:  python bench/serve.py [--model RUN | --preset tiny] [--clients 8] [--seconds 60] [--queue-size 16] [--max-batch 8]
                              [--title TEXT] [--write]
`--write` replaces the "valle serve under load" section of docs/benchmarks.md (or the `--title` one).
"""

from __future__ import annotations

import argparse
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from report import command, write_section  # bench/ is on sys.path when run as a script

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A small boat drifted slowly across the quiet lake.",
    "Please bring your notebook to the meeting tomorrow.",
    "The weather turned cold just after sunset.",
    "She read the letter twice before answering.",
    "Fresh bread smells wonderful in the morning.",
]


def tiny_model(root: Path, preset: str = "tiny") -> Path:
    """A tiny model trained for a few steps on two espeak voices (its speech is noise; its cost is real)."""
    import soundfile as sf

    from valle_cli.audio.speech import say
    from valle_cli.config import CodecConfig, load_config
    from valle_cli.prepare.pipeline import PrepareOptions, prepare
    from valle_cli.train.trainer import Trainer

    for spk, voice in (("ann", "espeak:en-us+f3"), ("bo", "espeak:en-gb+m3")):
        folder = root / "voices" / "g" / spk
        folder.mkdir(parents=True)
        for i, text in enumerate(SENTENCES):
            wav, sr = say(text, voice, speed=170)
            sf.write(folder / f"{i}.wav", wav, sr)
            (folder / f"{i}.txt").write_text(text)
    prepare(PrepareOptions(voices=root / "voices", output=root / "ds", codec=CodecConfig(name="mel"),
                           device="cpu", workers=1))  # fmt: skip
    cfg = load_config(preset, [f"data.paths=[{root / 'ds'}]", "data.batch_size=2", "train.steps=30",
                               "train.eval_every=100000", "train.save_every=100000"])  # fmt: skip
    Trainer(cfg, root / "run").train()
    return root / "run"


def rss_mb(pid: int) -> float:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+)", text).group(1)) / 1024


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))] if values else float("nan")


def first_byte(url: str, n: int = 6) -> dict:
    """One client alone: time to the first audio byte of a streamed wav (the default) and of a whole one
    (`"stream": false`), and the whole request's time, over `n` sentences each (medians)."""
    out: dict[str, list[float]] = {
        "stream_first": [],
        "stream_total": [],
        "whole_first": [],
        "whole_total": [],
    }
    with httpx.Client(timeout=600) as http:
        for i in range(n):
            for kind, extra in (("stream", {}), ("whole", {"stream": False})):
                body = {"input": SENTENCES[i % len(SENTENCES)], "voice": "random", "response_format": "wav",
                        "seed": i, **extra}  # fmt: skip
                t0 = time.monotonic()
                first = None
                with http.stream("POST", url + "/v1/audio/speech", json=body) as r:
                    for chunk in r.iter_bytes():
                        if chunk and first is None:
                            first = time.monotonic() - t0
                out[f"{kind}_first"].append(first if first is not None else float("nan"))
                out[f"{kind}_total"].append(time.monotonic() - t0)
    return {k: statistics.median(v) for k, v in out.items()}


def load(url: str, clients: int, seconds: float) -> dict:
    stop = time.monotonic() + seconds
    lock = threading.Lock()
    out = {"ok": [], "rejected": 0, "errors": [], "audio_seconds": 0.0}

    def client(k: int) -> None:
        with httpx.Client(timeout=600) as http:
            i = k
            while time.monotonic() < stop:
                t0 = time.monotonic()
                try:
                    r = http.post(url + "/v1/audio/speech", json={"input": SENTENCES[i % len(SENTENCES)],
                                  "voice": "random", "response_format": "wav", "stream": False})  # fmt: skip
                except httpx.HTTPError as exc:
                    with lock:
                        out["errors"].append(f"{type(exc).__name__}: {exc}")
                    continue
                took = time.monotonic() - t0
                with lock:
                    if r.status_code == 200:
                        out["ok"].append(took)
                        out["audio_seconds"] += float(r.headers["x-valle-audio-seconds"])
                    elif r.status_code == 429:
                        out["rejected"] += 1
                    else:
                        out["errors"].append(f"{r.status_code} {r.text[:200]}")
                if r.status_code == 429:
                    time.sleep(0.2)  # a polite client backs off (Retry-After says 5 s; this is a stress test)
                i += clients

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out["wall"] = time.monotonic() - t0
    return out


def batches(url: str) -> tuple[int, int]:
    """(batched calls, jobs in them) the server has run so far."""
    q = httpx.get(url + "/health", timeout=30).json()["queue"]
    return q["batches"], q["batched_jobs"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model")
    ap.add_argument("--preset", default="tiny", help="the preset of the model trained here without --model")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--queue-size", type=int, default=16)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--dtype", default="fp32", help="the server's --dtype")
    ap.add_argument("--title", default="valle serve under load")
    ap.add_argument("--max-output-seconds", type=float, default=2.0)
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model = Path(args.model) if args.model else tiny_model(Path(tmp) / "model", args.preset)
        cmd = [sys.executable, "-m", "valle_cli", "serve", "--model", f"bench={model}", "--port", "0",
               "--home", str(Path(tmp) / "home"), "--device", "cpu", "--queue-size", str(args.queue_size),
               "--max-batch", str(args.max_batch), "--dtype", args.dtype,
               "--max-output-seconds", str(args.max_output_seconds), "--no-ui"]  # fmt: skip
        server = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True
        )
        try:
            line = ""
            while "valle serve on" not in line:
                line = server.stderr.readline()
                if not line and server.poll() is not None:
                    raise SystemExit(f"the server did not start (exit {server.returncode})")
            url = "http://127.0.0.1:" + re.search(r":(\d+)\s", line).group(1)
            log: list[str] = []
            threading.Thread(target=lambda: log.extend(server.stderr), daemon=True).start()  # drain the log
            httpx.post(
                url + "/v1/audio/speech", json={"input": "Warm up.", "response_format": "wav"}, timeout=600
            )
            ttfb = first_byte(url)
            rss = [rss_mb(server.pid)]
            before = batches(url)
            alone = load(url, 1, args.seconds)
            mid = batches(url)
            halves = []
            for _ in range(2):
                halves.append(load(url, args.clients, args.seconds / 2))
                rss.append(rss_mb(server.pid))
            after = batches(url)
            healthy = httpx.get(url + "/health", timeout=30).json()["status"] == "ok"
            alive = server.poll() is None
        finally:
            server.terminate()
            server.wait(timeout=60)

    def row(
        clients: int, runs: list[dict], since: tuple[int, int], until: tuple[int, int]
    ) -> tuple[str, float]:
        ok = [t for h in runs for t in h["ok"]]
        wall = sum(h["wall"] for h in runs)
        rejected = sum(h["rejected"] for h in runs)
        errors = [e for h in runs for e in h["errors"]]
        rate = sum(h["audio_seconds"] for h in runs) / wall
        calls, jobs = until[0] - since[0], until[1] - since[1]
        mean = f"{jobs / calls:.1f}" if calls else "-"
        if not ok:
            return f"| {clients} | 0 | {rejected} | {len(errors)} | - | - | - | - | 0 | {mean} |", 0.0
        return (
            f"| {clients} | {len(ok)} | {rejected} | {len(errors)} | {statistics.median(ok):.2f} | "
            f"{percentile(ok, 0.9):.2f} | {percentile(ok, 0.99):.2f} | {max(ok):.2f} | {rate:.2f} | {mean} |",
            rate,
        )

    errors = [e for h in [alone, *halves] for e in h["errors"]]
    one, one_rate = row(1, [alone], before, mid)
    many, many_rate = row(args.clients, halves, mid, after)
    what = f"model {args.model}" if args.model else f"a {args.preset}-preset model trained for 30 steps"
    body = [
        f"Command: `{command('serve.py')}`  ",
        f"{platform.processor() or platform.machine()}, one client and then {args.clients} clients posting "
        f"whole-file requests back to back, {args.seconds:g} s each, queue size {args.queue_size}, batches of up "
        f"to {args.max_batch}, {what} on CPU ({args.dtype}), up to {args.max_output_seconds:g} s of audio per sentence, wav.",
        "",
        "| clients | served | rejected (429) | other errors | p50 s | p90 s | p99 s | max s | audio s per wall s "
        "| jobs per batch |",
        "|---|---|---|---|---|---|---|---|---|---|",
        one,
        many,
        "",
        f"{args.clients} clients get {many_rate / max(one_rate, 1e-9):.2f}x the audio per wall second of one."
        + (f" Other errors: {', '.join(sorted(set(errors)))}." if errors else ""),
        "",
        f"Time to first audio byte, one client alone (median of 6 sentences): {ttfb['stream_first']:.2f} s "
        f"streamed (the default for wav, pcm, mp3 and opus; whole request {ttfb['stream_total']:.2f} s), "
        f'{ttfb["whole_first"]:.2f} s for one whole file (`"stream": false`; whole request '
        f"{ttfb['whole_total']:.2f} s).",
        "",
        f"Server memory (RSS): {rss[0]:.0f} MB after warm-up, {rss[1]:.0f} MB after the first half, "
        f"{rss[2]:.0f} MB after the second ({rss[2] - rss[1]:+.0f} MB). Alive and healthy afterwards: "
        f"{'yes' if alive and healthy else 'NO'}.",
    ]
    print("\n".join(body))
    if errors:
        print("server log around the errors:\n" + "".join(line for line in log if "INFO" not in line)[-4000:])
    if args.write:
        write_section(args.title, body)


if __name__ == "__main__":
    main()
