"""The `deepspeed` training backend: ZeRO stages 0-2 over torchrun or deepspeed's launcher.

Our config becomes a DeepSpeed config (micro batch, gradient accumulation, clipping, ZeRO stage, bf16/fp16
on GPUs); a user's DeepSpeed JSON (`train.deepspeed_config`) is merged over it, key by key, so anything
DeepSpeed offers can be set. Our optimizer and schedule are handed to DeepSpeed, which steps them. Nothing
compiles: DeepSpeed's fused ops are not needed for ZeRO 0-2 with a torch optimizer, so it starts in seconds,
on CPUs too (gloo). Install with `pip install --no-build-isolation deepspeed` (it builds against your torch).

Across processes, gradients must be reduced in an order every rank agrees on. ZeRO 0 and 1 reduce them after
the backward pass, parameter by parameter in a fixed order (the trainer gives every trainable parameter a
gradient on every rank, used or not). ZeRO 2, and `overlap_comm`, reduce them in buckets filled in the order
the backward pass makes them, and that order depends on the batch: which RVQ level each sample trains picks
the heads it runs. DeepSpeed would then add up slices of different parameters without a word, so those
settings are refused with several processes (`check_reduction`); one process runs them.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from valle_cli.errors import ValleError


def deepspeed_config(cfg) -> dict:
    t = cfg.train
    ours: dict = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": t.grad_accumulation,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": t.zero_stage},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    import torch

    if torch.cuda.is_available():
        from valle_cli.train.trainer import autocast_dtype

        dtype, _ = autocast_dtype(t.precision, torch.device("cuda"))
        if dtype is not None:
            ours["bf16" if dtype == torch.bfloat16 else "fp16"] = {"enabled": True}
    if t.deepspeed_config:
        path = Path(t.deepspeed_config)
        try:
            user = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ValleError(
                f"cannot read train.deepspeed_config {path}: {exc}", "give a DeepSpeed JSON file"
            ) from None
        ours = _merge(ours, user)
    return ours


def check_reduction(ds: dict, world: int) -> None:
    """Refuse gradient reductions whose order would differ between ranks (see the module's docstring)."""
    zero = ds.get("zero_optimization") or {}
    stage = int(zero.get("stage", 0))
    if stage > 2:
        raise ValleError(
            f"ZeRO stage {stage} is not supported (valle's DeepSpeed backend runs stages 0-2)",
            "set zero_optimization.stage to 0, 1 or 2 in train.deepspeed_config",
        )
    if world > 1 and (stage == 2 or zero.get("overlap_comm")):
        what = "ZeRO stage 2" if stage == 2 else "overlap_comm"
        raise ValleError(
            f"{what} across {world} processes would reduce gradients in an order that differs between ranks "
            "(each batch's RVQ levels choose which heads run), and DeepSpeed would add up the wrong ones",
            "use train.zero_stage=1 (optimizer states sharded) or 0 without overlap_comm, or train.backend=ddp; "
            "ZeRO 2 runs in one process",
        )


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def initialize(model, optimizer, scheduler, cfg, world: int = 1):
    """(engine, optimizer, scheduler) from deepspeed.initialize, over `world` processes."""
    ds = deepspeed_config(cfg)
    check_reduction(ds, world)
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if _cuda() else "cpu")
    try:
        import deepspeed
    except ImportError:
        raise ValleError(
            "train.backend=deepspeed needs the deepspeed package",
            "pip install --no-build-isolation 'deepspeed>=0.15,<1' (or pip install -e '.[deepspeed]')",
        ) from None
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    engine, opt, _, sched = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds
    )
    return engine, opt, sched


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
