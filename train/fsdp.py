"""FSDP2, the second data-parallel mode: every rank keeps only its rows (dim 0) of each weight, gradient and AdamW
moment (torch.distributed.fsdp.fully_shard); a block's weights are all-gathered just before it runs and its gradients
reduce-scattered (averaged) right after its backward. The replicated mode (DistMuonAdamW) keeps the whole model on
every rank and communicates less; FSDP2 is for models whose replicated weights, gradients and state do not fit.

As torchtitan's apply_fsdp: fully_shard per transformer block, then on the root, which takes everything outside the
blocks (wte, value embeddings, lm_head, the per-layer scalars, smear and backout); torch.compile per block before
sharding. The blocks' code (attention, norms, our kernels) runs unchanged on the gathered weights.
The optimizer for sharded weights is train.optim.FSDPMuonAdamW.
"""
import os

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from model.gpt import GPT
from train.errors import UserError

MODES = ("auto", "on", "off")


def wanted(mode: str, device_type: str) -> bool:
    """Whether --fsdp MODE shards the model on device_type before the process group exists (auto: not yet); a mode
    that cannot run there is one line."""
    if mode not in MODES:
        raise UserError(f"--fsdp must be one of {', '.join(MODES)}, not {mode!r}")
    if mode == "on" and device_type == "mps":
        raise UserError("--fsdp on needs cuda (NCCL) or cpu (gloo): torch.distributed does not run on mps")
    # auto: decided once the device is known (train.memory.choose_fsdp), with more than one rank; alone, off
    return mode == "on"


def policies(device: torch.device) -> tuple[MixedPrecisionPolicy, MixedPrecisionPolicy]:
    """(blocks, root) mixed precision: the numerics of the replicated mode under bf16 autocast.
    On CUDA the blocks' weights are gathered in bf16 (half the bytes; autocast would cast them for the matmuls
    anyway) and their inputs are left alone (cast_forward_inputs would make the residual stream bf16); the root
    stays fp32 (the embeddings and scalars make the fp32 residual stream). Gradients are reduced in fp32. On the
    CPU everything is fp32, so a run equals a single process's exactly."""
    if device.type != "cuda":
        return MixedPrecisionPolicy(), MixedPrecisionPolicy()
    return (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False),
            MixedPrecisionPolicy(reduce_dtype=torch.float32))


def ranks_per_copy(world: int) -> int:
    """How many of world ranks one copy of the model is sharded over: all of them on one node; on several (torchrun's
    LOCAL_WORLD_SIZE below the world size) a node's (HSDP: the weight gathers stay on the node's fast links, only the
    gradients' all-reduce crosses nodes)."""
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    return per_node if per_node < world and world % per_node == 0 else world


def device_mesh(device: torch.device):
    """The ranks FSDP2 shards over (ranks_per_copy): a 1-D mesh, or (copies, ranks per copy) for HSDP."""
    world = dist.get_world_size()
    shards = ranks_per_copy(world)
    if shards == world:
        return init_device_mesh(device.type, (world,))
    return init_device_mesh(device.type, (world // shards, shards), mesh_dim_names=("replicate", "shard"))


def shard_model(model: GPT, device: torch.device, compile: bool = False) -> GPT:
    """model (initialised or loaded, the same on every rank) sharded in place over the ranks of device_mesh's last
    dimension; its parameters become DTensors sharded on dim 0 (unevenly where dim 0 does not split: torch.chunk's
    rows), and replicated over its first on several nodes."""
    mesh = device_mesh(device)
    blocks_mp, root_mp = policies(device)
    blocks = model.transformer.h
    for i, block in enumerate(blocks):
        if compile:  # per block, before sharding, so that the compiled code sees FSDP's hooks from outside
            block.compile(dynamic=False)
        # the last block's weights are needed again at once by the backward: keep them gathered
        fully_shard(block, mesh=mesh, mp_policy=blocks_mp, reshard_after_forward=i < len(blocks) - 1)
    fully_shard(model, mesh=mesh, mp_policy=root_mp)  # the root: FSDP2 keeps its weights gathered to the backward
    return model


def reshard(model: GPT) -> None:
    """Every FSDP2 unit's weights back to this rank's rows (those a forward without backward left gathered)."""
    from torch.distributed.fsdp import FSDPModule
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
