"""Atomic file writes: write to a temporary file beside the target, then rename it into place.

An interrupted run (kill, full disk, power loss) leaves either the old file or the new one, never half of
one. Temporary files get the permissions a plain `open()` would have given the target (mkstemp's 0600
otherwise), and are removed on failure. A full disk or a permission problem becomes a `ValleError` naming the
file and the remedy.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from valle_cli.errors import ValleError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_safetensors(tensors: dict, path: str | os.PathLike, metadata: dict[str, str]) -> None:
    """safetensors' `save_file`, with the permissions a plain `open()` would give (it writes 0600)."""
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    os.chmod(path, 0o666 & ~_umask())


def write_failure(exc: BaseException) -> str | None:
    """Why a write failed, when `exc` is a failed write, else None. A full disk does not always raise
    OSError: safetensors raises its SafetensorError ("... No space left on device (os error 28)"), torch.save
    a RuntimeError from its zip writer ("enforce fail at inline_container.cc ...") and soundfile a
    LibsndfileError ("System error.")."""
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    text = str(exc)
    if type(exc).__name__ == "LibsndfileError":  # soundfile says only "System error." when a write fails
        return "a failed write (is the disk full?)"
    if type(exc).__name__ == "SafetensorError" or (
        isinstance(exc, RuntimeError) and ("inline_container" in text or "file write failed" in text)
    ):
        if "os error 28" in text or "No space left" in text:
            return "No space left on device"
        if "inline_container" in text:  # torch's zip writer says only "unexpected pos ...": a short write
            return "a short write (is the disk full?)"
        return text.splitlines()[0][:200] if text else type(exc).__name__
    return None


def free_bytes(folder: str | os.PathLike) -> int | None:
    """Free space for an unprivileged writer in `folder` (None if it cannot be asked)."""
    import shutil

    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def check_writable(target: str | os.PathLike, error: type[ValleError] = ValleError) -> None:
    """Raise `error` now if `target` could not be written later (missing folder, a folder, no permission)."""
    p = Path(target)
    folder = p.parent if str(p.parent) else Path(".")
    if p.is_dir():
        raise error(f"cannot write {p}: it is a folder", "give a file name")
    if not folder.is_dir():
        raise error(f"cannot write {p}: folder {folder} does not exist", "create it or pick another path")
    if not os.access(folder, os.W_OK):
        raise error(f"cannot write {p}: no permission to write in {folder}", "pick another path")


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, error: type[ValleError] = ValleError) -> Iterator[str]:
    """Yield a temporary path to write; on success it replaces `target`."""
    p = Path(target)
    folder = p.parent if str(p.parent) else Path(".")
    check_writable(p, error)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise _cannot_write(p, folder, exc.strerror or str(exc), error) from None
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)  # durable before it becomes visible
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, p)
    except Exception as exc:
        reason = write_failure(exc)
        if reason is None:
            raise
        raise _cannot_write(p, folder, reason, error) from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _cannot_write(p: Path, folder: Path, reason: str, error: type[ValleError]) -> ValleError:
    """The error of a failed small write; a full disk says how much is free where."""
    if "No space left" in reason or "disk full" in reason or "quota" in reason.lower():
        free = free_bytes(folder)
        where = f"{free / 2**20:.1f} MB free in {folder}" if free is not None else f"in {folder}"
        with contextlib.suppress(OSError, AttributeError):
            if free and os.statvfs(folder).f_favail == 0:  # space, but no inodes (many small files)
                where = f"no free inodes in {folder}, though {free / 2**20:.1f} MB are free"
        return error(f"cannot write {p}: {reason} ({where})", f"free disk space in {folder}, then rerun")
    return error(f"cannot write {p}: {reason}", "check the folder's permissions and free space")


def lock_folder(folder: str | os.PathLike, what: str, error: type[ValleError] = ValleError):
    """Hold an exclusive lock on `folder` while the returned file stays open (released if the process dies).

    A second process asking for the same folder gets `error` at once instead of writing over the first."""
    import fcntl

    p = Path(folder)
    try:
        p.mkdir(parents=True, exist_ok=True)
        handle = open(p / ".lock", "w")  # noqa: SIM115 - the open file is the lock
    except OSError as exc:
        raise error(
            f"cannot write in {p}: {exc.strerror or exc}", "check the path and its permissions"
        ) from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise error(
            f"another {what} is writing to {p}", "wait for it to finish, or use another output folder"
        ) from None
    return handle


def remove_stale_temporaries(folder: str | os.PathLike) -> int:
    """Delete the temporary files `atomic_path` leaves when its process is killed; returns how many.

    Call it only while holding the folder's lock (`lock_folder`), so no live writer's file is touched."""
    removed = 0
    for tmp in Path(folder).rglob(".*.tmp"):
        if tmp.is_file():
            tmp.unlink(missing_ok=True)
            removed += 1
    return removed
