"""FSDP2 (issue #27): training sharded over 2 and 3 ranks with the whole Muon + AdamW recipe equals a single process
fed the same global batches, with activation checkpointing too; Muon orthogonalizes each matrix once per step over all
ranks; the optimizer's checkpoint state, put together, is the single process's, and training continues from it
after a save and load through DCP."""
import os
import tempfile
from collections import Counter

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from helpers import SHORT, ckpt, metrics, run, step_losses, torchrun
from model.config import GPTConfig
from torch.distributed.tensor import DTensor

from train import checkpoint, distributed, optim
from train.builder import build_model
from train.fsdp import shard_model
from train.optim import Schedule, make_optimizer

# Shapes that FSDP2 shards unevenly: n_embd 28 (3 ranks: 10, 10, 8 rows), 4 x 28 = 112 (38, 38, 36), the value
# gates' 7 rows (4, 3 / 3, 3, 1), the smear gate's single row and 3 layers of scalars; vocab 101 padded to 128
# (43, 43, 42 on 3 ranks).
CONFIG = GPTConfig(sequence_len=16, vocab_size=101, n_layer=3, n_head=7, n_kv_head=7, n_embd=28, window_pattern="SL")
STEPS, MORE = 5, 2  # steps compared, then steps after a reload of the optimizer's checkpoint
PER_RANK = 2  # sequences per rank per step


