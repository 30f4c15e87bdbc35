"""The `valle prepare` engine: discover -> transcribe -> load + phonemize -> quantize -> similar -> index ->
phoneme durations (a small aligner trained on the dataset itself, prepare/align.py).

Work is done per utterance and written atomically (codes, then metadata), so a killed run loses at most the
batch in flight and a rerun skips everything finished. Transcriptions of files without a transcript are cached
in `transcripts/` for the same reason. Audio loading and phonemization run in worker processes; quantization
runs batched in this process on the codec's device (the GPU when there is one). A file that cannot be used
is skipped with its reason, never fatal. `--shard i/n` keeps the utterances whose id hashes to i, so several
machines can split one corpus; `merge_datasets` joins their outputs.

Nothing here prints: progress goes to a callback `(stage, done, total)`, the result is a `PrepareReport`.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import json
import multiprocessing
import os
import signal
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from valle_cli.data.dataset import (
    Utterance,
    finished_utterances,
    is_done,
    utterance_paths,
    write_index,
    write_utterance,
)
from valle_cli.errors import DatasetError, ValleError
from valle_cli.fsutil import atomic_path, lock_folder, remove_stale_temporaries
from valle_cli.prepare.discover import Source, discover
from valle_cli.prepare.similar import code_embedding, top_k_similar

Progress = Callable[[str, int, int], None]
SEGMENT_PAD = 0.15  # seconds of context kept around a transcriber segment when cutting long recordings


@dataclass
class PrepareOptions:
    voices: Path
    output: Path
    codec: object  # CodecConfig
    language: str = "en"
    languages: dict[str, str] = field(default_factory=dict)
    transcriber: str = "whisper"
    min_duration: float = 0.5
    max_duration: float = 20.0
    workers: int = 2
    batch_size: int = 16
    shard: tuple[int, int] | None = None
    top_k: int = 8
    device: str = "auto"
    align_steps: int | None = None  # phoneme aligner's training steps (prepare/align.py): None = by the
    # dataset's size, 0 = no durations


@dataclass
class Job:
    """One utterance to make: a whole file or a span of it."""

    source: Source
    uid: str
    text: str | None
    start: float = 0.0
    end: float | None = None


@dataclass
class Loaded:
    job: Job
    wav: np.ndarray | None
    phonemes: str = ""
    reason: str | None = None


@dataclass
class PrepareReport:
    output: Path
    utterances: int = 0
    seconds: float = 0.0
    speakers: int = 0
    groups: int = 0
    new: int = 0
    resumed: int = 0
    elapsed: float = 0.0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (source or uid, reason)
    hdf5: Path | None = None
    hours_per_speaker: dict[str, float] = field(default_factory=dict)
    alignment: dict | None = None  # the aligner's summary: aligned, unaligned, seconds, loss

    def to_dict(self) -> dict:
        d = asdict(self)
        d["output"], d["hdf5"] = str(self.output), str(self.hdf5) if self.hdf5 else None
        return d


def in_shard(uid: str, shard: tuple[int, int] | None) -> bool:
    if shard is None:
        return True
    i, n = shard
    return zlib.crc32(uid.encode("utf-8")) % n == i


def parse_shard(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise DatasetError(f"bad --shard {text!r}", "use i/n with 0 <= i < n, e.g. --shard 0/4") from None
    if not 0 <= i < n:
        raise DatasetError(f"bad --shard {text!r}: need 0 <= i < n", "e.g. --shard 0/4 ... --shard 3/4")
    return i, n


# -- settings check: a rerun must use the same codec ------------------------------------------------------------


def _check_settings(output: Path, settings: dict) -> None:
    path = output / "prepare.json"
    if path.is_file():
        old = json.loads(path.read_text())
        for key in ("codec", "symbols_version"):
            if old.get(key) != settings.get(key):
                raise DatasetError(
                    f"{output} was prepared with {key} {old.get(key)}, not {settings.get(key)}",
                    "use the same settings to resume, or a new output folder",
                )
    output.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, DatasetError) as tmp:
        Path(tmp).write_text(json.dumps(settings, indent=1))


# -- transcription ------------------------------------------------------------------------------------------

TRANSCRIBE_WINDOW = 600.0  # seconds of a long recording decoded and transcribed at a time
WINDOW_MARGIN = 30.0  # segments ending this close to a window's end are redone in the next window


def transcribe_file(
    transcriber, path: Path, language: str, window: float = TRANSCRIBE_WINDOW, margin: float = WINDOW_MARGIN
) -> list[dict]:
    """Segments ({start, end, text}, seconds in the file) of one recording, in windows of `window` seconds so
    that an hours-long file costs one window's memory. A window keeps only the segments that end `margin`
    seconds before its end; the next one starts where the last kept segment ended, so no utterance is cut at a
    window's edge."""
    from valle_cli.audio.io import audio_seconds, load_audio

    total = audio_seconds(path)
    if total <= window:
        segs = transcriber.transcribe(load_audio(path, 16_000), 16_000, language)
        return [{"start": float(s.start), "end": float(s.end), "text": s.text.strip()} for s in segs]
    out: list[dict] = []
    t = 0.0
    while t < total:
        end = min(total, t + window)
        wav = load_audio(path, 16_000, start=t, end=end, allow_silent=True)
        segs = [
            (t + float(s.start), t + float(s.end), s.text.strip())
            for s in transcriber.transcribe(wav, 16_000, language)
        ]
        last = end >= total
        keep = segs if last else [seg for seg in segs if seg[1] <= end - margin]
        out += [{"start": a, "end": b, "text": text} for a, b, text in keep]
        if last:
            break
        t = max(keep[-1][1], t + 1.0) if keep else end - margin
    return out


