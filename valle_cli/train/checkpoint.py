"""Checkpoints: `run/step-00001000/` folders written atomically, a `latest` pointer, the last K kept.

A checkpoint folder holds `model.safetensors` (weights, with the format version, config, symbol map and codec
in its metadata), `optimizer.pt` (optimizer, scheduler, grad scaler), `trainer.json` (step, sampler position,
metrics so far), `rng-RANK.pt` (each rank's Python, numpy and torch generator states) and, with DeepSpeed,
`deepspeed/` (its engine state: ZeRO optimizer shards). It is written into a hidden temporary folder and renamed into place, then `latest` (a one-line file naming it) is replaced atomically.
A failed save (a full disk: OSError, safetensors' SafetensorError or torch.save's RuntimeError) removes its
temporary folder, leaves the previous checkpoint and `latest` untouched, and says how much space there is and
how much a checkpoint takes; `remove_staging` clears what a killed save left before the next run starts. Loading checks that every file is there and names what is missing.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from valle_cli.errors import ValleError
from valle_cli.fsutil import atomic_path, free_bytes, write_failure

FORMAT = "valle-checkpoint"
VERSION = 1
SAVE_REMEDY = (
    "free disk space (or lower train.keep_last), then rerun the same command: it resumes from `latest`"
)
FILES = ("model.safetensors", "optimizer.pt", "trainer.json", "rng-0.pt")


class CheckpointError(ValleError):
    pass


def step_dir(run: Path, step: int) -> Path:
    return run / f"step-{step:08d}"


def staging_dir(run: Path, step: int) -> Path:
    """The hidden folder a checkpoint is assembled in before it is renamed into place."""
    return run / f".{step_dir(run, step).name}.tmp"


def write_rng(tmp: Path, rank: int, rng_state: dict) -> None:
    """Each rank saves its own generators (DDP/DeepSpeed ranks draw different random numbers)."""
    torch.save(rng_state, tmp / f"rng-{rank}.pt")


def save_checkpoint(
    run: Path,
    step: int,
    model_state: dict,
    meta: dict,
    optimizer_state: dict,
    trainer_state: dict,
    rng_state: dict,
    keep_last: int = 3,
    staged: bool = False,
) -> Path:
    """Write the checkpoint of `step` and point `latest` at it. With `staged`, the staging folder already
    exists and holds files other ranks or DeepSpeed put there; otherwise it is made afresh."""
    from valle_cli.fsutil import save_safetensors

    final = step_dir(run, step)
    tmp = staging_dir(run, step)
    try:
        if not staged:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        tensors = {k: v.detach().contiguous().cpu() for k, v in model_state.items()}
        save_safetensors(tensors, tmp / "model.safetensors", {k: json.dumps(v) for k, v in meta.items()})
        torch.save(optimizer_state, tmp / "optimizer.pt")
        write_rng(tmp, 0, rng_state)
        (tmp / "trainer.json").write_text(json.dumps({"format": FORMAT, "version": VERSION, **trainer_state}))
        for f in tmp.rglob("*"):
            if f.is_file():
                fd = os.open(f, os.O_RDONLY)
                os.fsync(fd)
                os.close(fd)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except Exception as exc:
        reason = write_failure(exc)
        shutil.rmtree(tmp, ignore_errors=True)
        if reason is None:
            raise
        raise save_failed(run, step, reason) from None
    with atomic_path(run / "latest", CheckpointError) as t:
        Path(t).write_text(final.name + "\n")
    prune(run, keep_last)
    return final


def save_failed(run: Path, step: int, reason: str) -> CheckpointError:
    """The one-line error of a failed save: where, why, the space free and the space a checkpoint takes."""
    free = free_bytes(run)
    previous = latest(run)
    need = sum(f.stat().st_size for f in previous.rglob("*") if f.is_file()) if previous is not None else 0
    if reason.startswith("a short write") and free is not None and free < max(need, 1 << 20):
        reason = "No space left on device"  # the space says what torch's zip writer does not
    space = ""
    if free is not None:
        space = f"; {free / 1e6:.0f} MB free" + (f", a checkpoint takes {need / 1e6:.0f} MB" if need else "")
    return CheckpointError(
        f"saving the checkpoint of step {step} in {run} failed ({reason}){space}; the previous checkpoint is intact",
        SAVE_REMEDY,
    )


def remove_staging(run: Path) -> int:
    """Delete the hidden staging folders (`.step-N.tmp`) of saves that were killed or failed; returns how
    many. Call it only when no other trainer writes to the run (after the control socket is claimed)."""
    removed = 0
    for tmp in Path(run).glob(".step-*.tmp"):
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
            removed += 1
    return removed


def list_checkpoints(run: Path) -> list[Path]:
    return sorted(p for p in run.glob("step-*") if p.is_dir() and not p.name.startswith("."))


def prune(run: Path, keep_last: int) -> None:
    for old in list_checkpoints(run)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def latest(run: Path) -> Path | None:
    pointer = run / "latest"
    if pointer.is_file():
        p = run / pointer.read_text().strip()
        if p.is_dir():
            return p
    found = list_checkpoints(run)
    return found[-1] if found else None


def load_checkpoint(path: Path, rank: int = 0) -> dict:
    """Everything a checkpoint folder holds: model state, meta, optimizer, trainer state, this rank's rng."""
    from safetensors import safe_open

    missing = [f for f in FILES if not (path / f).is_file()]
    if missing:
        raise CheckpointError(
            f"checkpoint {path} lacks {', '.join(missing)}",
            "it is incomplete or damaged; delete it and resume from an earlier step-* folder",
        )
    try:
        with safe_open(str(path / "model.safetensors"), framework="pt") as f:
            model = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
            meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
        trainer = json.loads((path / "trainer.json").read_text())
        optimizer = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False)
        rng_file = path / f"rng-{rank}.pt"
        rng = torch.load(
            rng_file if rng_file.is_file() else path / "rng-0.pt", map_location="cpu", weights_only=False
        )
    except Exception as exc:
        raise CheckpointError(
            f"checkpoint {path} cannot be read ({type(exc).__name__}: {exc}); it may be truncated",
            "delete it and resume from an earlier step-* folder",
        ) from None
    if trainer.get("format") != FORMAT or int(trainer.get("version", 99)) > VERSION:
        raise CheckpointError(f"{path} is not a valle checkpoint this version can read", "upgrade valle")
    return {"model": model, "meta": meta, "optimizer": optimizer, "trainer": trainer, "rng": rng}
