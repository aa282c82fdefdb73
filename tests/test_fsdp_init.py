"""A fresh FSDP2 model is built without ever materialising the whole model on a rank (issue #27): each parameter is
drawn whole in nanochat's order and cut to the rank's rows, so the sharded model equals the single process's
initialisation bit for bit, on 2 ranks with rows that do not split evenly."""
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from model.config import GPTConfig
from train.builder import build_model, build_sharded_model

# uneven rows on 2 ranks: n_kv_head 7 (the value gates), the smear gate's single row, 3 layers of scalars
CONFIG = GPTConfig(sequence_len=16, vocab_size=101, n_layer=3, n_head=7, n_kv_head=7, n_embd=28, window_pattern="SL")


def _worker(rank: int, world: int, store: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world)
    try:
        reference = build_model(CONFIG, "cpu", seed=7)
        torch.manual_seed(123)  # build_sharded_model seeds itself, as build_model does
        model = build_sharded_model(CONFIG, "cpu", seed=7)
        for name, p in model.named_parameters():  # only this rank's rows are held (torch.chunk's, maybe none)
            pieces = torch.arange(reference.get_parameter(name).shape[0]).chunk(world)
            assert p.to_local().shape[0] == (len(pieces[rank]) if rank < len(pieces) else 0), name
        full = {k: v.full_tensor() for k, v in model.state_dict().items()}
        ref = reference.state_dict()
        if rank == 0:
            assert set(full) == set(ref)
            for name, value in ref.items():
                assert torch.equal(full[name], value), name
        for name in ("cos", "sin"):
            assert torch.equal(getattr(model, name), getattr(reference, name))
    finally:
        dist.destroy_process_group()


def test_sharded_init_equals_the_single_process_bit_for_bit():
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(2, os.path.join(tmp, "store")), nprocs=2)