def _transcribe(
    sources: list[Source],
    opts: PrepareOptions,
    sample_rate: int,
    progress: Progress,
    skipped: list[tuple[str, str]],
) -> list[Job]:
    """Jobs for every source; files without transcripts are transcribed (cached) and cut at segments."""
    jobs: list[Job] = []
    todo = [s for s in sources if s.text is None]
    transcriber = None
    if todo:
        progress("transcribe", 0, len(todo))
    for n, src in enumerate(todo):
        cache = opts.output / "transcripts" / f"{src.uid}.json"
        if cache.is_file():
            segments = json.loads(cache.read_text(encoding="utf-8"))
        else:
            if transcriber is None:
                from valle_cli.transcribe import build_transcriber

                try:
                    transcriber = build_transcriber(opts.transcriber)
                except ValleError as exc:  # say why a transcriber is needed at all, and the way around it
                    missing = sum(
                        not (opts.output / "transcripts" / f"{t.uid}.json").is_file() for t in todo[n:]
                    )
                    raise DatasetError(
                        f"{missing} file(s) have no transcript (the first: {src.path}), and {exc.message}",
                        f"{exc.remedy}; or put each file's transcript beside it ({src.path.stem}.txt)"
                        if exc.remedy
                        else f"put each file's transcript beside it ({src.path.stem}.txt)",
                    ) from None
            try:
                segments = transcribe_file(transcriber, src.path, src.language)
            except ValleError as exc:
                skipped.append((str(src.path), exc.message))
                continue
            except ValueError as exc:  # e.g. a transcriber that does not know the language
                skipped.append((str(src.path), f"transcriber: {exc}"))
                continue
            cache.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(cache, DatasetError) as tmp:
                Path(tmp).write_text(json.dumps(segments, ensure_ascii=False), encoding="utf-8")
        progress("transcribe", n + 1, len(todo))
        segments = [s for s in segments if s["text"]]
        if not segments:
            skipped.append((str(src.path), "the transcriber found no speech"))
            continue
        for k, seg in enumerate(segments):
            prev_end = segments[k - 1]["end"] if k else 0.0
            next_start = segments[k + 1]["start"] if k + 1 < len(segments) else None
            start = max(prev_end + (seg["start"] - prev_end) / 2, seg["start"] - SEGMENT_PAD, 0.0)
            end = seg["end"] + SEGMENT_PAD
            if next_start is not None:
                end = min(end, seg["end"] + (next_start - seg["end"]) / 2)
            uid = src.uid if len(segments) == 1 else f"{src.uid}__{k:03d}"
            jobs.append(Job(src, uid, seg["text"], start, end))
    for src in sources:
        if src.text is not None:
            if src.text.strip():
                jobs.append(Job(src, src.uid, src.text))
            else:
                skipped.append((str(src.path), f"its transcript ({src.text_from}) is empty"))
    return sorted(jobs, key=lambda j: j.uid)


# -- loading (in worker processes) ------------------------------------------------------------------------------


def _load(job: Job, sample_rate: int, min_duration: float, max_duration: float) -> Loaded:
    """Decode one utterance (only its span of the file), after checking its length from the header."""
    from valle_cli.audio.io import audio_seconds, load_audio
    from valle_cli.text import phonemize

    try:
        total = audio_seconds(job.source.path)
        seconds = min(total, job.end if job.end is not None else total) - job.start
        if seconds < min_duration or seconds > max_duration:
            return Loaded(
                job,
                None,
                reason=f"{seconds:.2f} s is outside the duration range [{min_duration}, {max_duration}] s",
            )
        wav = load_audio(job.source.path, sample_rate, start=job.start, end=job.end)
    except ValleError as exc:
        return Loaded(job, None, reason=exc.message)
    try:
        ipa = phonemize(job.text or "", job.source.language)
    except ValleError as exc:
        return Loaded(job, None, reason=exc.message)
    return Loaded(job, wav, ipa)


