"""The training engine behind `valle train` (the `local` backend: one process, CPU or one GPU).

A run folder holds `config.yaml` (the resolved config), `metrics.jsonl` (one JSON object per optimizer step
and per evaluation), checkpoints (`step-NNNNNNNN/`, `latest`; see checkpoint.py) and `exports/`. Starting
`valle train` on a run folder that has checkpoints resumes from `latest`: model, optimizer, scheduler, grad
scaler, sampler position and every RNG, so the resumed run continues exactly as the uninterrupted one would.

Each step: draw a batch, give each sample an RVQ level (from `train.level_weights`, uniform by default) or,
with chance `train.stt_prob`, the speech-to-text task (its audio in, its phonemes out: what `valle stt` runs),
forward, backward (gradient accumulation over `train.grad_accumulation` batches), clip, optimizer and
scheduler step. A non-finite loss skips the step with a warning; `MAX_NONFINITE` in a row abort the run with
a checkpoint of the last good state. SIGINT/SIGTERM and the `quit` command save and stop at the next step
boundary. Live commands (`save`, `quit`, `lr VALUE`, `eval`, `export`) arrive through `Commands` (commands.py)
and are applied between steps, here and only here.

No printing: events go to a callback `(kind, payload)`: "step", "eval", "save", "warn", "info", "done"; all but
"step" are also kept in `RUN/train.log` (log.py). Step records carry the process's memory (`mem_cpu`, and
`mem_gpu` on CUDA, in bytes) for `valle tui` and `valle plot`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import shutil
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from valle_cli.config import Config, config_to_dict, dump_config
from valle_cli.errors import ValleError
from valle_cli.train import log as run_log
from valle_cli.train.checkpoint import latest, load_checkpoint, remove_staging, save_checkpoint
from valle_cli.train.commands import Commands

MAX_NONFINITE = 8
Events = Callable[[str, dict], None]


def resident_bytes() -> int:
    """Resident set size of this process (Linux: current; elsewhere: the peak)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


class TrainingError(ValleError):
    pass


def resolve_train_device(name: str) -> torch.device:
    from valle_cli.codecs.base import resolve_device

    return resolve_device(name)


def lr_factor(step: int, warmup: int, total: int, schedule: str) -> float:
    """Linear warmup, then constant or cosine decay to 10% of the peak at `total` steps."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def cpu_has_bf16() -> bool:
    """Whether this CPU computes in bf16 natively: AVX512-BF16 or AMX on x86 (oneDNN's own check says yes for
    any AVX-512, where bf16 is emulated and slower than fp32); on other CPUs, oneDNN's check."""
    import platform

    try:
        if platform.machine().lower() in ("x86_64", "amd64", "i386", "i686"):
            return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def autocast_dtype(precision: str, device: torch.device) -> tuple[torch.dtype | None, str | None]:
    """The autocast dtype `train.precision` means on this device, and a line to say when it is not what was
    asked. bf16 runs under autocast on GPUs and on CPUs with bf16 instructions: there a small-preset step is
    about 1.5x faster than fp32 (docs/benchmarks.md, "Training step"); a CPU without them would emulate it,
    slower than fp32, so it trains in fp32. fp16 needs a GPU (its loss scaling is CUDA's). `auto` is bf16 where
    it is native, else fp32."""
    if precision == "fp32":
        return None, None
    if device.type == "cuda":
        if precision == "auto":
            return (torch.bfloat16, None) if torch.cuda.is_bf16_supported() else (None, None)
        return {"bf16": torch.bfloat16, "fp16": torch.float16}[precision], None
    if device.type != "cpu":
        return None, f"train.precision {precision} runs as fp32 on {device.type}"
    if precision == "fp16":
        return None, "train.precision fp16 needs a GPU: training in fp32 on the CPU (bf16 may be faster here)"
    if cpu_has_bf16():
        return torch.bfloat16, None
    if precision == "auto":
        return None, None
    return (
        None,
        "this CPU has no bf16 instructions (AVX512-BF16 or AMX): training in fp32, which is faster here",
    )


def build_optimizer(params, cfg) -> torch.optim.Optimizer:
    t = cfg.train
    if t.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay)
    if t.optimizer == "adam":
        return torch.optim.Adam(params, lr=t.lr, betas=tuple(t.betas))
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=t.lr, momentum=t.betas[0], weight_decay=t.weight_decay)
    from transformers.optimization import Adafactor

    return Adafactor(params, lr=t.lr, relative_step=False, scale_parameter=False, weight_decay=t.weight_decay)


@dataclass
class RunInfo:
    run: Path
    step: int
    resumed_from: Path | None
    signal: str | None = None  # "SIGINT" or "SIGTERM" when a signal stopped the run (after saving)


