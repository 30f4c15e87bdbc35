"""The plugin registry: codecs, backbones, transcribers and models found through Python entry points.

Built-in plugins are declared in valle's own pyproject.toml under the same entry-point groups that outside
packages use, so there is exactly one way in. Listing plugins reads distribution metadata only (no imports, no
torch); a plugin's module is imported when it is first used. A plugin that fails to import is reported by
`valle plugins` and raises a `PluginError` when used; it never breaks the listing.

Tests and embedders can add or hide plugins for a block of code with `overridden()`.
"""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from typing import Any

from valle_cli.errors import PluginError

GROUPS: dict[str, str] = {
    "codec": "valle.codecs",
    "backbone": "valle.backbones",
    "transcriber": "valle.transcribers",
    "model": "valle.models",  # trained models shipped as packages: a function returning the model file's path
}


@dataclass(frozen=True)
class PluginInfo:
    """One registered plugin, as declared (nothing imported)."""

    kind: str  # "codec" | "backbone" | "transcriber" | "model"
    name: str  # the key used in configs
    target: str  # "module:attr"
    distribution: str
    version: str


@dataclass(frozen=True)
class PluginStatus:
    info: PluginInfo
    loads: bool
    error: str | None


# Objects registered in-process (by tests or embedders); they shadow entry points of the same name.
_overrides: dict[str, dict[str, Any]] = {kind: {} for kind in GROUPS}
_hidden: dict[str, set[str]] = {kind: set() for kind in GROUPS}


def _check_kind(kind: str) -> str:
    if kind not in GROUPS:
        raise PluginError(f"unknown plugin kind {kind!r}", f"use one of: {', '.join(GROUPS)}")
    return GROUPS[kind]


def discover(kind: str) -> dict[str, list[PluginInfo]]:
    """All declared plugins of a kind, by name (a name can be claimed by more than one distribution)."""
    group = _check_kind(kind)
    found: dict[str, list[PluginInfo]] = {}
    seen: set[tuple[str, str, str]] = set()
    for dist in metadata.distributions():
        for ep in dist.entry_points:
            if ep.group != group:
                continue
            dname = dist.metadata["Name"] or "?"
            key = (ep.name, ep.value, dname)
            if key in seen:  # the same distribution found twice on sys.path
                continue
            seen.add(key)
            found.setdefault(ep.name, []).append(
                PluginInfo(kind, ep.name, ep.value, dname, dist.version or "?")
            )
    for name in _hidden[kind]:
        found.pop(name, None)
    for name in _overrides[kind]:
        found[name] = [PluginInfo(kind, name, "<in-process>", "<in-process>", "-")]
    return dict(sorted(found.items()))


def names(kind: str) -> list[str]:
    """Names of the available plugins of a kind, without importing any of them."""
    return list(discover(kind))


def _import_target(target: str) -> Any:
    module_name, _, attr = target.partition(":")
    obj: Any = __import__(module_name, fromlist=["_"])
    for part in attr.split(".") if attr else []:
        obj = getattr(obj, part)
    return obj


def load(kind: str, name: str) -> Any:
    """Import and return the object a plugin registers (usually a class). Raises `PluginError`."""
    if name in _overrides.get(kind, {}):
        return _overrides[kind][name]
    available = discover(kind)
    if name not in available:
        close = difflib.get_close_matches(name, list(available), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        listing = ", ".join(available) or "none installed"
        raise PluginError(
            f"no {kind} plugin named {name!r}",
            f"{hint}available: {listing}; `valle plugins` lists them and why one may fail to load",
        )
    infos = available[name]
    if len({(i.target, i.distribution) for i in infos}) > 1:
        owners = ", ".join(f"{i.distribution} ({i.target})" for i in infos)
        raise PluginError(
            f"{kind} plugin name {name!r} is claimed by several packages: {owners}",
            "uninstall all but one of them",
        )
    info = infos[0]
    try:
        return _import_target(info.target)
    except Exception as exc:  # a broken plugin must not take the caller down with an obscure traceback
        raise PluginError(
            f"{kind} plugin {name!r} from {info.distribution} {info.version} failed to load: "
            f"{type(exc).__name__}: {exc}",
            f"reinstall or upgrade {info.distribution}, or pick another {kind}",
        ) from exc


def status(kinds: list[str] | None = None) -> list[PluginStatus]:
    """Every plugin of the given kinds with whether it imports, for `valle plugins`."""
    out: list[PluginStatus] = []
    for kind in kinds or list(GROUPS):
        for name, infos in discover(kind).items():
            for info in infos:
                try:
                    in_process = info.target == "<in-process>"
                    obj = load(kind, name) if in_process else _import_target(info.target)
                    if kind == "model":  # the package imports; does its model file exist?
                        from pathlib import Path

                        path = Path(obj() if callable(obj) else obj)
                        if not path.exists():
                            raise FileNotFoundError(f"its model file {path} does not exist")
                    out.append(PluginStatus(info, True, None))
                except Exception as exc:
                    out.append(PluginStatus(info, False, f"{type(exc).__name__}: {exc}"))
    return out


@contextlib.contextmanager
def overridden(kind: str, add: dict[str, Any] | None = None, hide: list[str] | None = None) -> Iterator[None]:
    """Within the block, `add` plugins by name (objects, not entry points) and `hide` declared ones."""
    _check_kind(kind)
    saved_o, saved_h = dict(_overrides[kind]), set(_hidden[kind])
    _overrides[kind].update(add or {})
    _hidden[kind].update(hide or [])
    try:
        yield
    finally:
        _overrides[kind], _hidden[kind] = saved_o, saved_h