def _load_all(jobs: list[Job], opts: PrepareOptions, sample_rate: int) -> Iterator[Loaded]:
    args = (sample_rate, opts.min_duration, opts.max_duration)
    if opts.workers <= 1 or len(jobs) < 8:
        for job in jobs:
            yield _load(job, *args)
        return
    ctx = multiprocessing.get_context("spawn")  # no fork of a process holding torch threads
    # Workers start during the first submits. Ctrl-C and SIGTERM stay blocked until then: a worker inherits
    # the block, so no signal reaches it before its initializer ignores them (CPython's resource tracker does
    # the same), and a signal cannot land inside the pool's bookkeeping of a half-started worker.
    stop = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop)
    try:
        pool = cf.ProcessPoolExecutor(opts.workers, mp_context=ctx, initializer=_worker_setup)
        window = opts.workers * 8  # bounded read-ahead: memory stays flat whatever the corpus size
        futures: list[cf.Future] = []
        it = iter(jobs)
        for job in it:
            futures.append(pool.submit(_load, job, *args))
            if len(futures) >= window:
                break
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, stop)  # a signal that came meanwhile is delivered here
    try:
        while futures:
            yield futures.pop(0).result()
            nxt = next(it, None)
            if nxt is not None:
                futures.append(pool.submit(_load, nxt, *args))
    finally:  # an interruption or an error: queued loads are dropped, not finished first
        pool.shutdown(wait=True, cancel_futures=True)


def _worker_setup() -> None:
    """A loader worker leaves Ctrl-C and SIGTERM to the main process, which reaches the whole group from a
    terminal, `timeout` or a scheduler: the main process stops the pool. A worker killed mid-reply would leave
    half a message in the result pipe, which the pool then waits on for ever; one interrupted would print a
    traceback of its own. A worker whose main process is gone (kill -9) exits by itself."""
    import threading

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    parent = os.getppid()

    def orphaned() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=orphaned, name="valle-orphan-check", daemon=True).start()


# -- the whole run ----------------------------------------------------------------------------------------------


def prepare(
    opts: PrepareOptions, progress: Progress | None = None, report: PrepareReport | None = None
) -> PrepareReport:
    """Prepare a dataset; one process at a time per output folder (a second is refused). `report`: filled
    in as the work goes (what an interruption has kept: `resumed + new` utterances)."""
    from valle_cli.prepare.discover import check_voices_folder

    check_voices_folder(opts.voices)  # a typo in the path is named before any folder is made or codec loaded
    fresh = not opts.output.exists()
    try:
        with lock_folder(opts.output, "valle prepare", DatasetError):
            return _prepare(opts, progress, report or PrepareReport(output=opts.output))
    except BaseException:
        if fresh:
            _remove_if_unused(opts.output)
        raise


def _remove_if_unused(folder: Path) -> None:
    """A failed first run leaves no output folder behind, unless it wrote something worth keeping."""
    import shutil

    own = {".lock", "prepare.json"}  # the lock and the settings: nothing a rerun would not write again
    files = [p for p in folder.rglob("*") if not p.is_dir() and p.name not in own] if folder.is_dir() else [1]
    if not files:
        shutil.rmtree(folder, ignore_errors=True)


