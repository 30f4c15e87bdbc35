"""The generation queue: one worker thread runs the model (one job at a time, as a CPU or one GPU wants), at
most `size` jobs wait or run, and a job gets `timeout` seconds in all.

- Full: `submit` raises `QueueFull` at once (the API answers 429 with Retry-After), so a burst never piles up
  memory or latency.
- Timeout or client gone: the job's `cancelled` flag is set; a job still waiting is skipped, a running one
  stops at its next check (between batches of segments, or between streamed chunks) and its slot is freed
  only then, so the bound holds for the work really in flight.
- Closed (server stopping): new jobs get `QueueClosed` (503).
- Batched (`run_batched`): jobs with the same key that wait together run as one call of their function on
  the worker (up to `max_batch` of them: the first waiting one and the next ones with its key), which returns
  one result or exception per job. A step then reads the weights once for the whole batch: that pays where a
  step is bound by reading them (an AR step; a GPU), not where it is bound by arithmetic (on 2 CPU cores 8
  waiting requests made 1.3-1.8x the audio per second of one: docs/benchmarks.md, "valle serve under
  load"). A batched job that times out or is abandoned while it runs keeps its slot until the batch ends; the
  batch stops early only when every job in it was cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any


class QueueFull(Exception):
    pass


class QueueClosed(Exception):
    pass


class Cancelled(Exception):
    """Raised inside a job when its client left or its time ran out."""


class Stopping(Exception):
    """Raised to a streamed response whose job was cancelled because the server is stopping: the response is
    cut (the client sees an unfinished body), and the server's log says so in one line (server.py)."""


class Job:
    def __init__(self):
        self.cancelled = threading.Event()

    def check(self) -> None:
        """Call between units of work: stops a job nobody waits for any more."""
        if self.cancelled.is_set():
            raise Cancelled()


# fn(jobs, items) -> one result or exception per item, in order
BatchFn = Callable[[list[Job], list[Any]], list[Any]]


@dataclass(eq=False)
class _Waiting:
    """A batchable job waiting for the worker, and the future its request awaits."""

    job: Job
    key: Any
    item: Any
    fn: BatchFn
    done: asyncio.Future
    loop: asyncio.AbstractEventLoop


