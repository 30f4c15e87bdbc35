"""Model files from the Hugging Face hub: cache first, network second, a clear message when offline.

huggingface_hub retries for ~25 s before giving up without a network; we look at the cache first and check
that the hub's host resolves before trying, so an offline machine gets its answer at once. `HF_HUB_OFFLINE=1`
is honoured.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path


def online(host: str = "huggingface.co") -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return False
    return True


def cached_snapshot(repo_id: str) -> Path | None:
    """The local snapshot folder of a hub repo if it is fully cached, else None."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:
        return None


def snapshot(repo_id: str) -> Path:
    """A hub repo's files, from the cache or downloaded. Raises OSError with the reason when neither works."""
    from huggingface_hub import snapshot_download

    found = cached_snapshot(repo_id)
    if found is not None:
        return found
    if not online():
        raise OSError(f"{repo_id} is not in the Hugging Face cache and the hub cannot be reached")
    return Path(snapshot_download(repo_id))