def _prepare(opts: PrepareOptions, progress: Progress | None, report: PrepareReport) -> PrepareReport:
    import torch

    from valle_cli import __version__
    from valle_cli.codecs.base import build_codec
    from valle_cli.text import default_symbol_map

    progress = progress or (lambda *_: None)
    t0 = time.time()
    sources = list(discover(opts.voices, opts.language, opts.languages, report.skipped))
    if not sources:
        raise DatasetError(
            f"no audio files under {opts.voices}", "lay audio out as voices/{group}/{speaker}/*.wav"
        )
    codec = build_codec(opts.codec, device=opts.device)
    symbols = default_symbol_map()
    codec_info = {**codec.describe(), "bandwidth": opts.codec.bandwidth, "path": opts.codec.path}
    if opts.codec.options:  # the codec's own settings (codec.options): tokens decode only with the same ones
        codec_info["options"] = dict(opts.codec.options)
    _check_settings(
        opts.output, {"codec": codec_info, "symbols_version": symbols.version, "created_by": __version__}
    )
    remove_stale_temporaries(opts.output)  # half-written files of a killed earlier run (we hold the lock)

    jobs = _transcribe(sources, opts, codec.sample_rate, progress, report.skipped)
    jobs = [j for j in jobs if in_shard(j.uid, opts.shard)]
    todo = [j for j in jobs if not is_done(opts.output, j.uid)]
    report.resumed = len(jobs) - len(todo)

    batch: list[Loaded] = []

    def flush() -> None:
        wavs = [torch.from_numpy(item.wav) for item in batch]
        codes = codec.encode_list(wavs, batch_size=opts.batch_size)
        for item, c in zip(batch, codes, strict=True):
            utt = Utterance(
                uid=item.job.uid,
                group=item.job.source.group,
                speaker=item.job.source.speaker,
                language=item.job.source.language,
                text=item.job.text or "",
                phonemes=item.phonemes,
                duration=round(item.wav.size / codec.sample_rate, 4),
                frames=int(c.shape[-1]),
                source=str(item.job.source.path),
                start=round(item.job.start, 3),
                end=None if item.job.end is None else round(item.job.end, 3),
            )
            write_utterance(opts.output, utt, c.numpy().astype(np.uint16))
            report.new += 1
        batch.clear()

    if todo:
        progress("encode", 0, len(todo))
    with contextlib.closing(_load_all(todo, opts, codec.sample_rate)) as loaded:  # its pool stops here
        for n, item in enumerate(loaded):
            if item.wav is None:
                report.skipped.append(
                    (str(item.job.source.path) + _span(item.job), item.reason or "unusable")
                )
            else:
                batch.append(item)
                if len(batch) >= opts.batch_size:
                    flush()
            progress("encode", n + 1, len(todo))
    if batch:
        flush()

    # Only what the voices folder still holds: utterances of files removed since an earlier run stay on disk
    # but leave the index.
    wanted = {j.uid for j in jobs}
    utts = [u for u in finished_utterances(opts.output) if u.uid in wanted]
    if not utts:
        _write_report(opts.output, report)
        raise DatasetError(
            f"no usable utterances in {opts.voices} ({len(report.skipped)} skipped)",
            f"see {opts.output / 'report.json'} for the reasons",
        )
    _fill_similar(opts.output, utts, codec.codebook_size, opts.top_k, progress)
    header = {"codec": codec_info, "created_by": f"valle {__version__}", "shard": list(opts.shard or [])}
    write_index(opts.output, utts, header, symbols)
    if opts.align_steps is None or opts.align_steps > 0:
        from valle_cli.prepare.align import align_dataset

        report.alignment = align_dataset(opts.output, steps=opts.align_steps, progress=progress)
    _summarize(report, utts)
    report.elapsed = time.time() - t0
    _write_report(opts.output, report)
    return report


def _span(job: Job) -> str:
    return "" if job.end is None else f" [{job.start:.2f}-{job.end:.2f} s]"


def _fill_similar(root: Path, utts: list[Utterance], codebook_size: int, k: int, progress: Progress) -> None:
    """Top-k similar utterances of the same speaker; rewrites a metadata file only when its list changed."""
    by_speaker: dict[str, list[int]] = {}
    for i, u in enumerate(utts):
        by_speaker.setdefault(f"{u.group}/{u.speaker}", []).append(i)
    done = 0
    progress("similar", 0, len(utts))
    for members in by_speaker.values():
        emb = np.stack(
            [code_embedding(np.load(utterance_paths(root, utts[i].uid)[0]), codebook_size) for i in members]
        )
        best = top_k_similar(emb, k)
        for row, i in enumerate(members):
            similar = [utts[members[j]].uid for j in best[row]]
            if utts[i].similar != similar:
                utts[i].similar = similar
                with atomic_path(utterance_paths(root, utts[i].uid)[1], DatasetError) as tmp:
                    Path(tmp).write_text(utts[i].to_json(), encoding="utf-8")
        done += len(members)
        progress("similar", done, len(utts))


def _summarize(report: PrepareReport, utts: Iterable[Utterance]) -> None:
    speakers: dict[str, float] = {}
    groups = set()
    for u in utts:
        report.utterances += 1
        report.seconds += u.duration
        key = f"{u.group}/{u.speaker}"
        speakers[key] = speakers.get(key, 0.0) + u.duration / 3600
        groups.add(u.group)
    report.speakers, report.groups = len(speakers), len(groups)
    report.hours_per_speaker = dict(sorted(speakers.items()))


def _write_report(root: Path, report: PrepareReport) -> None:
    root.mkdir(parents=True, exist_ok=True)
    with atomic_path(root / "report.json", DatasetError) as tmp:
        Path(tmp).write_text(json.dumps(report.to_dict(), indent=1, ensure_ascii=False), encoding="utf-8")