class JobQueue:
    """`before_job`, when given, runs on the worker thread before each job (the thread count of a CPU
    server: valle_cli/threads.py, read again per job since other programs come and go). `max_batch`: the most
    jobs one batched call takes."""

    def __init__(
        self, size: int, timeout: float, before_job: Callable[[], Any] | None = None, max_batch: int = 8
    ):
        self.size, self.timeout, self.before_job = size, timeout, before_job
        self.max_batch = max(1, max_batch)
        self._waiting: list[_Waiting] = []  # batchable jobs not yet taken by the worker, oldest first
        self.batches: list[int] = []  # how many jobs each batched call took (the last 1000)
        self.batch_calls = self.batched_jobs = 0  # batched calls run, and the jobs they took, in all
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="valle-generate")
        self._lock = threading.Lock()
        self._in_flight = 0
        self._closed = False
        self._jobs: set[Job] = set()  # claimed and not yet released: cancelled all at once by close()
        self.served = 0
        self.rejected = 0

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def closed(self) -> bool:
        return self._closed

    def _claim(self) -> Job:
        with self._lock:
            if self._closed:
                raise QueueClosed()
            if self._in_flight >= self.size:
                self.rejected += 1
                raise QueueFull()
            self._in_flight += 1
            job = Job()
            self._jobs.add(job)
        return job

    def _release(self, job: Job) -> None:
        """Free a job's slot (once: the worker's end and a cancelled-before-start callback may both call)."""
        with self._lock:
            if job in self._jobs:
                self._jobs.discard(job)
                self._in_flight -= 1

    def _wrap(self, job: Job, fn: Callable[[Job], Any]) -> Callable[[], Any]:
        def run():
            try:
                job.check()  # timed out or abandoned while waiting: skip
                if self.before_job is not None:
                    self.before_job()
                return fn(job)
            finally:
                self._release(job)

        return run

    async def run(self, fn: Callable[[Job], Any]) -> Any:
        """Run fn(job) on the worker; its result, or TimeoutError (the job is cancelled)."""
        job = self._claim()
        future = asyncio.get_running_loop().run_in_executor(self._executor, self._wrap(job, fn))
        future.add_done_callback(_retrieve)
        try:
            result = await asyncio.wait_for(asyncio.shield(future), self.timeout)
        except BaseException:  # timeout, or the request itself was cancelled (client gone)
            job.cancelled.set()
            if future.cancelled():  # never started: close() dropped it from the worker's queue
                self._release(job)
                raise Cancelled() from None
            raise
        self.served += 1
        return result

    async def run_batched(self, key: Any, item: Any, fn: BatchFn) -> Any:
        """Run `item` through fn(jobs, items) on the worker, together with the other jobs of the same `key`
        waiting then (see the module); its result, or its exception, or TimeoutError (the job is cancelled)."""
        job = self._claim()
        loop = asyncio.get_running_loop()
        entry = _Waiting(job, key, item, fn, loop.create_future(), loop)
        entry.done.add_done_callback(_retrieve)  # an answer nobody awaits any more is not an error
        with self._lock:
            self._waiting.append(entry)
        try:
            self._executor.submit(self._drain)  # one drain per job: a later one may find its job taken
        except RuntimeError:  # closed between the claim and now
            self._unqueue(entry)
            self._release(job)
            raise QueueClosed() from None
        try:
            result = await asyncio.wait_for(asyncio.shield(entry.done), self.timeout)
        except BaseException:  # timeout, the request cancelled (client gone), or close() dropped it
            job.cancelled.set()
            if self._unqueue(entry):  # never started: its slot is free now
                self._release(job)
            raise
        self.served += 1
        return result

    def _unqueue(self, entry: _Waiting) -> bool:
        with self._lock:
            if entry in self._waiting:
                self._waiting.remove(entry)
                return True
        return False

    def _drain(self) -> None:
        """On the worker: take the oldest waiting batchable job and the next ones with its key, run them."""
        with self._lock:
            if not self._waiting:
                return
            key = self._waiting[0].key
            batch = [e for e in self._waiting if e.key == key][: self.max_batch]
            for e in batch:
                self._waiting.remove(e)
        live = []
        for e in batch:
            if e.job.cancelled.is_set():  # abandoned while it waited
                self._release(e.job)
                _settle(e, Cancelled())
            else:
                live.append(e)
        if not live:
            return
        self.batches = [*self.batches[-999:], len(live)]
        self.batch_calls += 1
        self.batched_jobs += len(live)
        try:
            if self.before_job is not None:
                self.before_job()
            results = live[0].fn([e.job for e in live], [e.item for e in live])
            if len(results) != len(live):
                raise RuntimeError(f"a batch of {len(live)} jobs returned {len(results)} results")
        except BaseException as exc:  # the whole call failed: every job hears it
            results = [exc] * len(live)
        finally:
            for e in live:
                self._release(e.job)
        for e, result in zip(live, results, strict=True):
            _settle(e, result)

    def stream(self, fn: Callable[[Job], Iterator[Any]]):
        """Start a generator fn(job) on the worker now (QueueFull/QueueClosed raise here, before any response)
        and return an async generator of its items. Leaving it early (client gone) or running past the timeout
        cancels the job."""
        job = self._claim()
        loop = asyncio.get_running_loop()
        items: asyncio.Queue = asyncio.Queue()

        def produce(job: Job) -> None:
            try:
                for item in fn(job):
                    job.check()
                    loop.call_soon_threadsafe(items.put_nowait, ("item", item))
                loop.call_soon_threadsafe(items.put_nowait, ("end", None))
            except BaseException as exc:  # delivered to the consumer, raised there
                loop.call_soon_threadsafe(items.put_nowait, ("error", exc))

        def dropped(future) -> None:  # never started: close() dropped it from the worker's queue
            if future.cancelled():
                self._release(job)
                items.put_nowait(("error", Cancelled()))

        future = loop.run_in_executor(self._executor, self._wrap(job, produce))
        future.add_done_callback(_retrieve)
        future.add_done_callback(dropped)
        return self._consume(job, items, loop.time() + self.timeout)

    async def _consume(self, job: Job, items: asyncio.Queue, deadline: float):
        loop = asyncio.get_running_loop()
        try:
            while True:
                left = deadline - loop.time()
                if left <= 0:
                    raise TimeoutError()
                kind, value = await asyncio.wait_for(items.get(), left)
                if kind == "end":
                    self.served += 1
                    return
                if kind == "error":
                    if isinstance(value, Cancelled) and self._closed:
                        raise Stopping() from None
                    raise value
                yield value
        finally:
            job.cancelled.set()  # a no-op when it finished; otherwise the worker stops at its next check

    def close(self) -> None:
        """Refuse new jobs and cancel every job waiting or running (each stops at its next check), so a
        stopping server does not wait for long generations."""
        with self._lock:
            self._closed = True
            jobs = list(self._jobs)
            waiting, self._waiting = self._waiting, []
        for job in jobs:
            job.cancelled.set()
        for e in waiting:  # batchable jobs no worker took: answered now (503)
            self._release(e.job)
            _settle(e, Cancelled())
        self._executor.shutdown(wait=False, cancel_futures=True)


def _settle(entry: _Waiting, result: Any) -> None:
    """Hand a batched job's result (or exception) to the request awaiting it, on its event loop."""

    def put() -> None:
        if entry.done.done():  # the request gave up (timeout, client gone)
            return
        if isinstance(result, BaseException):
            entry.done.set_exception(result)
        else:
            entry.done.set_result(result)

    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting
        entry.loop.call_soon_threadsafe(put)


def _retrieve(future) -> None:
    """Mark a worker future's outcome as seen (a cancelled job's exception is expected, not news)."""
    if not future.cancelled():
        future.exception()
