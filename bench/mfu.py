"""End-to-end training speed: real optimizer steps of the real model on random tokens (no data needed).

    python -m bench.mfu --depth 20                 # tok/s, FLOPs per token, TFLOP/s, MFU
    python -m bench.mfu --depth 20 --compare       # and again with every kernel, then each one, forced to torch
    python -m bench.mfu --depth 20 --compare newton_schulz   # only Muon's orthogonalization in torch, against ours
    python -m bench.mfu --depth 20 --compare nanochat --profile prof.json   # against the torch-only path, profiled
    python -m bench.mfu --depth 20 --fp8           # FP8 linears (torchao)
    python -m bench.mfu --depth 2 --seq-len 64 --device-batch-size 2 --steps 3   # on a CPU

A step is train.pretrain's own (train.step.TrainStep): grad_accum micro-steps (forward under bf16 autocast,
backward), then MuonAdamW at the step's schedules. The model is compiled on CUDA (--no-compile to not).
MFU = FLOPs per token x tok/s / peak, against the H100's bf16 989 TFLOP/s and the device's own peak (unknown
devices: n/a).
"""
import argparse
import gc
import itertools
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from bench import step_profile, timing
from kernels import dispatch
from model.config import MAX_SEQ_LEN, VOCAB_SIZE, WINDOW_PATTERN
from train.dataloader import Batch
from train.errors import Parser, UserError, first_line, run_cli
from train.fp8 import RECIPES as FP8_RECIPES
from train.memory import CHECKPOINTING
from train.metrics import H100_PEAK_BF16, mfu, peak_bf16_flops
from train.scaling import DEVICE_BATCH_SIZE, Plan
from train.step import TrainStep, autocast_for

# "Its torch version" per op, for --compare. Attention's plain reference is fp32 with a dense T x T mask
# (it would need ~100 GB at d20), so attention falls back to torch's own SDPA, as nanochat does without FA3.
TORCH_VERSIONS = {"attention": "sdpa", "cross_entropy": "torch", "newton_schulz": "torch"}
NANOCHAT = "torch only (nanochat without FA3)"  # every op in torch: SDPA (window masks), CE and NS compiled with it


@dataclass
class Trainer:
    train_step: TrainStep  # train.pretrain's step, over random batches
    plan: Plan
    device: torch.device
    recompute_mlp: bool = False
    checkpoint_blocks: bool = False
    steps_done: int = 0

    @property
    def tokens_per_step(self) -> int:
        return self.train_step.batch.inputs.numel() * self.train_step.grad_accum

    def step(self) -> torch.Tensor:
        """One optimizer step; returns its loss (a device tensor: reading it waits for the step)."""
        loss, _ = self.train_step(self.steps_done)
        self.steps_done += 1
        return loss


def build_trainer(depth: int, device, device_batch_size: int, seq_len: int, grad_accum: int = 1,
                  compile: bool = True, fp8: str | None = None, vocab_size: int = VOCAB_SIZE,
                  window_pattern: str = WINDOW_PATTERN, seed: int = 0, n_batches: int = 4,
                  recompute_mlp: bool | None = None, fp8_emulate: bool = False,
                  activation_checkpointing: str = "auto") -> Trainer:
    """The model, optimizer, schedules and random batches of one depth, built as train.pretrain builds them (its
    flags' defaults for everything not given here)."""
    from train.builder import build_model_and_optimizer, schedule_of
    from train.memory import choose_checkpointing, choose_recompute_mlp
    from train.pretrain import build_parser
    from train.scaling import make_plan

    device = torch.device(device)
    plan = make_plan(depth, max_seq_len=seq_len, vocab_size=vocab_size, window_pattern=window_pattern,
                     device_batch_size=device_batch_size, total_batch_size=device_batch_size * seq_len * grad_accum,
                     num_iterations=1000, world_size=1)
    fp8_flags = ["--fp8", "--fp8-recipe", fp8] + ["--fp8-emulate"] * fp8_emulate if fp8 else []
    args = build_parser().parse_args(["--seed", str(seed)] + fp8_flags)
    if fp8:
        from train import fp8 as fp8_training
        fp8_training.check_fp8_available(device, emulate=fp8_emulate)
    recompute = choose_recompute_mlp(recompute_mlp, plan, device)  # as train.pretrain decides it
    orig, optimizer, _ = build_model_and_optimizer(plan, args, device, recompute)
    orig.checkpoint_blocks = choose_checkpointing(activation_checkpointing, plan, device, "replicated", recompute)
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    batches = []
    for _ in range(n_batches):
        tokens = torch.randint(0, vocab_size, (device_batch_size, seq_len + 1), generator=g, device=device)
        batches.append(Batch(tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()))
    batches = itertools.cycle(batches)
    model = torch.compile(orig, dynamic=False) if compile else orig
    step = TrainStep(model, optimizer, schedule_of(plan, args), batches, grad_accum, autocast_for(device),
                     next(batches))
    return Trainer(step, plan, device, orig.recompute_mlp, orig.checkpoint_blocks)