def batch(step: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(0, CONFIG.vocab_size, (PER_RANK * world, CONFIG.sequence_len + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def build() -> torch.nn.Module:
    """The tiny GPT, its weights moved off the initial point: there the zero-initialised projections leave the
    scalars' gradients at rounding noise (1e-11), which AdamW (eps 1e-10) turns into updates of either sign."""
    model = build_model(CONFIG, "cpu", seed=0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def train_step(model, opt, schedule, step, inputs, targets) -> float:
    loss = model(inputs, targets)
    loss.backward()
    schedule.apply(opt, step)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def max_error(model, ref) -> float:
    full = {n: p.full_tensor() for n, p in model.named_parameters()}
    return max((full[n] - p.detach()).abs().max().item() for n, p in ref.named_parameters())


def _worker(rank: int, world: int, store: str, per_node: int) -> None:
    torch.set_num_threads(1)
    os.environ["LOCAL_WORLD_SIZE"] = str(per_node)  # as torchrun sets it: below the world size, HSDP
    # fp64: AdamW's eps (1e-10) turns the fp32 rounding of a gradient near 0 into visibly different updates (one
    # of -4.40e-10 here and -4.47e-10 in one process moved its weight 4e-4); fp64 rounding stays far below eps
    torch.set_default_dtype(torch.float64)
    dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world)
    try:
        _check(rank, world, os.path.join(os.path.dirname(store), "checkpoints"), world // per_node)
    finally:
        dist.destroy_process_group()


def _check(rank: int, world: int, folder: str, replicas: int) -> None:
    schedule = Schedule(STEPS + MORE)  # warmdown from step 4: the LR, momentum and decay all move
    ref = build()
    ref_opt = make_optimizer(ref.param_groups(), weight_decay=0.2)
    model = shard_model(build(), torch.device("cpu"))
    opt = make_optimizer(model.param_groups(), weight_decay=0.2, fsdp=True)
    groups = {g["name"]: len(g["params"]) for g in opt.param_groups if g["kind"] == "muon"}
    assert len(groups) >= 3, groups  # several shapes, tall and wide
    assert next(model.parameters()).device_mesh.shape == ((replicas, world // replicas) if replicas > 1 else (world,))

    orthogonalized = Counter()  # matrices orthogonalized on this rank, per shape
    plain = optim._orthogonalize

    def counting(x, steps):
        orthogonalized[f"matrices {x.shape[1]}x{x.shape[2]}"] += x.shape[0]
        return plain(x, steps)

    rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    for step in range(STEPS):
        inputs, targets = batch(step, world)
        ref_loss = train_step(ref, ref_opt, schedule, step, inputs, targets)
        # every other step with activation checkpointing: each block's recompute in the backward runs on the weights
        # FSDP2 gathered for that backward (its pre-forward hook is skipped there)
        model.checkpoint_blocks = step % 2 == 1
        optim._orthogonalize = counting
        try:
            loss = train_step(model, opt, schedule, step, inputs[rows], targets[rows])
        finally:
            optim._orthogonalize = plain
        losses, counts = [None] * world, [None] * world
        dist.all_gather_object(losses, loss)
        dist.all_gather_object(counts, orthogonalized)
        assert abs(sum(losses) / world - ref_loss) < 1e-5, (step, losses, ref_loss)
        assert max_error(model, ref) < 1e-5, (step, max_error(model, ref))
        # once per step, by one rank of each copy of the model
        assert sum(counts, Counter()) == Counter({name: k * (step + 1) * replicas for name, k in groups.items()})

    # the checkpoint's optimizer state (named_state), put together over the ranks, is the single process's
    names = {p: n for n, p in model.named_parameters()}
    mine = {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in optim.named_state(opt, names).items()}
    every = [None] * world
    dist.all_gather_object(every, mine)
    merged = {k: v for d in every for k, v in d.items()}
    ref_named = optim.named_state(ref_opt, {p: n for n, p in ref.named_parameters()})
    assert merged.keys() == ref_named.keys() and len(ref_named) > 30
    for k, v in ref_named.items():
        assert (merged[k] - v).abs().max() < 1e-5, k

    # saved through DCP, loaded into a fresh optimizer: training goes on as the single process's
    state = {"model": model.state_dict(), "optimizer": optim.named_state(opt, names)}
    checkpoint.save_checkpoint(folder, STEPS, state, {"step": STEPS}, rank, world, distributed.all_gather_objects)
    opt = make_optimizer(model.param_groups(), weight_decay=0.2, fsdp=True)
    saved = {k.removeprefix("optimizer.") for k in checkpoint.saved_tensors(folder, STEPS, "optimizer")}
    optim.load_named_state(opt, names, saved, lambda named: checkpoint.load_state(folder, STEPS, {"optimizer": named}))
    for step in range(STEPS, STEPS + MORE):
        inputs, targets = batch(step, world)
        train_step(ref, ref_opt, schedule, step, inputs, targets)
        train_step(model, opt, schedule, step, inputs[rows], targets[rows])
        assert max_error(model, ref) < 1e-5, (step, max_error(model, ref))


@pytest.mark.slow
@pytest.mark.parametrize("world, per_node", [(2, 2), (3, 3), (4, 2)])  # 4 ranks on "2 nodes": HSDP
def test_fsdp_training_equals_one_process_and_orthogonalizes_each_matrix_once(world, per_node):
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(world, os.path.join(tmp, "store"), per_node), nprocs=world, join=True)

# -----------------------------------------------------------------------------
# the CLI: FSDP2 on 2 ranks saves; the replicated mode resumes it on 1 process; FSDP2 on 1 process resumes that


@pytest.mark.slow
def test_cli_fsdp_checkpoint_resumes_replicated_on_one_process_and_back(tiny_base):
    args = [*SHORT, "--device-batch-size", "2", "--save-every", "2", "--model-tag", "fsdp"]
    proc = torchrun([*args, "--num-iterations", "4", "--fsdp", "on"], tiny_base)
    assert "data parallel: FSDP2" in proc.stdout
    folder = ckpt(tiny_base, "fsdp")
    fsdp_losses = step_losses(metrics(tiny_base, "fsdp"))
    # the model file is the whole model, as the replicated mode writes it
    saved = checkpoint.load_model_state(folder, 2, "cpu")
    plain = build_model(GPTConfig(**checkpoint.load_meta(folder, 2)["model_config"]), "meta").state_dict()
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in plain.items()}

    # replicated, 1 process (grad accumulation 2), from FSDP2's step 2: the optimizer state resharded
    proc = run([*args, "--num-iterations", "4", "--fsdp", "off", "--resume-from-step", "2", "--set-aside"], tiny_base)
    assert "optimizer state of 2 ranks resharded onto 1" in proc.stdout, proc.stdout[-2000:]
    assert "data parallel: replicated" in proc.stdout
    resumed = step_losses(metrics(tiny_base, "fsdp"))
    assert sorted(resumed) == [1, 2, 3, 4]
    assert all(abs(resumed[s] - fsdp_losses[s]) < 1e-2 for s in (3, 4)), (resumed, fsdp_losses)

    # FSDP2 on 1 process (no torchrun) from the replicated run's step 4
    proc = run([*args, "--num-iterations", "6", "--fsdp", "on", "--resume-from-step", "latest"], tiny_base)
    assert "data parallel: FSDP2" in proc.stdout and "resharded" not in proc.stdout
    assert sorted(step_losses(metrics(tiny_base, "fsdp"))) == list(range(1, 7))

# -----------------------------------------------------------------------------
# the flag


@pytest.mark.slow
def test_cli_fsdp_with_fp8_trains_as_the_replicated_mode_and_resumes_in_it(tiny_base):
    """--fp8 (torchao, emulated on the CPU) with FSDP2: the linears converted before sharding, the same losses as
    the replicated mode's on the same data, and its checkpoint resumed replicated on one process."""
    args = [*SHORT, "--aspect-ratio", "64", "--device-batch-size", "2", "--fp8", "--fp8-emulate", "--save-every", "2"]
    proc = torchrun([*args, "--num-iterations", "3", "--fsdp", "on", "--model-tag", "fp8-fsdp"], tiny_base)
    assert "data parallel: FSDP2" in proc.stdout and "fp8 (tensorwise): converted 12 linear layers" in proc.stdout
    torchrun([*args, "--num-iterations", "3", "--fsdp", "off", "--model-tag", "fp8-rep"], tiny_base)
    sharded, replicated = step_losses(metrics(tiny_base, "fp8-fsdp")), step_losses(metrics(tiny_base, "fp8-rep"))
    assert sorted(sharded) == [1, 2, 3] and all(abs(sharded[s] - replicated[s]) < 1e-4 for s in sharded), (
        sharded, replicated)
    proc = run([*args, "--num-iterations", "5", "--fsdp", "off", "--model-tag", "fp8-fsdp", "--resume-from-step",
                "latest"], tiny_base)
    assert "optimizer state of 2 ranks resharded onto 1" in proc.stdout
    assert sorted(step_losses(metrics(tiny_base, "fp8-fsdp"))) == [1, 2, 3, 4, 5]


def test_fsdp_mode_auto_is_off_on_is_on_even_alone_and_mps_is_refused():
    from train.errors import UserError
    from train.fsdp import wanted
    from train.pretrain import build_parser
    assert build_parser().parse_args([]).fsdp == "auto"
    assert not wanted("auto", "cuda") and not wanted("off", "cpu") and wanted("on", "cpu") and wanted("on", "cuda")
    with pytest.raises(UserError, match="--fsdp on needs cuda"):
        wanted("on", "mps")
