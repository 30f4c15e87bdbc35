"""torchrun DDP support: detect the environment, set up the process group, keep ranks in step.

`valle train` under `torchrun --nproc-per-node N -m valle_cli.cli.app train ...` (or `train.backend: ddp`)
finds RANK / WORLD_SIZE / LOCAL_RANK in the environment and joins a process group: nccl on GPUs (one per
local rank), gloo on CPUs. Each rank reads its own shard of every epoch's batches; gradients are averaged by
DistributedDataParallel. Only rank 0 writes (metrics, config, checkpoints, exports) and reads stdin; at every
step boundary rank 0 broadcasts the live commands and the stop flag, so an `lr` change or a SIGTERM reaches
all ranks at the same step. At the end, ranks compare a checksum of their weights and fail loudly if they
drifted apart.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from valle_cli.errors import ValleError


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def from_env(backend: str) -> Dist:
    """The process's place in a torchrun job (world 1 when not under torchrun)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        if backend == "ddp":
            raise ValleError(
                "train.backend is ddp but this process was not started by torchrun",
                "run `torchrun --nproc-per-node N -m valle_cli.cli.app train CONFIG`",
            )
        return Dist()
    return Dist(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))


def setup(d: Dist, device_name: str) -> torch.device:
    """Join the process group (a group of one for DeepSpeed in a single process); returns this rank's device."""
    cuda = torch.cuda.is_available() and device_name != "cpu"
    if cuda:
        torch.cuda.set_device(d.local_rank)
    if not d.enabled:  # DeepSpeed without a launcher: a process group of one
        for key, value in (
            ("RANK", "0"),
            ("WORLD_SIZE", "1"),
            ("LOCAL_RANK", "0"),
            ("MASTER_ADDR", "127.0.0.1"),
        ):
            os.environ.setdefault(key, value)
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return torch.device("cuda", d.local_rank) if cuda else torch.device("cpu")


def broadcast(obj, d: Dist):
    """Rank 0's `obj` on every rank."""
    if not d.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def check_in_sync(model: torch.nn.Module, d: Dist) -> None:
    if not d.enabled:
        return
    with torch.no_grad():
        total = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().reshape(1)
    gathered = [torch.zeros_like(total) for _ in range(d.world)]
    dist.all_gather(gathered, total.to(next(model.parameters()).device))
    values = [float(g) for g in gathered]
    if max(values) - min(values) > 1e-6 * max(1.0, abs(values[0])):
        raise ValleError(f"the ranks' weights drifted apart (checksums {values})", "report this as a bug")


def teardown(wait: bool = True) -> None:
    """Leave the process group: after a successful run, first wait until every rank is done with collectives
    (a rank that destroys its group while another still talks to it can abort at exit in gloo's threads);
    after a failure, at once (the other ranks may never come: torchrun stops them when this one exits)."""
    if dist.is_initialized():
        import gc

        if wait:
            dist.barrier()
        gc.collect()  # finished async work objects still referencing tensors go before the threads do
        dist.destroy_process_group()


def any_true(flag: bool, d: Dist) -> bool:
    """True on every rank if `flag` is true on any rank."""
    if not d.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0])
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
