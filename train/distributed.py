"""Process-group set-up (torchrun: NCCL on GPUs, gloo on CPU) and the few helpers every rank needs."""
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from train.errors import UserError


@dataclass
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    fsdp: bool = False  # FSDP2 (train.fsdp) rather than the replicated model

    @property
    def mode(self) -> str:
        """The data-parallel mode, as train.memory names it."""
        return "fsdp" if self.fsdp else "replicated"

    @property
    def is_master(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def autodetect_device_type() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def setup(device_type: str = "", group: bool = False) -> DistInfo:
    """Join the process group torchrun describes in the environment (or run alone), pick this rank's device.
    group: a process group of one when running alone too (FSDP2 shards over a group, even of one)."""
    device_type = device_type or autodetect_device_type()
    if device_type not in ("cuda", "cpu", "mps"):
        raise UserError(f"--device-type must be cuda, cpu or mps, not {device_type!r}")
    if device_type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device-type cuda was asked for but CUDA is not available on this machine")
    if device_type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError("--device-type mps was asked for but MPS is not available on this machine")
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if device_type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device(device_type)
    if (world_size > 1 or group) and not dist.is_initialized():
        if device_type == "mps":
            raise UserError("multi-process training is supported on cuda (NCCL) and cpu (gloo), not mps")
        backend = "nccl" if device_type == "cuda" else "gloo"
        alone = dict(store=dist.HashStore(), rank=0, world_size=1) if world_size == 1 else {}  # no torchrun
        dist.init_process_group(backend=backend, device_id=device if device_type == "cuda" else None, **alone)
    return DistInfo(rank, local_rank, world_size, device)


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def max_over_ranks(values: list[int], device: torch.device) -> list[int]:
    """The largest of every rank's value, for each of values (alone: values), in one collective."""
    if not dist.is_initialized():
        return list(values)
    t = torch.tensor(values, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def all_gather_objects(obj, group=None) -> list:
    """Every rank's obj (of group: default, all), in rank order (a one-element list when running alone)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def on_every_rank(fn, *args):
    """fn(*args) on every rank; a UserError on any rank is raised on every rank, the same line, so that no rank goes
    on alone into a collective the others never reach."""
    try:
        result, error = fn(*args), None
    except UserError as e:
        result, error = None, str(e)
    error = next((e for e in all_gather_objects(error) if e), None)
    if error is not None:
        raise UserError(error)
    return result


def is_rank0() -> bool:
    return int(os.environ.get("RANK", 0)) == 0


def print0(*args, **kwargs) -> None:
    if is_rank0():
        print(*args, **kwargs, flush=True)