def speed(trainer: Trainer, seconds_per_step: float) -> dict:
    """tok/s, TFLOP/s and MFU (H100 and the device's own peak) from the time of one optimizer step."""
    tok_s = trainer.tokens_per_step / seconds_per_step
    fpt = trainer.plan.flops_per_token
    name = torch.cuda.get_device_name(trainer.device) if trainer.device.type == "cuda" else "cpu"
    return {"tokens_per_s": tok_s, "step_ms": 1e3 * seconds_per_step, "flops_per_token": fpt,
            "tflops": fpt * tok_s / 1e12, "mfu_h100": mfu(fpt, tok_s, H100_PEAK_BF16),
            "mfu_device": mfu(fpt, tok_s, peak_bf16_flops(name))}


def time_steps(trainer: Trainer, steps: int, warmup: int) -> dict:
    """Warm up (compilation, autotuning), then time `steps` optimizer steps back to back."""
    for _ in range(warmup):
        trainer.step()
    timing.synchronize(trainer.device)
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = trainer.step()
    loss = loss.item()  # waits for the device
    dt = (time.perf_counter() - t0) / steps
    return speed(trainer, dt) | {"loss": loss, "loss_finite": math.isfinite(loss)}


def free(device) -> None:
    gc.collect()
    torch._dynamo.reset()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def variants(compare: str | None, suffix: str = "") -> list[tuple[str, dict]]:
    """(name, forced impls): the default dispatch first (the baseline); with --compare all ops in torch,
    then each op alone; --compare nanochat all ops in torch only; with --compare OP,... only those ops, each alone."""
    out = [("default", {})]
    if compare == "nanochat":
        out.append((NANOCHAT, dict(TORCH_VERSIONS)))
    elif compare == "all":
        out.append(("torch (all)", dict(TORCH_VERSIONS)))
        out += [(f"torch {op}", {op: impl}) for op, impl in TORCH_VERSIONS.items()]
    elif compare:
        out += [(f"torch {op}", {op: TORCH_VERSIONS[op]}) for op in compare.split(",")]
    return [(name + suffix, forced) for name, forced in out]


def run_variant(args, forced: dict, info: dict, first: bool = False) -> dict:
    trainer = None
    try:
        with dispatch.forced(**{op: forced.get(op) for op in dispatch.OPS}):
            trainer = build_trainer(args.depth, args.device, args.device_batch_size, args.seq_len, args.grad_accum,
                                    compile=args.compile, fp8=args.fp8_recipe if args.fp8 else None,
                                    vocab_size=args.vocab_size, window_pattern=args.window_pattern,
                                    recompute_mlp=args.recompute_mlp, fp8_emulate=args.fp8_emulate,
                                    activation_checkpointing=args.activation_checkpointing)
            on_cuda = torch.device(args.device).type == "cuda"
            if on_cuda:
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            trainer.step()  # compiles (model and kernels) and autotunes
            timing.synchronize(trainer.device)
            result = {"first_step_s": time.perf_counter() - t0}
            result |= time_steps(trainer, args.steps, max(args.warmup - 1, 0))
            if on_cuda:
                result["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 1e9
            result["recompute_mlp"], result["checkpoint_blocks"] = trainer.recompute_mlp, trainer.checkpoint_blocks
            try:  # extras: a failure here is recorded, and the timing above is kept
                if first and args.tuned_out and on_cuda:
                    from bench.tune import save_choices
                    path, _ = save_choices(args.tuned_out, info["device"], info["git_commit"])
                    result["tuned_table"] = str(path)
                if first and args.profile:
                    save_profile(args.profile, step_profile.profile_steps(trainer.step, trainer.device), info)
            except Exception as e:  # noqa: BLE001
                result["extras_error"] = f"{type(e).__name__}: {first_line(e)}"
                print(f"  profile / tuned table failed: {result['extras_error']}")
            return result
    finally:
        del trainer
        free(args.device)


def save_profile(path, doc: dict, info: dict) -> None:
    print(step_profile.table(doc))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"kind": "profile", "device": info, **doc}, indent=1))
    print(f"profile: {path}")