class Trainer:
    def __init__(
        self,
        cfg: Config,
        run: Path,
        events: Events | None = None,
        commands: Commands | None = None,
        control: bool = False,
    ):
        from valle_cli.data.dataset import open_dataset
        from valle_cli.data.loader import Sampler, split_indices
        from valle_cli.model.valle import VALLE
        from valle_cli.text.symbols import SymbolMap

        self.cfg, self.run = cfg, Path(run)
        self.events = events or (lambda kind, payload: None)  # the caller's listener; see _event
        self.commands = commands or Commands()
        self.control = control  # serve the control socket (train/control.py) while training, on rank 0
        self.paused = False
        self._paused_seconds = 0.0
        self._last: dict = {}  # the last training record, for `status`
        t = cfg.train
        if not cfg.data.paths:
            raise TrainingError(
                "data.paths is empty", "set it to a dataset made by `valle prepare` (--set data.paths=[DIR])"
            )
        if len(cfg.data.paths) > 1:
            raise TrainingError(
                "training on several datasets at once is not supported yet",
                "join them with `valle dataset merge A B -o C` and train on C",
            )
        self.ds = open_dataset(cfg.data.paths[0])
        codec = self.ds.header["codec"]
        if codec["n_codebooks"] < cfg.model.n_levels:
            raise TrainingError(
                f"the dataset has {codec['n_codebooks']} RVQ levels; model.n_levels is {cfg.model.n_levels}",
                "prepare the data at a higher bandwidth or lower model.n_levels",
            )
        self.symbols = SymbolMap.from_dict(self.ds.header["symbols"])
        from valle_cli.train import distributed

        self.dist = distributed.from_env(t.backend)
        if self.dist.enabled or t.backend == "deepspeed":
            self.device = distributed.setup(self.dist, t.device)
        else:
            self.device = resolve_train_device(t.device)
        torch.manual_seed(t.seed)
        self.model = VALLE(cfg.model, len(self.symbols), int(codec["codebook_size"]), t.loss_weights)
        self.model.input_dropout = t.input_dropout
        self.model.scheduled_sampling = t.scheduled_sampling
        self.model.layer_skip = t.layer_skip  # the config refused backbones that cannot exit early
        if t.guided_attention > 0:
            from valle_cli.backbones.base import Backbone
            from valle_cli.model.valle import GuidedAttention

            if type(self.model.backbone).forward_with_attention is Backbone.forward_with_attention:
                raise TrainingError(
                    f"train.guided_attention needs the backbone's attention, and {cfg.model.backbone} does not "
                    "report it",
                    "set train.guided_attention=0, or use model.backbone=llama, mixtral or transformer",
                )
            if cfg.model.gradient_checkpointing:
                raise TrainingError(
                    "train.guided_attention cannot run with model.gradient_checkpointing (the attention maps "
                    "are computed with another kernel than the recomputation would use)",
                    "set model.gradient_checkpointing=false, or train.guided_attention=0",
                )
            n = cfg.model.n_layers
            layers = tuple(t.guided_attention_layers) or tuple(
                sorted({max(n // 2 - 1, 0), n // 2 if n > 1 else 0})
            )
            if any(not 0 <= k < n for k in layers):
                raise TrainingError(
                    f"train.guided_attention_layers {list(layers)} must lie in 0..{n - 1} (model.n_layers is {n})"
                )
            self.model.guided = GuidedAttention(t.guided_attention, t.guided_attention_sigma, layers)
        if t.init_from:
            self._load_base(Path(t.init_from))
        self.lora: list[str] = []
        if t.lora.rank > 0:
            from valle_cli.model.lora import apply_lora

            self.lora = apply_lora(self.model, t.lora.rank, t.lora.alpha, t.lora.dropout, t.lora.targets)
        if t.init_from or self.lora:  # say what the run starts from and what it trains
            trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
            total = sum(p.numel() for p in self.model.parameters())
            what = [f"weights from {t.init_from}"] if t.init_from else []
            if self.lora:
                what.append(f"LoRA rank {t.lora.rank} (alpha {t.lora.alpha:g}) on {len(self.lora)} layers")
            what.append(f"{trainable:,} of {total:,} parameters trained")
            self._event("info", {"message": "; ".join(what)})
        self.model.to(self.device)
        self.optimizer = build_optimizer([p for p in self.model.parameters() if p.requires_grad], cfg)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, t.warmup_steps, t.steps, t.schedule)
        )
        self.autocast_dtype, note = autocast_dtype(t.precision, self.device)
        if note:
            self._event("info", {"message": note})
        amp16 = self.autocast_dtype == torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=amp16 and self.device.type == "cuda")
        train_idx, self.val_idx = split_indices(self.ds, cfg.data)
        if cfg.model.alignment == "pointer":
            train_idx, self.val_idx = self._aligned_only(train_idx), self._aligned_only(self.val_idx)
        self.sampler = Sampler(
            self.ds, train_idx, cfg.data, seed=t.seed, shard=(self.dist.rank, self.dist.world)
        )
        self.net = self.model  # what forward runs through: the model, its DDP wrapper or DeepSpeed engine
        self.engine = None
        if t.backend == "deepspeed":
            from valle_cli.train.deepspeed_backend import initialize

            self.engine, self.optimizer, self.scheduler = initialize(
                self.model, self.optimizer, self.scheduler, cfg, self.dist.world
            )
            self.net = self.engine
        elif self.dist.enabled:
            self.net = torch.nn.parallel.DistributedDataParallel(
                self.model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=True,  # heads of RVQ levels not drawn in a batch get no gradient
            )
        weights = t.level_weights or [1.0] * cfg.model.n_levels
        self.level_probs = torch.tensor(weights, dtype=torch.float64) / sum(weights)
        self.level_rng = torch.Generator().manual_seed(t.seed + 1)
        self.step = 0
        self.tokens = 0
        self.stop_requested = False
        self._signalled = False
        self._signal: str | None = None  # the first signal's name
        self.quiet_after_signal = (
            False  # `valle train`: a signal after a signal's save exits at once (_again)
        )
        self.resumed_from: Path | None = None

    # -- run folder, checkpoints ------------------------------------------------------------------------------

    def _aligned_only(self, indices):
        """Utterances with phoneme durations (pointer models train on those only)."""
        if not self.ds.has_durations:
            raise TrainingError(
                f"model.alignment=pointer needs phoneme durations, and {self.ds.path} has none",
                f"add them with `valle dataset align {self.ds.path}` (or rerun `valle prepare` with this valle)",
            )
        keep = np.asarray(
            [i for i in indices if self.ds.phoneme_durations(int(i)) is not None], dtype=np.int64
        )
        if len(indices) and not len(keep):
            raise TrainingError(
                f"no utterance of {self.ds.path} has usable phoneme durations (stale after a reindex?)",
                f"realign with `valle dataset align {self.ds.path}`",
            )
        return keep

    def _load_base(self, path: Path) -> None:
        """Start from trained weights: a run folder (its latest checkpoint), a step-* folder or an export."""
        from safetensors.torch import load_file

        if path.is_dir() and not (path / "model.safetensors").is_file():
            found = latest(path)
            if found is None:
                raise TrainingError(
                    f"train.init_from {path} has no checkpoint", "point it at a trained run folder"
                )
            path = found
        file = path / "model.safetensors" if path.is_dir() else path
        if not file.is_file():
            raise TrainingError(
                f"train.init_from {path} does not exist", "point it at a run, checkpoint or export"
            )
        state = load_file(str(file))
        if any("lora_" in k for k in state):
            raise TrainingError(f"{path} holds LoRA adapters only", "point train.init_from at the base model")
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        # an AR model becoming a level0-nar one (or back): the heads that differ start afresh
        swapped = ("pointer_head.", "duration_head.", "length_head.")
        fresh = [k for k in missing if k.startswith(swapped)]
        missing = [k for k in missing if not k.startswith(swapped)]
        unexpected = [k for k in unexpected if not k.startswith(swapped)]
        if fresh and self.cfg.train.lora.rank > 0:
            raise TrainingError(
                f"train.init_from {path} has no {fresh[0].split('.')[0]}, and LoRA would keep it untrained",
                "fine-tune fully first (train.lora.rank=0), then adapt that model with LoRA",
            )
        if fresh:
            self._event(
                "info", {"message": f"train.init_from has no {fresh[0].split('.')[0]}: it starts afresh"}
            )
        if missing or unexpected:
            raise TrainingError(
                f"train.init_from {path} does not fit this model ({len(missing)} missing, {len(unexpected)} "
                f"unexpected tensors, e.g. {(missing or unexpected)[0]})",
                "use the same model section (preset, d_model, n_layers, ...) as the base model",
            )

    def meta(self) -> dict:
        from valle_cli import __version__

        return {
            "format": "valle-model",
            "version": 1,
            "config": self._config_meta(),
            "symbols": self.symbols.to_dict(),
            "codec": self.ds.header["codec"],
            "languages": self.ds.languages,
            "created_by": f"valle {__version__}",
            "stats": {"step": self.step, "tokens": self.tokens},
            "lora": None
            if not self.lora
            else {
                **dataclasses.asdict(self.cfg.train.lora),
                "base": self.cfg.train.init_from,
                "layers": self.lora,
            },
        }

    def _config_meta(self) -> dict:
        """The resolved config for model files. `model.alignment` and `model.level0` are left out when they are
        the classic "none" and "ar", so valle versions from before them still load the models they can run."""
        cfg = config_to_dict(self.cfg)
        if cfg["model"].get("alignment") == "none":
            del cfg["model"]["alignment"]
        if cfg["model"].get("level0") == "ar":
            del cfg["model"]["level0"]
        return cfg

    def _rng_state(self) -> dict:
        return {
            "python": random.getstate(),
            "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
            "levels": self.level_rng.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }

    def save(self) -> Path | None:
        """Write a checkpoint. Collective under torchrun/DeepSpeed: every rank must call it at the same step."""
        from valle_cli.train import distributed
        from valle_cli.train.checkpoint import (
            SAVE_REMEDY,
            CheckpointError,
            save_failed,
            staging_dir,
            write_rng,
        )

        staged = self.dist.enabled or self.engine is not None
        tmp = staging_dir(self.run, self.step)
        error = None
        if staged:
            if self.dist.main:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
            distributed.barrier()
            try:
                if not self.dist.main:
                    write_rng(tmp, self.dist.rank, self._rng_state())
                if self.engine is not None:  # its ZeRO optimizer shards, one set per rank
                    self.engine.save_checkpoint(str(tmp / "deepspeed"), tag="state", save_latest=False)
            except Exception as exc:
                from valle_cli.fsutil import write_failure

                reason = write_failure(exc)
                if reason is None:
                    raise
                error = save_failed(self.run, self.step, reason).message
            distributed.barrier()
        path = None
        if self.dist.main and error is None:
            try:
                path = self._save_main(staged)
            except CheckpointError as exc:
                error = exc.message
        error = distributed.broadcast(error, self.dist) if self.dist.enabled else error
        if error is not None:
            shutil.rmtree(tmp, ignore_errors=True) if self.dist.main else None
            if "previous checkpoint is intact" not in error:
                error += "; the previous checkpoint is intact"
            raise CheckpointError(error, SAVE_REMEDY)
        if path is not None:
            self._event("save", {"step": self.step, "path": str(path)})
        return path

    def _save_main(self, staged: bool) -> Path:
        rng = self._rng_state()
        opt = {
            "optimizer": self.optimizer.state_dict() if self.engine is None else None,
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
        }
        state = {"step": self.step, "tokens": self.tokens, "sampler": self.sampler.state_dict()}
        weights = self.model.state_dict()
        if self.lora:  # adapters only: the base model stays where train.init_from points
            from valle_cli.model.lora import lora_state_dict

            weights = lora_state_dict(self.model)
        path = save_checkpoint(
            self.run,
            self.step,
            weights,
            self.meta(),
            opt,
            state,
            rng,
            self.cfg.train.keep_last,
            staged=staged,
        )
        return path

    def resume(self) -> None:
        found = latest(self.run)
        if found is None:
            return
        ck = load_checkpoint(found, self.dist.rank)
        if self.lora:
            missing, unexpected = self.model.load_state_dict(ck["model"], strict=False)
            if unexpected or any("lora_" in k for k in missing):
                raise TrainingError(f"{found} does not hold this run's LoRA adapters", "use a new run folder")
        else:
            self.model.load_state_dict(ck["model"])
        if self.engine is not None:
            if not (found / "deepspeed").is_dir():
                raise TrainingError(
                    f"{found} was not written by the deepspeed backend", "resume with its backend"
                )
            self.engine.load_checkpoint(
                str(found / "deepspeed"), tag="state", load_module_strict=not self.lora
            )
        else:
            if ck["optimizer"]["optimizer"] is None:
                raise TrainingError(
                    f"{found} was written by the deepspeed backend", "resume with train.backend=deepspeed"
                )
            self.optimizer.load_state_dict(ck["optimizer"]["optimizer"])
            self.scheduler.load_state_dict(ck["optimizer"]["scheduler"])
        self.scaler.load_state_dict(ck["optimizer"]["scaler"])
        self.step, self.tokens = int(ck["trainer"]["step"]), int(ck["trainer"]["tokens"])
        self.sampler.load_state_dict(ck["trainer"]["sampler"])
        rng = ck["rng"]
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        self.level_rng.set_state(rng["levels"])
        if rng.get("cuda") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        self.resumed_from = found
        self._event("info", {"message": f"resumed from {found} (step {self.step})"})

    def export(self) -> Path | None:
        if not self.dist.main:
            return None
        out = self.run / "exports" / f"step-{self.step:08d}.safetensors"
        out.parent.mkdir(parents=True, exist_ok=True)
        from valle_cli.fsutil import atomic_path, save_safetensors

        with atomic_path(out, TrainingError) as tmp:
            tensors = {k: v.detach().contiguous().cpu() for k, v in self.model.state_dict().items()}
            save_safetensors(tensors, tmp, {k: json.dumps(v) for k, v in self.meta().items()})
        self._event("info", {"message": f"exported {out}"})
        return out

    # -- steps ------------------------------------------------------------------------------------------------

    def _samples(self, batch: list[dict], levels: list[int] | None = None):
        from valle_cli.model.valle import Sample, frame_symbols

        q = self.cfg.model.n_levels
        stt = [False] * len(batch)
        if levels is None:
            levels = torch.multinomial(
                self.level_probs, len(batch), replacement=True, generator=self.level_rng
            ).tolist()
            if self.cfg.train.stt_prob > 0:  # drawn only when on, so runs without stt keep their RNG stream
                stt = (torch.rand(len(batch), generator=self.level_rng) < self.cfg.train.stt_prob).tolist()
            if (
                self.step < self.cfg.train.ar_only_steps
            ):  # drawn all the same: the stream does not depend on it
                levels = [0] * len(batch)
        return [
            Sample(b["phonemes"], b["response"][:q], b["response"][:q, :0], 0, b["language"], "stt")
            if is_stt
            else Sample(
                b["phonemes"],
                b["prompt"],
                b["response"][:q],
                level,
                b["language"],
                frame_symbols=None if b.get("durations") is None else frame_symbols(b["durations"]),
            )
            for b, level, is_stt in zip(batch, levels, stt, strict=True)
        ]

    def _forward(self, samples, net=None):
        net = net or self.net
        if self.autocast_dtype is None:
            return net(samples)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype):
            return net(samples)

    def evaluate(self, max_batches: int = 8) -> dict:
        """Loss and accuracy per level on held-out utterances (each one scored at every level)."""
        from valle_cli.data.loader import Sampler, load_item
        from valle_cli.model.valle import swapped_text, wrong_text

        if len(self.val_idx) == 0:
            return {}
        self.model.eval()
        sampler = Sampler(self.ds, self.val_idx, self.cfg.data, seed=12345)
        totals: dict[str, list[float]] = {}

        def add(key: str, out, k: str | None = None) -> None:
            k = k or key
            if k not in out.counts:
                return
            n = out.counts[k]
            acc = totals.setdefault(key, [0.0, 0.0, 0])
            acc[0] += out.level_loss[k] * n
            acc[1] += out.accuracy[k] * n
            acc[2] += n

        with torch.no_grad():
            batches = sampler.epoch_batches()
            for batch_items in batches[:max_batches]:
                batch = [load_item(self.ds, it) for it in batch_items]
                for level in range(self.cfg.model.n_levels):
                    samples = self._samples(batch, [level] * len(batch))
                    out = self._forward(samples, self.model)
                    add(f"l{level}", out)
                    if level == 0:
                        add("ptr", out)
                        add("dur", out)
                        # the text gap: the same audio scored with other utterances' transcripts
                        right, wrong = wrong_text(samples) if len(samples) > 1 else ([], [])
                        if wrong:
                            add("wrong_text", self._forward(wrong, self.model), "l0")
                            same = len(right) == len(samples)
                            add("right_text", out if same else self._forward(right, self.model), "l0")
                        pointer = self.cfg.model.alignment == "pointer"
                        swapped = swapped_text(samples) if pointer else []
                        if swapped and len(swapped) == len(samples):  # the same boundaries, other phonemes
                            add("swapped_text", self._forward(swapped, self.model), "l0")
                            add("own_text", out, "l0")
        self.model.train()
        result = {"step": self.step, "kind": "eval"}
        for key, (loss, hits, n) in totals.items():
            result[f"loss.{key}"] = loss / n
            result[f"acc.{key}"] = hits / n
        result["loss"] = float(np.mean([result[f"loss.l{q}"] for q in range(self.cfg.model.n_levels)]))
        if "loss.wrong_text" in result:
            # > 0: the model uses its text; ~0: it ignores it (an audio language model)
            result["text_gap"] = result["loss.wrong_text"] - result["loss.right_text"]
            for key in ("acc.wrong_text", "acc.right_text"):
                result.pop(key, None)
        if "loss.swapped_text" in result:
            # the gap with the utterance's own phoneme boundaries: what the phonemes' identities are worth
            result["identity_gap"] = result["loss.swapped_text"] - result.pop("loss.own_text")
            for key in ("acc.swapped_text", "acc.own_text"):
                result.pop(key, None)
        if self.cfg.train.eval_samples > 0 and self.dist.main:
            self._synthesize_samples(sampler, self.cfg.train.eval_samples)
        if self.dist.main:
            self._plot_alignment(batches[0][0])
        self._log(result)
        self._event("eval", result)
        return result

    def _plot_alignment(self, first) -> None:
        """RUN/alignment/step-N.png: attention over the text of the first held-out utterance (teacher-forced)."""
        from valle_cli.alignment import alignment_maps, render_alignment
        from valle_cli.data.loader import load_item

        item = load_item(self.ds, first)
        sample = self._samples([item], [0])[0]
        try:
            am = alignment_maps(self.model, sample, self.symbols.symbols)
            path = render_alignment(
                am, self.run / "alignment" / f"step-{self.step:08d}.png", f"{item['uid']}, step {self.step}"
            )
        except (ValleError, OSError) as exc:
            self._event("warn", {"message": str(exc)})
            return
        self._event("info", {"message": f"alignment plot {path}"})

    def _eval_phonemes(self, text: str, language: str) -> torch.Tensor:
        from valle_cli.text import phonemize

        lang = self.cfg.train.eval_texts_language or language
        ipa = phonemize(text, lang)
        return torch.tensor(self.symbols.encode(ipa), dtype=torch.long)

    def _check_eval_texts(self) -> None:
        """train.eval_texts are read now, in every language they will be read in: a sentence espeak cannot
        read stops the run before any training, not at its first evaluation hours later."""
        from valle_cli.text import phonemize

        t = self.cfg.train
        if t.eval_samples == 0:
            self._event(
                "warn", {"message": "train.eval_texts is set but train.eval_samples is 0: none is said"}
            )
            return
        languages = (
            {t.eval_texts_language} if t.eval_texts_language else {self.ds.language(i) for i in self.val_idx}
        )
        for lang in sorted(languages):
            for text in t.eval_texts:
                unknown = self.symbols.unknown(phonemize(text, lang))
                if unknown:
                    self._event("warn", {"message": f"train.eval_texts: {text!r} read as {lang!r} has symbols the "
                                         f"model does not know ({' '.join(sorted(set(unknown)))}): said as <unk>"})  # fmt: skip

    def _synthesize_samples(self, sampler, n: int) -> None:
        """Greedy synthesis of n held-out utterances from their prompts -> run/samples/step-N/*.wav; with
        `train.eval_texts`, each says one of those sentences instead (listed in the folder's texts.tsv)."""
        from valle_cli.audio.io import save_audio
        from valle_cli.codecs.base import codec_from_header
        from valle_cli.data.loader import load_item
        from valle_cli.infer.engine import SamplingConfig, generate

        if getattr(self, "_codec", None) is None:
            try:
                self._codec = codec_from_header(self.ds.header["codec"], "cpu")
            except ValleError as exc:
                self._event("warn", {"message": f"no eval samples: {exc}"})
                self.cfg.train.eval_samples = 0
                return
        from valle_cli.fsutil import write_failure

        folder = self.run / "samples" / f"step-{self.step:08d}"
        items = [it for batch in sampler.epoch_batches() for it in batch][:n]
        texts = self.cfg.train.eval_texts
        picks: list[int] = []
        if texts and items:  # n sentences drawn anew at each evaluation, in the held-out voices in turn
            n = min(n, len(items) * len(texts))  # distinct (voice, sentence) pairs
            draw = random.Random(self.step)
            picks = [
                k for _ in range(-(-n // len(texts))) for k in draw.sample(range(len(texts)), len(texts))
            ][:n]
            items = [items[i % len(items)] for i in range(n)]
        rate = float(self.ds.header["codec"].get("frame_rate", 75.0))
        self.model.eval()
        try:
            folder.mkdir(parents=True, exist_ok=True)
            said: dict[str, str] = {}  # file name -> the sentence it says
            for i, it in enumerate(items):
                item = load_item(self.ds, it)
                name = item["uid"].replace("/", "__")
                phonemes, frames = item["phonemes"], self.ds.frames(it.index)
                if picks:  # another sentence in this voice (each voice and sentence once)
                    if f"{name}__text{picks[i]}.wav" in said:
                        continue
                    phonemes = self._eval_phonemes(texts[picks[i]], self.ds.language(it.index))
                    frames = int(len(phonemes) * rate / 8)  # a generous 8 symbols per second
                    name += f"__text{picks[i]}"
                sc = SamplingConfig(ar_temp=0.0, max_ar_steps=2 * frames + int(rate))
                prompt = item["prompt"][: self.cfg.model.n_levels]
                out = generate(self.model, phonemes, prompt, item["language"], sc)
                if out.codes.shape[1]:
                    wav = self._codec.decode(out.codes[None])[0, 0]
                    save_audio(folder / (name + ".wav"), wav, self._codec.sample_rate)
                    if picks:
                        said[name + ".wav"] = texts[picks[i]]
            if said:
                (folder / "texts.tsv").write_text("".join(f"{f}\t{text}\n" for f, text in said.items()))
        except Exception as exc:  # a full disk costs the samples, not the run
            reason = write_failure(exc) or (str(exc) if isinstance(exc, ValleError) else None)
            if reason is None:
                raise
            self._event("warn", {"message": f"eval samples not written to {folder}: {reason}"})
            return
        finally:
            self.model.train()
        self._event("info", {"message": f"eval samples in {folder}"})

    def _event(self, kind: str, payload: dict) -> None:
        """Tell the listener, and keep the event in RUN/train.log (rank 0) for `valle tui` and later reading."""
        if self.dist.main and self.run.is_dir():
            run_log.append(self.run, kind, payload)
        self.events(kind, payload)

    def _log(self, record: dict) -> None:
        if not self.dist.main:
            return
        path = self.run / "metrics.jsonl"
        line = (json.dumps(record) + "\n").encode()
        try:
            with open(path, "ab", buffering=0) as f:
                end = f.seek(0, os.SEEK_END)
                try:
                    written = f.write(line)
                    if written != len(line):
                        raise OSError(28, "No space left on device")  # a short write
                except OSError:
                    with contextlib.suppress(OSError):
                        os.ftruncate(f.fileno(), end)  # no torn line left behind
                    raise
        except OSError as exc:
            raise TrainingError(
                f"cannot write {path}: {exc.strerror or exc}",
                "free disk space, then rerun the same command: it resumes from the last checkpoint",
            ) from None

    def _trim_metrics(self) -> None:
        """On resume: metrics.jsonl keeps only whole records of steps up to the checkpoint's (the steps after
        it are trained again, and a torn last line from a kill or a full disk goes)."""
        path = self.run / "metrics.jsonl"
        if not self.dist.main or not path.is_file():
            return
        raw = path.read_bytes()
        kept = []
        for line in raw.splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] > self.step:
                continue
            kept.append(line)
        text = b"".join(k + b"\n" for k in kept)
        if text != raw:
            from valle_cli.fsutil import atomic_path

            with atomic_path(path, TrainingError) as tmp:
                Path(tmp).write_bytes(text)
            dropped = len(raw.splitlines()) - len(kept)
            self._event(
                "info", {"message": f"metrics.jsonl: {dropped} record(s) after step {self.step} dropped"}
            )

    def _handle_commands(self) -> None:
        from valle_cli.train import distributed

        mine = self.commands.drain() if self.dist.main else []
        # every rank applies the same commands at the same step; replies come from rank 0's objects
        names = distributed.broadcast([(c.name, c.value) for c in mine], self.dist)
        # a signal on any rank stops every rank, at this same step
        self.stop_requested = self.stop_requested or distributed.any_true(self._signalled, self.dist)
        from valle_cli.train.commands import Command

        cmds = mine or [Command(n, v) for n, v in names]
        for cmd in cmds:
            try:
                if cmd.name == "save":
                    self.save()
                elif cmd.name == "quit":
                    self.stop_requested = True
                elif cmd.name == "lr":
                    # the new value is the schedule's peak; warmup/cosine continue relative to it
                    t = self.cfg.train
                    factor = lr_factor(self.step, t.warmup_steps, t.steps, t.schedule)
                    self.scheduler.base_lrs = [cmd.value for _ in self.scheduler.base_lrs]
                    for group in self.optimizer.param_groups:
                        group["lr"] = cmd.value * factor
                    self._event(
                        "info",
                        {"message": f"learning rate set to {cmd.value:g} (now {cmd.value * factor:g})"},
                    )
                elif cmd.name == "eval":
                    if len(self.val_idx) == 0:
                        self._event("warn", {"message": "eval: there are no held-out utterances to score "
                                             "(data.val_fraction is 0); nothing was evaluated"})  # fmt: skip
                    else:
                        self.evaluate()
                elif cmd.name == "export":
                    self.export()
                elif cmd.name in ("pause", "resume"):
                    self.paused = cmd.name == "pause"
                elif cmd.name == "status":
                    lr = self.optimizer.param_groups[0]["lr"]
                    last = self._last
                    cmd.reply(
                        ok=True,
                        step=self.step,
                        steps=self.cfg.train.steps,
                        lr=lr,
                        tokens=self.tokens,
                        tokens_per_s=last.get("tokens_per_s"),
                        loss=last.get("loss"),
                        paused=self.paused,
                        run=str(self.run),
                    )
                    continue
                cmd.reply(ok=True)
            except ValleError as exc:
                cmd.reply(ok=False, error=str(exc))
                self._event("warn", {"message": str(exc)})

    def _again(self, signum, frame) -> None:
        os.write(2, f"\ninterrupted again: step {self.step} is saved; exiting now\n".encode())
        os._exit(128 + signum)

    def _on_signal(self, signum, frame) -> None:
        self._signalled = True  # acted on at the next step boundary, on every rank together
        self._signal = self._signal or signal.Signals(signum).name
        self._event("info", {"message": f"signal {signal.Signals(signum).name}: saving and stopping"})

    def train(self, eval_only: bool = False) -> RunInfo:
        server = None
        if self.dist.main:
            self.run.mkdir(parents=True, exist_ok=True)
            if self.control and not eval_only:
                from valle_cli.train.control import ControlServer

                # first: a second trainer on a live run stops here, before it touches config.yaml or the log;
                # once the run is ours, a killed or failed save's staging folder goes (a full disk's culprit)
                server = ControlServer(self.run, self.commands, claimed=lambda: remove_staging(self.run))
            elif not eval_only:
                remove_staging(self.run)
        try:
            return self._train(eval_only)
        finally:
            if server is not None:
                server.close()

    def _train(self, eval_only: bool) -> RunInfo:
        from valle_cli.data.loader import batch_stream
        from valle_cli.train import distributed

        if self.dist.enabled:
            torch.distributed.barrier()
        self.resume()
        if self.resumed_from is not None and not eval_only:  # --eval may look at a live run: never trim it
            self._trim_metrics()
        if self.dist.main and not eval_only:  # --eval (with its --set) leaves the run's config as it was
            dump_config(self.cfg, self.run / "config.yaml")
        if self.cfg.train.eval_texts:
            self._check_eval_texts()
        if eval_only:
            self.evaluate(max_batches=1_000_000)
            return RunInfo(self.run, self.step, self.resumed_from)
        t = self.cfg.train
        main_thread = threading.current_thread() is threading.main_thread()  # only it may set signal handlers
        old = (
            {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
            if main_thread
            else {}
        )
        stream = batch_stream(self.ds, self.sampler, self.cfg.data.num_workers)
        self._event(
            "info",
            {"message": f"training from step {self.step} to {t.steps} on {self.device} (pid {os.getpid()})"},
        )
        if self.step < t.ar_only_steps and self.cfg.model.n_levels > 1:
            then = (
                "then levels follow train.level_weights"
                if t.ar_only_steps < t.steps
                else "levels 1+ stay untrained"
            )
            kind = "AR" if self.cfg.model.level0 == "ar" else "parallel"
            self._event("info", {"message": f"level 0 ({kind}) only until step {t.ar_only_steps}; {then}"})
        bad = 0
        started, start_tokens = time.time(), self.tokens
        self.model.train()
        try:
            while self.step < t.steps and not self.stop_requested:
                self.optimizer.zero_grad(set_to_none=True)
                record: dict = {}
                outs: list = []
                per_level: dict[str, list] = {}
                finite = True
                interrupted = False
                step_tokens = 0
                mark = (self.sampler.epoch, self.sampler.position)
                for _ in range(t.grad_accumulation):
                    try:
                        batch = next(stream)
                    except RuntimeError:
                        if not self._signalled:
                            raise
                        # a signal to the whole process group reached a loader worker before it could
                        # leave the group: the step is dropped, the last finished one is saved below
                        self.optimizer.zero_grad(set_to_none=True)
                        self.sampler.epoch, self.sampler.position = mark  # its batches come again on resume
                        self.stop_requested = interrupted = True
                        break
                    out = self._forward(self._samples(batch))
                    if distributed.any_true(not bool(torch.isfinite(out.loss)), self.dist):
                        finite = False  # every rank skips together (DDP ranks must run the same backwards)
                        break
                    if self.engine is None:
                        self.scaler.scale(out.loss / t.grad_accumulation).backward()
                    else:
                        outs.append(out)  # DeepSpeed: backward once every micro-batch is known to be finite
                    step_tokens += sum(
                        n for k, n in out.counts.items() if k not in ("ptr", "dur")
                    )  # frames, not decisions or symbols
                    for k, v in out.losses.items():
                        record[f"loss.{k}"] = record.get(f"loss.{k}", 0.0) + v / t.grad_accumulation
                    for k, n in out.counts.items():  # per level: token-weighted over the micro-batches
                        sums = per_level.setdefault(k, [0.0, 0.0, 0])
                        sums[0] += out.level_loss[k] * n
                        sums[1] += out.accuracy[k] * n
                        sums[2] += n
                if interrupted:
                    break
                if not finite:
                    bad += 1
                    self.optimizer.zero_grad(set_to_none=True)
                    self._event(
                        "warn",
                        {"message": f"step {self.step + 1}: non-finite loss, step skipped ({bad} in a row)"},
                    )
                    if bad >= MAX_NONFINITE:
                        raise TrainingError(
                            f"{bad} non-finite losses in a row; stopped (the last checkpoint is the last good state)",
                            "lower train.lr, use fp32 or bf16 instead of fp16, or check the data",
                        )
                    self._handle_commands()
                    continue
                bad = 0
                for k, (loss_sum, hits, n) in sorted(per_level.items()):
                    record[f"loss.{k}"], record[f"acc.{k}"] = loss_sum / n, hits / n
                if self.engine is not None:
                    for out in outs:  # DeepSpeed divides by the accumulation steps itself
                        self.engine.backward(out.loss + self._every_parameter())
                        self.engine.step()  # optimizer and scheduler step at the accumulation boundary
                    grad_norm = self.engine.get_global_grad_norm() or 0.0
                else:
                    grad_norm = self._optimizer_step(t)
                self.step += 1
                self.tokens += step_tokens
                elapsed = max(time.time() - started - self._paused_seconds, 1e-9)
                record.update(
                    step=self.step,
                    kind="train",
                    loss=record.get("loss.response", 0.0),
                    lr=self.optimizer.param_groups[0]["lr"],
                    grad_norm=float(grad_norm),
                    tokens=self.tokens,
                    tokens_per_s=(self.tokens - start_tokens) / elapsed,
                    time=time.time(),
                    **self._memory(),
                )
                self._after_step(record)
            if not latest(self.run) or latest(self.run).name != f"step-{self.step:08d}":
                self.save()
            distributed.check_in_sync(self.model, self.dist)
        finally:
            for s, h in old.items():
                # stopped by a signal and saved: the command exits now, so a later signal (a user pressing
                # Ctrl-C again) exits at once with one line, not a traceback from the cleanup it interrupts
                signal.signal(s, self._again if self._signal and self.quiet_after_signal else h)
        self._event("done", {"step": self.step})
        return RunInfo(self.run, self.step, self.resumed_from, self._signal)

    def _memory(self) -> dict:
        """This process's resident memory and, on CUDA, the peak memory allocated (bytes)."""
        out = {"mem_cpu": resident_bytes()}
        if self.device.type == "cuda":
            out["mem_gpu"] = torch.cuda.max_memory_allocated(self.device)
        return out

    def _every_parameter(self) -> torch.Tensor | float:
        """A zero that depends on every trainable parameter, added to the loss across DeepSpeed ranks.

        ZeRO 0-1 reduce the gradients parameter by parameter, skipping those without one. A parameter one rank's
        batch did not use (the head of an RVQ level no sample drew, the text head without an stt sample) would
        shift that rank's reductions against the others' (gloo: "Received data size doesn't match expected
        size"). Its gradient is then zero, which is what ZeRO uses for a parameter without one anyway.
        """
        if not self.dist.enabled:
            return 0.0
        return sum(p.reshape(-1)[0] for p in self.model.parameters() if p.requires_grad) * 0.0

    def _optimizer_step(self, t) -> float:
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip or float("inf"))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return float(grad_norm)

    def _after_step(self, record: dict) -> None:
        t = self.cfg.train
        self._last = record
        self._log(record)
        self._event("step", record)
        if self.step % t.eval_every == 0:
            self.evaluate()
        if self.step % t.save_every == 0:
            self.save()
        self._handle_commands()
        if self.paused:
            self._event("info", {"message": f"paused at step {self.step}; `resume` continues"})
            t0 = time.time()
            while self.paused and not self.stop_requested:  # every rank waits here together
                time.sleep(0.1)
                self._handle_commands()
            self._paused_seconds += time.time() - t0
            if not self.stop_requested:
                self._event("info", {"message": f"resumed at step {self.step}"})
