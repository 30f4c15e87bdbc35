"""Loading a trained model for inference, and exporting one to a single file.

A model source is a run folder (its `latest` checkpoint), a `step-*` checkpoint folder, or an exported file
(`.safetensors` or `.pt`). Every one carries its metadata: format version, the resolved config, the symbol map,
the codec it was trained with, training stats, and for LoRA checkpoints the adapter settings and the base model
they adapt. A LoRA checkpoint loads its base, applies the adapters and merges them.

`export_model` writes one file with the weights (optionally cast to fp16/bf16) and that metadata: the merged
model, or with `lora_only` just the adapters (which `load_model` puts beside their base again).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from valle_cli.errors import ValleError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class ModelLoadError(ValleError):
    pass


@dataclass
class Loaded:
    model: torch.nn.Module
    meta: dict
    source: Path


def _read(path: Path) -> tuple[dict, dict]:
    """(state dict, meta) from a checkpoint folder or an export file."""
    p = Path(path)
    if p.is_dir():
        from valle_cli.train.checkpoint import latest

        if not (p / "model.safetensors").is_file():
            found = latest(p)
            if found is None:
                raise ModelLoadError(
                    f"{p} holds no model (no model.safetensors and no step-* checkpoint)",
                    "point at a run folder, a step-* folder or an exported file",
                )
            p = found
        p = p / "model.safetensors"
    if not p.is_file():
        raise ModelLoadError(f"model {p} does not exist", "check the path")
    try:
        if p.suffix == ".pt":
            blob = torch.load(p, map_location="cpu", weights_only=False)
            return blob["state_dict"], blob["meta"]
        from safetensors import safe_open

        with safe_open(str(p), framework="pt") as f:
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
            meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
    except Exception as exc:
        raise ModelLoadError(
            f"{p} cannot be read as a valle model ({type(exc).__name__}); it may be truncated",
            "export or download it again",
        ) from None
    if meta.get("format") != "valle-model":
        raise ModelLoadError(f"{p} is not a valle model (format {meta.get('format')!r})")
    if int(meta.get("version", 99)) > 1:
        raise ModelLoadError(
            f"{p} is model format version {meta.get('version')}; this valle reads 1", "upgrade valle"
        )
    return state, meta


def build_from_meta(meta: dict) -> torch.nn.Module:
    from valle_cli.config import load_config
    from valle_cli.model.valle import VALLE

    cfg = load_config(None, [f"model.{k}={json.dumps(v)}" for k, v in meta["config"]["model"].items()])
    return VALLE(cfg.model, len(meta["symbols"]["symbols"]), int(meta["codec"]["codebook_size"]))


def load_model(source: str | Path, device: str | torch.device = "cpu", merge: bool = True) -> Loaded:
    """A ready-to-run model (eval mode) and its metadata."""
    state, meta = _read(Path(source))
    model = build_from_meta(meta)
    lora = meta.get("lora")
    if lora:
        from valle_cli.model.lora import apply_lora, merge_lora

        base = lora.get("base")
        if not base:
            raise ModelLoadError(
                f"{source} holds LoRA adapters without a base model", "export the merged model"
            )
        base_state, _ = _read(Path(base))
        model.load_state_dict(base_state)
        apply_lora(model, int(lora["rank"]), float(lora["alpha"]), 0.0, list(lora["targets"]))
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or any("lora_" in k for k in missing):
            raise ModelLoadError(f"{source}: its adapters do not fit the base model {base}")
        if merge:
            merge_lora(model)
            meta = {**meta, "lora": None}
    else:
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise ModelLoadError(f"{source}: weights do not fit its own config ({str(exc)[:200]})") from None
    return Loaded(model.to(device).float().eval(), meta, Path(source))


def export_model(
    source: str | Path,
    output: str | Path,
    dtype: str = "fp32",
    fmt: str | None = None,
    lora_only: bool = False,
) -> Path:
    """One file with weights and metadata. `lora_only`: the adapters of a LoRA run, not the merged model."""
    from valle_cli.fsutil import atomic_path

    out = Path(output)
    fmt = fmt or ("pt" if out.suffix == ".pt" else "safetensors")
    if fmt not in ("safetensors", "pt"):
        raise ModelLoadError(f"unknown export format {fmt!r}", "use safetensors or pt")
    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}", "use fp32, fp16 or bf16")
    if lora_only:
        state, meta = _read(Path(source))
        if not meta.get("lora"):
            raise ModelLoadError(f"{source} is not a LoRA run", "drop --lora to export the whole model")
    else:
        loaded = load_model(source, merge=True)
        state, meta = loaded.model.state_dict(), loaded.meta
    state = {k: (v.to(DTYPES[dtype]) if v.is_floating_point() else v).contiguous() for k, v in state.items()}
    meta = {**meta, "dtype": dtype}
    with atomic_path(out, ModelLoadError) as tmp:
        if fmt == "pt":
            torch.save({"state_dict": state, "meta": meta}, tmp)
        else:
            from safetensors.torch import save_file

            save_file(state, tmp, metadata={k: json.dumps(v) for k, v in meta.items()})
    return out
