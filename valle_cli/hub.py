"""Model files from the Hugging Face hub: cache first, network second, a clear message when offline.

huggingface_hub retries for ~25 s before giving up without a network; we look at the cache first and check
that the hub's host resolves before trying, so an offline machine gets its answer at once. `HF_HUB_OFFLINE=1`
is honoured.

huggingface_hub reads its cache location (`HF_HUB_CACHE`, `HF_HOME`, ...) once, when it is imported. We read
the same variables, in the same order, each time we are called and pass the folder explicitly, so the cache a
call uses is the one the environment names at that moment (a test, or a program that sets `HF_HOME` after
something imported huggingface_hub, gets what it asked for).

`parse_hub_id` says whether a string has the shape of a hub id (`owner/name`, optionally `@revision`); the
caller decides first whether it is a local path, which always wins.
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path

_PART = r"[A-Za-z0-9_\-][A-Za-z0-9_.\-]*"
_HUB_ID = re.compile(rf"^(?P<repo>{_PART}/{_PART})(?:@(?P<revision>[A-Za-z0-9_.\-]+))?$")
_FILE_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")  # a missing file, not a repo name


class HubOffline(OSError):
    """Not in the cache, and the hub cannot be reached."""


def online(host: str | None = None) -> bool:
    """Whether the hub can be asked: not in huggingface_hub's offline mode (`HF_HUB_OFFLINE`, read now, with
    its own truthy values), and the host of `HF_ENDPOINT` (a mirror) or huggingface.co resolves."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE"):
        return False
    if host is None:
        from urllib.parse import urlparse

        endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
        host = urlparse(endpoint).hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return False
    return True


def cache_dir() -> Path:
    """The hub cache folder the environment names now (huggingface_hub's own order of variables)."""
    env = os.environ
    folder = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
    if not folder:
        home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
        folder = os.path.join(home, "hub")
    return Path(os.path.expandvars(os.path.expanduser(folder)))


def parse_hub_id(text: str) -> tuple[str, str | None] | None:
    """("owner/name", revision or None) when `text` has the shape of a hub id, else None.

    Letters, digits, `-`, `_` and `.` only, exactly one slash, no leading `.` or `/`, no `..` or `--`, and not
    ending like a model file (`runs/m.safetensors` that does not exist is a missing file, not a repo).
    """
    m = _HUB_ID.match(text)
    if m is None:
        return None
    repo = m["repo"]
    if ".." in repo or "--" in repo or repo.lower().endswith(_FILE_SUFFIXES):
        return None
    return repo, m["revision"]


def cached_snapshot(
    repo_id: str, revision: str | None = None, allow_patterns: list[str] | None = None
) -> Path | None:
    """The local snapshot folder of a hub repo if it is cached, else None. Never touches the network."""
    from huggingface_hub import snapshot_download

    try:
        found = snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=cache_dir(),
            allow_patterns=allow_patterns,
            local_files_only=True,
        )
    except Exception:
        return None
    return Path(found)


def download(repo_id: str, revision: str | None = None, allow_patterns: list[str] | None = None) -> Path:
    """Download (or update) a hub repo into the cache. Raises `HubOffline` at once when the hub is unreachable,
    and huggingface_hub's own errors (`RepositoryNotFoundError`, `RevisionNotFoundError`, ..., all `OSError`s)
    when the download fails."""
    from huggingface_hub import snapshot_download

    if not online():
        raise HubOffline(f"{repo_id} is not in the Hugging Face cache and the hub cannot be reached")
    return Path(
        snapshot_download(repo_id, revision=revision, cache_dir=cache_dir(), allow_patterns=allow_patterns)
    )


def snapshot(repo_id: str, revision: str | None = None, allow_patterns: list[str] | None = None) -> Path:
    """A hub repo's files, from the cache or downloaded (errors as `download`)."""
    found = cached_snapshot(repo_id, revision, allow_patterns)
    return found if found is not None else download(repo_id, revision, allow_patterns)
