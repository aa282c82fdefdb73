"""The one training step (train.step.TrainStep): micro-steps, the batch fetched ahead, the schedules; and that
train.pretrain and bench.mfu both run it."""
import signal
from contextlib import nullcontext

import torch

from bench import mfu
from kernels import dispatch
from helpers import TINY
from model.config import GPTConfig
from train import checkpoint, optim
from train.builder import build_model, build_optimizer, schedule_of
from train.dataloader import Batch
from train.pretrain import build_parser
from train.scaling import make_plan
from train.step import TrainStep


def tiny_step(grad_accum=2, num_iterations=10):
    plan = make_plan(1, aspect_ratio=32, head_dim=32, max_seq_len=16, vocab_size=64, device_batch_size=2,
                     total_batch_size=2 * 16 * grad_accum, num_iterations=num_iterations)
    args = build_parser().parse_args(["--warmup-ratio", "0.5"])
    model = build_model(plan.config, "cpu", seed=0)
    g = torch.Generator().manual_seed(0)
    batches = [Batch(*torch.randint(0, 64, (2, 2, 16), generator=g).unbind(0)) for _ in range(5)]
    stream = iter(batches)
    step = TrainStep(model, build_optimizer(model, plan, args), schedule_of(plan, args), stream, grad_accum,
                     nullcontext(), next(stream))
    return step, model, batches


def test_a_step_averages_its_micro_batches_fetches_ahead_and_applies_the_schedules():
    step, model, batches = tiny_step()
    with torch.no_grad():
        expected = sum(model(b.inputs, b.targets) for b in batches[:2]) / 2
    loss, lrm = step(3)
    torch.testing.assert_close(loss, expected)
    assert step.batch is batches[2]  # the next step's first micro-batch, already fetched
    assert lrm == optim.lr_multiplier(3, 10, 0.5, 0.5, 0.0) == 0.8  # in the warmup: step 3 of 5
    for group in step.optimizer.param_groups:
        assert group["lr"] == group["initial_lr"] * lrm
        if group["kind"] == "muon":
            assert group["momentum"] == optim.muon_momentum(3, 10, 0.5)
    assert all(p.grad is None for p in model.parameters())


def test_pretrain_and_bench_mfu_step_with_the_schedules(tiny_base, monkeypatch):
    """One schedule change (every LR multiplied by 0) reaches both: neither moves a weight then."""
    monkeypatch.setattr(optim, "lr_multiplier", lambda *args: 0.0)
    trainer = mfu.build_trainer(2, "cpu", device_batch_size=2, seq_len=16, compile=False, vocab_size=64)
    before = {k: v.clone() for k, v in trainer.train_step.model.state_dict().items()}
    trainer.step()
    for name, value in trainer.train_step.model.state_dict().items():
        assert torch.equal(value, before[name]), name

    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tiny_base))
    from train import pretrain
    handlers = {sig: signal.getsignal(sig) for sig in pretrain.StopSignal.SIGNALS}
    pretrain.main([*TINY, "--num-iterations", "2", "--eval-every", "-1", "--model-tag", "zero-lr",
                   "--kernel-attention", "blocked"])
    # the run's kernel flags and signal handlers held for the run only
    assert dispatch.requested("attention") == "auto"
    assert {sig: signal.getsignal(sig) for sig in handlers} == handlers
    folder = tiny_base / "base_checkpoints" / "zero-lr"
    saved = checkpoint.load_model_state(folder, 2, torch.device("cpu"))
    initial = build_model(GPTConfig(**checkpoint.load_meta(folder, 2)["model_config"]), "cpu", seed=42)
    for name, value in initial.state_dict().items():
        assert torch.equal(saved[name], value), name