def build_parser() -> Parser:
    p = Parser(prog="bench.mfu", description="Time real training steps on random tokens: tok/s and MFU.")
    a = p.add_argument
    a("--depth", type=int, default=20, help="model depth (the one dial)")
    a("--device-batch-size", type=int, default=None,
      help=f"sequences per micro-step (default: {DEVICE_BATCH_SIZE} on CUDA, 2 on CPU)")
    a("--seq-len", type=int, default=None, help=f"context length (default: {MAX_SEQ_LEN} on CUDA, 128 on CPU)")
    a("--grad-accum", type=int, default=1, help="micro-steps per optimizer step")
    a("--steps", type=int, default=10, help="optimizer steps timed")
    a("--warmup", type=int, default=3, help="steps run before timing (compilation, autotuning)")
    a("--vocab-size", type=int, default=VOCAB_SIZE)
    a("--window-pattern", type=str.upper, default=WINDOW_PATTERN)
    a("--compile", action=argparse.BooleanOptionalAction, default=None,
      help="torch.compile the model (default: on for CUDA)")
    a("--recompute-mlp", action=argparse.BooleanOptionalAction, default=None,
      help="recompute relu² in the backward (default: as train.pretrain decides, by the memory estimate)")
    a("--activation-checkpointing", default="auto", choices=CHECKPOINTING,
      help="each layer run again in the backward (auto: as train.pretrain decides, by the memory estimate)")
    a("--fp8", action="store_true", help="FP8 linears through torchao (train/fp8.py)")
    a("--fp8-recipe", default=FP8_RECIPES[0], choices=FP8_RECIPES)
    a("--fp8-emulate", action="store_true", help="allow --fp8 without FP8 hardware (torchao emulation; smoke tests)")
    a("--compare", nargs="?", const="all", default=None, metavar="OP,...",
      help="also run with every kernel forced to its torch version, then each one alone, and print the deltas; "
           "with OPs (e.g. newton_schulz) only those, each alone; 'nanochat': all in torch at once only")
    a("--profile", default=None, metavar="FILE.json",
      help="profile a few steps of the first variant after its timing: time per category and the top kernels")
    a("--tuned-out", default=None, metavar="DIR",
      help="CUDA: write the autotuners' choices after the first variant as DIR/<device>.json (kernels/tuned.py)")
    a("--device", default=None, help="cuda or cpu (default: cuda when available)")
    a("--json", default=None, help="write the results here (rewritten after every run)")
    return p


def validate(args) -> None:
    cuda = torch.cuda.is_available()
    args.device = args.device or ("cuda" if cuda else "cpu")
    if args.device not in ("cuda", "cpu"):
        raise UserError(f"--device must be cuda or cpu, got {args.device!r}")
    if args.device == "cuda" and not cuda:
        raise UserError("--device cuda, but no CUDA device is available")
    on_cuda = args.device == "cuda"
    if args.device_batch_size is None:
        args.device_batch_size = DEVICE_BATCH_SIZE if on_cuda else 2
    if args.seq_len is None:
        args.seq_len = MAX_SEQ_LEN if on_cuda else 128
    args.compile = on_cuda if args.compile is None else args.compile
    for name in ("depth", "device_batch_size", "seq_len", "grad_accum", "steps", "vocab_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.compare not in (None, "all", "nanochat"):
        unknown = [op for op in args.compare.split(",") if op not in TORCH_VERSIONS]
        if unknown:
            raise UserError(f"--compare takes ops among {', '.join(TORCH_VERSIONS)}, got {', '.join(unknown)}")
    if args.warmup < 0:
        raise UserError(f"--warmup must not be negative, got {args.warmup}")
    if args.fp8:
        from train import fp8
        fp8.check_fp8_available(torch.device(args.device), emulate=args.fp8_emulate)  # before building anything


def precision(args) -> str:
    if args.fp8:
        return f"fp8 {args.fp8_recipe}"
    return "bf16 autocast" if args.device == "cuda" else "fp32"


def print_table(rows: list[dict]) -> None:
    base = next((r for r in rows if not r["forced"] and r["status"] == "ok"), None)
    pct = lambda x: "n/a" if x is None else f"{x:.1f}%"  # noqa: E731
    print(f"{'kernels':<22} {'tok/s':>12} {'step ms':>9} {'TFLOP/s':>8} {'MFU H100':>9} {'MFU dev':>8} "
          f"{'default is':>10}")
    for r in rows:
        if r["status"] != "ok":
            print(f"{r['variant']:<22} {r['status']}: {r['reason']}")
            continue
        # how much faster the default kernels make the whole step than this variant
        ratio = f"{base['tokens_per_s'] / r['tokens_per_s']:.3f}x" if base else "n/a"
        print(f"{r['variant']:<22} {r['tokens_per_s']:>12,.0f} {r['step_ms']:>9.1f} {r['tflops']:>8.3g} "
              f"{pct(r['mfu_h100']):>9} {pct(r['mfu_device']):>8} {ratio:>10}"
              + ("" if r["loss_finite"] else "  (loss not finite!)"))


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    validate(args)
    from train.scaling import make_plan
    plan = make_plan(args.depth, max_seq_len=args.seq_len, vocab_size=args.vocab_size,
                     window_pattern=args.window_pattern, device_batch_size=args.device_batch_size,
                     total_batch_size=args.device_batch_size * args.seq_len * args.grad_accum, num_iterations=1000)
    info = timing.device_info(args.device)
    print(f"bench.mfu d{args.depth} (model_dim {plan.model_dim}, {plan.total_params:,} params) on {info['device']} | "
          f"batch {args.device_batch_size} x {args.seq_len} x accum {args.grad_accum} | "
          f"compile {'on' if args.compile else 'off'} | {precision(args)} | "
          f"{args.steps} steps after {args.warmup} warm-up")
    print(f"FLOPs per token {plan.flops_per_token:.4e}")
    doc = {"kind": "mfu", "device": info, "args": vars(args), "depth": args.depth,
           "flops_per_token": plan.flops_per_token, "results": []}
    for i, (name, forced) in enumerate(variants(args.compare, f" + fp8 {args.fp8_recipe}" if args.fp8 else "")):
        row = {"variant": name, "forced": forced, "status": "ok", "reason": None}
        try:
            row |= run_variant(args, forced, info, first=i == 0)
        except UserError:
            raise
        except torch.OutOfMemoryError:
            if not args.compare:
                from train.memory import choose_checkpointing, choose_recompute_mlp, memory_advice
                device = torch.device(args.device)
                recompute = choose_recompute_mlp(args.recompute_mlp, plan, device)
                checkpoint = choose_checkpointing(args.activation_checkpointing, plan, device, "replicated", recompute)
                advice = memory_advice(plan, device, recompute, ran_out=True, checkpoint_blocks=checkpoint)
                raise UserError(f"out of memory at --device-batch-size {args.device_batch_size}: {advice}") from None
            row |= {"status": "error", "reason": "out of memory"}
        except Exception as e:  # noqa: BLE001 - with --compare one failing variant must not lose the others
            if not args.compare:
                raise
            row |= {"status": "error", "reason": f"{type(e).__name__}: {first_line(e)}"}
        doc["results"].append(row)
        if row["status"] == "ok":
            print(f"  {name}: {row['tokens_per_s']:,.0f} tok/s, {row['tflops']:.3g} TFLOP/s, "
                  f"MFU {row['mfu_h100']:.1f}% of the H100 peak")
        else:
            print(f"  {name}: {row['status']}: {row['reason']}")
        if args.json:
            path = Path(args.json)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(doc, indent=1))
    print()
    print_table(doc["results"])
    if args.json:
        print(f"results: {args.json}")


if __name__ == "__main__":
    run_cli(main)
