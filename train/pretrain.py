"""Pretrain nanochat's GPT from one dial.

    python -m train.pretrain --depth 20                      # one device
    torchrun --nproc_per_node=8 -m train.pretrain --depth 20 --fp8
    python -m train.pretrain --depth 20 --dry-run            # the plan, no data, no memory

Every hyperparameter not given follows from --depth through the scaling laws in train/scaling.py.
train() sets the run up (start) and runs loop(): per step evaluate if due, save if due, one optimizer step, log.
"""
import argparse
import dataclasses
import json
import math
import os
import signal
import time
import typing
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from kernels import dispatch
from model import config as model_config
from model.gpt import GPT
from train import checkpoint, distributed, fp8, fsdp, memory, metrics, optim, resume, scaling
from train.builder import build_model_and_optimizer, schedule_of
from train.dataloader import DataLoader
from train.dataset import DEFAULT_DATASET, dataset_fingerprint, ensure_dataset, split_shards
from train.distributed import DistInfo
from train.errors import Parser, UserError, require, run_cli
from train.evaluate import evaluate_bpb, sample
from train.memory import (RECOMPUTE_SAVES, choose_recompute_mlp, estimate_memory_gib, gpu_memory_gib,
                          memory_advice)
from train.metrics import MetricsLog, format_duration, mfu, peak_bf16_flops
from train.paths import checkpoint_dir, plain_name, tokenizer_dir
from train.scaling import Plan, make_plan
from train.step import TrainStep, autocast_for
from train.tokenizer import Tokenizer, load_tokenizer

print0 = distributed.print0


def build_parser() -> Parser:
    p = Parser(prog="train.pretrain", description="Pretrain a GPT sized by --depth at compute-optimal settings.")
    a = p.add_argument
    a("--run", default="dummy", help="wandb run name; 'dummy' disables wandb")
    a("--depth", type=int, default=20, help="number of transformer layers: the one dial that sizes everything")
    a("--aspect-ratio", type=int, default=model_config.ASPECT_RATIO,
      help="model_dim = depth x aspect_ratio, rounded up to a multiple of head_dim")
    a("--head-dim", type=int, default=model_config.HEAD_DIM, help="target size of one attention head")
    a("--max-seq-len", type=int, default=model_config.MAX_SEQ_LEN, help="context length")
    a("--window-pattern", type=str.upper, default=model_config.WINDOW_PATTERN,
      help="per-layer window, tiled: L = full, S = half context; last layer always L")
    a("--num-iterations", type=int, default=-1, help="explicit number of optimizer steps (highest precedence)")
    a("--target-flops", type=float, default=-1, help="steps = target_flops / (flops_per_token x total_batch_size)")
    a("--target-param-data-ratio", type=float, default=scaling.TARGET_PARAM_DATA_RATIO,
      help="tokens = ratio x scaling params (the default mode)")
    a("--device-batch-size", type=int, default=scaling.DEVICE_BATCH_SIZE, help="sequences per device per micro-step")
    a("--total-batch-size", type=int, default=-1, help="tokens per optimizer step over all devices; -1 = scaling law")
    a("--matrix-lr", type=float, default=optim.MATRIX_LR, help="Muon learning rate for the matrices in the blocks")
    a("--embedding-lr", type=float, default=optim.EMBEDDING_LR,
      help="AdamW learning rate for the token (and value) embeddings")
    a("--unembedding-lr", type=float, default=optim.UNEMBEDDING_LR, help="AdamW learning rate for lm_head")
    a("--scalar-lr", type=float, default=optim.SCALAR_LR, help="AdamW learning rate for the per-layer scalars")
    a("--weight-decay", type=float, default=scaling.WEIGHT_DECAY,
      help="Muon weight decay at the reference size (rescaled)")
    a("--adam-beta1", type=float, default=optim.ADAM_BETAS[0])
    a("--adam-beta2", type=float, default=optim.ADAM_BETAS[1])
    a("--warmup-ratio", type=float, default=optim.WARMUP_RATIO, help="fraction of steps with linear LR warmup")
    a("--warmdown-ratio", type=float, default=optim.WARMDOWN_RATIO,
      help="fraction of steps, at the end, with linear LR warmdown")
    a("--final-lr-frac", type=float, default=optim.FINAL_LR_FRAC, help="final LR as a fraction of the peak")
    a("--eval-every", type=int, default=250, help="val bpb every N steps (and at the last); -1 disables")
    a("--eval-tokens", type=int, default=40 * 524288, help="tokens per validation pass")
    a("--core-metric-every", type=int, default=2000, help="CORE metric every N steps (and at the last); -1 disables")
    a("--core-metric-max-per-task", type=int, default=500, help="examples per CORE task")
    a("--sample-every", type=int, default=2000, help="greedy samples every N steps (and at the last); -1 disables")
    a("--save-every", type=int, default=-1, help="checkpoint every N steps; -1 = only at the end")
    a("--keep-last", type=int, default=-1, help="after each save keep only the newest N checkpoints; -1 = all")
    a("--async-save", action="store_true",
      help="write checkpoints in the background while training goes on (each rank's share copied to host memory "
           "first; the last one and a stop signal's are written before the run ends)")
    a("--device-type", default="", help="cuda, cpu or mps; empty = autodetect")
    a("--fp8", action="store_true", help="FP8 training of the large linears through torchao (H100 and newer)")
    a("--fp8-recipe", default=fp8.RECIPES[0], choices=fp8.RECIPES, help="torchao float8 recipe")
    a("--fp8-emulate", action="store_true", help="allow --fp8 without FP8 hardware (torchao emulation; for tests)")
    a("--resume-from-step", type=resume_step, default=-1,
      help="resume from the checkpoint at that step; 'latest': the last one saved, if any (for requeued jobs)")
    a("--model-tag", default=None, help="checkpoint folder name; default d{depth}")
    # beyond the spec's table
    a("--dataset", default=DEFAULT_DATASET, help="folder of parquet shards under $NANOCHAT_BASE_DIR/data/")
    a("--set-aside", action="store_true",
      help="move the folder's checkpoints after the resumed step (all of them on a fresh start), and its metrics "
           "file, into FOLDER/set-aside-<UTC time>/ instead of refusing to mix two runs' checkpoints")
    a("--allow-data-change", action="store_true",
      help="resume even though the dataset's name, training shards or their content differ from the checkpoint's")
    a("--fsdp", default="auto", choices=fsdp.MODES,
      help="shard the weights, gradients and optimizer state over the ranks (FSDP2) instead of replicating the "
           "model; auto: on where the replicated plan would not fit 90%% of each GPU's memory and FSDP2's would")
    a("--compile", action=argparse.BooleanOptionalAction, default=None,
      help="torch.compile the model (default: on for CUDA)")
    a("--seed", type=int, default=42, help="seed for the initial weights")
    a("--recompute-mlp", action=argparse.BooleanOptionalAction, default=None,
      help=f"recompute each MLP's relu² in the backward instead of keeping it: {round(100 * RECOMPUTE_SAVES)}%% less "
           "activation memory per layer for one more elementwise pass (default: on when the plan would not fit in "
           "90%% of the GPU's memory otherwise)")
    a("--activation-checkpointing", default="auto", choices=memory.CHECKPOINTING,
      help="keep only each layer's input for the backward and run the layer again there (about a third more compute; "
           "auto: on where the plan would not fit 90%% of the GPU's memory even with relu² recomputed)")
    for op in dispatch.OPS:
        a(f"--kernel-{op.replace('_', '-')}", default="auto", choices=dispatch.choices(op),
          help=f"force the {op.replace('_', ' ')} implementation (A/B)")
    a("--dry-run", action="store_true", help="print the plan (and one JSON line) and exit; needs no data")
    a("--world-size", type=int, default=None,
      help="--dry-run only: plan for this many ranks (a run's world size is torchrun's)")
    a("--gpu-memory-gib", type=float, default=None,
      help="--dry-run only: plan for GPUs of this much memory (default: this machine's GPU, else an H100 80GB)")
    return p


def resume_step(text: str) -> int | str:
    if text == "latest":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a step number or 'latest', got {text!r}") from None


CADENCES = ("eval_every", "save_every", "sample_every", "core_metric_every")  # -1 turns one off
LEARNING_RATES = ("matrix_lr", "embedding_lr", "unembedding_lr", "scalar_lr")


def validate(args) -> None:
    """Range checks of the flags (train.scaling.make_plan checks the model's shape and the batch): 0 and
    negative values mean something only where the spec gives -1 a meaning."""
    require(0 <= args.warmup_ratio <= 1 and 0 <= args.warmdown_ratio <= 1
            and args.warmup_ratio + args.warmdown_ratio <= 1,
            "--warmup-ratio and --warmdown-ratio must lie in [0, 1] and add up to at most 1")
    require(0 <= args.final_lr_frac <= 1, f"--final-lr-frac must lie in [0, 1], got {args.final_lr_frac}")
    for name in LEARNING_RATES + ("weight_decay",):
        value = getattr(args, name)
        require(math.isfinite(value) and value >= 0, f"--{name.replace('_', '-')} must be a finite number >= 0, "
                                                     f"got {value}")
    for name in ("adam_beta1", "adam_beta2"):
        require(0 <= getattr(args, name) < 1, f"--{name.replace('_', '-')} must lie in [0, 1), got "
                                              f"{getattr(args, name)}")
    for name in CADENCES + ("num_iterations", "core_metric_max_per_task", "keep_last"):
        value = getattr(args, name)
        require(value == -1 or value >= 1, f"--{name.replace('_', '-')} must be at least 1, or -1 "
                                           f"({'off' if name in CADENCES else 'the default'}); got {value}")
    require(args.target_flops == -1 or (math.isfinite(args.target_flops) and args.target_flops > 0),
            f"--target-flops must be a positive number, or -1; got {args.target_flops}")
    require(math.isfinite(args.target_param_data_ratio),
            f"--target-param-data-ratio must be a finite number, got {args.target_param_data_ratio}")
    require(args.eval_tokens >= 1, f"--eval-tokens must be positive, got {args.eval_tokens}")
    require(0 <= args.seed < 2**64, f"--seed must be an integer in [0, 2^64), got {args.seed}")
    require(args.resume_from_step == "latest" or args.resume_from_step >= -1,
            f"--resume-from-step must be a step (>= 0), -1 (start fresh) or latest; got {args.resume_from_step}")
    if args.model_tag is not None:
        plain_name(args.model_tag, "--model-tag")
    for name in ("world_size", "gpu_memory_gib"):
        flag = f"--{name.replace('_', '-')}"
        require(getattr(args, name) is None or args.dry_run,
                f"{flag} is for --dry-run only: a run takes its world size from torchrun and its memory from the GPU")
    require(args.world_size is None or args.world_size >= 1, f"--world-size must be at least 1, got {args.world_size}")
    require(args.gpu_memory_gib is None or (math.isfinite(args.gpu_memory_gib) and args.gpu_memory_gib > 0),
            f"--gpu-memory-gib must be a positive number, got {args.gpu_memory_gib}")


class StopSignal:
    """Remembers SIGTERM or SIGUSR1 (what schedulers send before they stop a job), SIGINT (Ctrl-C) and SIGHUP
    (a closed terminal) instead of dying at once: the run saves at the end of its step. A second Ctrl-C stops
    at once (KeyboardInterrupt). Its handlers are installed by stop_signals()."""
    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGHUP)

    def __init__(self):
        self.received: signal.Signals | None = None

    def receive(self, number, frame) -> None:
        if number == signal.SIGINT and self.received is not None:
            raise KeyboardInterrupt
        self.received = self.received or signal.Signals(number)
        if number == signal.SIGINT:
            print0(f"{signal.Signals(number).name}: saving at the end of this step (Ctrl-C again to stop now)")


@contextmanager
def stop_signals(stop: StopSignal) -> Iterator[StopSignal]:
    """stop receives the signals within the block (the training loop; during set-up they stop the process at once,
    as by default); the previous handlers are back after it."""
    previous = {sig: signal.signal(sig, stop.receive) for sig in StopSignal.SIGNALS}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def load_tokenizer_or_none():
    if not tokenizer_dir().exists():
        return None
    return load_tokenizer()


def plan_of(args, tokenizer):
    vocab_size = tokenizer.vocab_size if tokenizer is not None else model_config.VOCAB_SIZE
    return make_plan(args.depth, aspect_ratio=args.aspect_ratio, head_dim=args.head_dim, max_seq_len=args.max_seq_len,
                     vocab_size=vocab_size, window_pattern=args.window_pattern,
                     device_batch_size=args.device_batch_size, total_batch_size=args.total_batch_size,
                     num_iterations=args.num_iterations, target_flops=args.target_flops,
                     target_param_data_ratio=args.target_param_data_ratio, weight_decay=args.weight_decay,
                     world_size=args.world_size or int(os.environ.get("WORLD_SIZE", 1)))


def optimizer_groups(plan, args) -> list[dict]:
    """Every optimizer group's peak LR, betas and weight decay as the plan sets them (AdamW's decay is constant
    and decoupled; Muon's LR is also x sqrt(max(1, rows / cols)) per shape, its decay a cosine to 0)."""
    lrs = {g.lr_flag: getattr(args, g.lr_flag) for g in optim.ADAMW_GROUPS if g.lr_flag}
    groups = [{"group": name, "optimizer": "adamw", "lr": lr, "betas": list(betas), "weight_decay": wd}
              for name, lr, betas, wd in optim.adamw_settings(lrs, (args.adam_beta1, args.adam_beta2),
                                                             plan.lr_scale, plan.adam_width_scale)]
    momentum = "->".join(map(str, optim.MUON_MOMENTUM))
    return groups + [{"group": "matrices", "optimizer": "muon", "lr": args.matrix_lr * plan.lr_scale,
                      "momentum": momentum, "beta2": optim.MUON_BETA2, "weight_decay": plan.weight_decay}]


def print_plan(plan, args, memory_gib) -> None:
    print(f"depth {plan.config.n_layer}: model_dim {plan.model_dim}, n_head {plan.n_head}, "
          f"head_dim {plan.config.head_dim}, vocab {plan.config.vocab_size} (padded {plan.config.padded_vocab_size}), "
          f"windows {plan.config.window_sizes()}")
    for group, count in plan.params.items():
        print(f"  params {group:>22}: {count:,}")
    print(f"scaling params {plan.scaling_params:,} | total params {plan.total_params:,}")
    print(f"target tokens {plan.target_tokens:,} | total batch {plan.total_batch_size:,} tokens | "
          f"steps {plan.num_iterations:,} | grad accum {plan.grad_accum_steps}")
    print(f"LR scale {plan.lr_scale:.4f} | AdamW width scale {plan.adam_width_scale:.4f} | "
          f"Muon weight decay {plan.weight_decay:.5f}")
    print(f"FLOPs per token {plan.flops_per_token:.4e} | total FLOPs "
          f"{plan.flops_per_token * plan.total_batch_size * plan.num_iterations:.4e}")
    for g in optimizer_groups(plan, args):
        more = (f"betas {tuple(g['betas'])}" if g["optimizer"] == "adamw" else
                f"momentum {g['momentum']}, beta2 {g['beta2']}")
        print(f"  {g['optimizer']:>5} {g['group']:>14}: lr {g['lr']:.5g} | {more} | "
              f"weight decay {g['weight_decay']:.4g}")
    if memory_gib is not None:
        print(f"estimated GPU memory per device: {memory_gib:.1f} GiB, or "
              f"{estimate_memory_gib(plan, recompute_mlp=True):.1f} GiB with relu² recomputed, or "
              f"{estimate_memory_gib(plan, recompute_mlp=True, checkpoint_blocks=True):.1f} GiB with blocks "
              "checkpointed too (--recompute-mlp, --activation-checkpointing: automatic where the one before would "
              "not fit) (estimates)")


def print_memory(plan, table: dict) -> None:
    """memory.plan_memory's table: per mode one rank's estimate and the fewest GPUs that fit it."""
    print(f"per-rank GPU memory at world size {plan.world_size}, device batch {plan.device_batch_size} "
          f"(estimates; fits: within {table['headroom']:.0%} of {table['gpu_gib']:.1f} GiB, {table['gpu']}):")
    names = {"kept": "relu² kept", "recomputed": "relu² recomputed", "checkpointed": "blocks checkpointed"}
    for mode, name in (("replicated", "replicated"), ("fsdp", "FSDP2")):
        cells = [f"{names[how]} {table[mode][how]['gib']:6.1f} GiB, fewest GPUs "
                 f"{table[mode][how]['fewest_gpus'] or 'none':>4}" for how in names]
        fits, checkpointed = table[mode]["largest_device_batch"], table[mode]["largest_device_batch_checkpointed"]
        print(f"  {name:>10}: {' | '.join(cells)} | largest device batch that fits here: {fits or 'none'}, "
              f"checkpointed {checkpointed or 'none'}")
    print(f"  --fsdp auto at this world size: {'FSDP2' if table['fsdp_auto'] else 'replicated'}; "
          f"--activation-checkpointing auto: {'on' if table['activation_checkpointing_auto'] else 'off'}")


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    validate(args)
    tokenizer = load_tokenizer_or_none()
    plan = plan_of(args, tokenizer)
    if args.dry_run:
        print_plan(plan, args, estimate_memory_gib(plan, recompute_mlp=False))
        table = memory.plan_memory(plan, args.gpu_memory_gib)
        print_memory(plan, table)
        print(json.dumps(plan.to_json() | {"optimizer_groups": optimizer_groups(plan, args), "memory": table}))
        return
    use_fsdp = fsdp.wanted(args.fsdp, args.device_type or distributed.autodetect_device_type())
    dist_info = distributed.setup(args.device_type, group=use_fsdp)  # FSDP2 needs a group even alone
    if args.fsdp == "auto":  # more than one rank has its group already; alone it stays replicated
        use_fsdp, why = memory.choose_fsdp(args.fsdp, args.recompute_mlp, plan, dist_info.device,
                                           args.activation_checkpointing)
        if why:
            print0(why)
    dist_info.fsdp = use_fsdp
    try:
        train(args, plan, tokenizer, dist_info)
    except dispatch.KernelUnavailable as e:  # a forced kernel that cannot run here: one line, exit 2
        raise UserError(str(e)) from None
    except torch.OutOfMemoryError:  # a batch too large for this GPU is bad input: say what would fit
        recompute = choose_recompute_mlp(args.recompute_mlp, plan, dist_info.device, dist_info.mode)
        checkpointing = memory.choose_checkpointing(args.activation_checkpointing, plan, dist_info.device,
                                                    dist_info.mode, recompute)
        advice = memory_advice(plan, dist_info.device, recompute, ran_out=True, mode=dist_info.mode,
                               checkpoint_blocks=checkpointing)
        raise UserError(f"out of GPU memory at --device-batch-size {args.device_batch_size}: {advice}") from None
    except (MemoryError, RuntimeError) as e:  # torch's CPU allocator raises a RuntimeError
        if not isinstance(e, MemoryError) and "can't allocate memory" not in str(e):
            raise
        raise UserError(f"out of CPU memory (--device-batch-size {args.device_batch_size}, --max-seq-len "
                        f"{args.max_seq_len}): use a smaller batch or a machine with more RAM") from None
    finally:
        distributed.cleanup()


# ----------------------------------------------------------------------------------------------
# The run: its state, set up once, then the loop of named steps


@dataclass
class LoopState:
    """What a resumed run continues (each checkpoint's meta holds it as loop_state)."""
    smooth_loss: float = 0.0
    training_time: float = 0.0
    val_bpb: float | None = None
    min_val_bpb: float | None = None
    core_metric: float | None = None
    passes_done: int = 0  # passes over the train split announced so far
    evaluated_step: int | None = None  # the last step whose evaluations (val bpb, CORE, samples) ran

    @classmethod
    def from_meta(cls, saved: dict, step: int) -> "LoopState":
        """The loop state saved with step, each value of its field's type (a checkpoint from before evaluated_step
        evaluated before it saved)."""
        types = typing.get_type_hints(cls)
        values = {"evaluated_step": step} | {k: v for k, v in saved.items() if k in types}
        wrong = [k for k, v in values.items() if isinstance(v, bool) or not isinstance(v, types[k])]
        if wrong:
            raise UserError(f"the loop state of checkpoint step {step} has values of the wrong type for "
                            f"{', '.join(wrong)}: its meta is damaged")
        return cls(**values)


@dataclass
class Run:
    args: argparse.Namespace
    plan: Plan
    tokenizer: Tokenizer
    dist: DistInfo
    ckpt_dir: Path
    orig_model: GPT  # the uncompiled module: evaluation, sampling, saving
    train_step: TrainStep  # the (compiled) model, the optimizer, the schedules, the batches
    loader: DataLoader
    log: MetricsLog
    loop_state: LoopState
    stop: StopSignal  # receives the stop signals while loop() runs (stop_signals)
    start_step: int
    resumed: bool
    step: int
    stop_at: int | None = None  # the step a stop signal ends the run at, once every rank knows of it
    val_repeats_said: bool = False
    in_the_way: list = dataclasses.field(default_factory=list)  # later checkpoints set aside at the start
    passed_over_suspect: bool = False  # one of them was marked suspect
    saver: checkpoint.BackgroundSaves | None = None  # --async-save

    @property
    def device(self) -> torch.device:
        return self.dist.device

    @property
    def optimizer(self) -> optim.MuonAdamW:
        return self.train_step.optimizer

    @property
    def autocast(self):
        return self.train_step.autocast

    def in_bf16(self):
        """Evaluation, sampling and saving see plain linears (bf16 weights), FP8 training or not."""
        return fp8.fp8_disabled(self.orig_model) if self.args.fp8 else nullcontext()


def train(args, plan, tokenizer, dist_info) -> None:
    if dist_info.is_master:
        print_plan(plan, args, None)
    check_inputs(args, tokenizer, dist_info.device)
    ckpt_dir = checkpoint_dir(args.model_tag or f"d{args.depth}")
    lock = take_folder(ckpt_dir) if dist_info.is_master else None  # released however the run ends, but killed
    forced = {op: getattr(args, f"kernel_{op}") for op in dispatch.OPS}
    try:
        with dispatch.forced(**forced):
            run = start(args, plan, tokenizer, dist_info, ckpt_dir)
            try:
                with stop_signals(run.stop):
                    loop(run)
            finally:
                run.log.close()
                failed = run.saver.close() if run.saver is not None else None  # before the lock goes
                if failed:
                    print0(f"warning: {failed}")
    finally:
        if lock is not None:
            lock.release()
    if dist_info.is_master:
        plot_curves(ckpt_dir)


def loop(run: Run) -> None:
    """Until the last step: evaluate if due, save if due, stop if a signal came, one optimizer step, log."""
    plan = run.plan
    complete = run.step == plan.num_iterations and run.loop_state.evaluated_step == run.step
    if complete:
        print0(f"step {run.step} is the last (--num-iterations {plan.num_iterations}) and was evaluated and saved: "
               "the run is complete")
    while not complete:
        last, stopping = run.step == plan.num_iterations, run.step == run.stop_at
        if not stopping and run.loop_state.evaluated_step != run.step:  # a resumed run: not again what was done
            evaluate_if_due(run, last)
        if saves_at(run, run.step):
            save(run)
        if stopping:
            print0(f"stopped by {run.stop.received.name} at step {run.step}: "
                   f"resume with --resume-from-step {run.step}")
            raise SystemExit(128 + run.stop.received)
        if last:
            break
        loss, lrm, dt = optimizer_step(run)
        agree_on_stop(run, loss)
        log_step(run, loss, lrm, dt)
    if run.device.type == "cuda":
        print0(f"peak memory {torch.cuda.max_memory_allocated(run.device) / 2**30:.2f} GiB")
    state = run.loop_state
    print0(f"done: val bpb {state.val_bpb}, min val bpb {state.min_val_bpb}, "
           f"training time {format_duration(state.training_time)}")


def plot_curves(ckpt_dir) -> None:
    """metrics.png next to the checkpoints; a plot that cannot be made costs a line, never the finished run."""
    from train.plot import plot_runs
    try:
        print0(f"curves: {plot_runs([ckpt_dir], ckpt_dir / 'metrics.png')}")
    except Exception as e:  # noqa: BLE001 - matplotlib missing or failing must not fail a run that is done
        print0(f"no curves plotted: {e}")


def start(args, plan, tokenizer, dist_info, ckpt_dir) -> Run:
    """Check everything first, on every rank (the checkpoint to resume, its model, optimizer, loader and loop
    state, the folder's other checkpoints, wandb, the first batch); once every rank has, change the folder (set
    aside, the metrics file continued)."""
    run = distributed.on_every_rank(build_run, args, plan, tokenizer, dist_info, ckpt_dir)
    if dist_info.is_master:  # sure to run now
        tidy_folder(ckpt_dir, run.in_the_way, run.start_step if run.resumed else None)
    if args.async_save:  # its process group: made by every rank together, now that each is sure to go on
        run.saver = checkpoint.BackgroundSaves(dist_info.world_size)
    distributed.barrier()
    return run


def build_run(args, plan, tokenizer, dist_info, ckpt_dir) -> Run:
    device, rank, world = dist_info.device, dist_info.rank, dist_info.world_size
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    start_step, meta = resume_meta(args, plan, tokenizer, ckpt_dir, rank, world)
    loop_state = LoopState.from_meta(meta["loop_state"], start_step) if meta else LoopState()
    if meta and start_step == plan.num_iterations and meta.get("plan", {}).get("num_iterations") != start_step:
        loop_state.evaluated_step = None  # saved on the way to a later last step: evaluate it as the last
    in_the_way = checkpoints_in_the_way(args, ckpt_dir, start_step if meta else None)
    use_compile = args.compile if args.compile is not None else device.type == "cuda"
    model_state = resume.model_state(ckpt_dir, start_step, device, dist_info.fsdp) if meta else None
    model, optimizer, converted = build_model_and_optimizer(
        plan, args, device,
        choose_recompute_mlp(args.recompute_mlp, plan, device, dist_info.mode),
        dist_info.distributed, model_state=model_state,
        fsdp=dist_info.fsdp, compile_blocks=use_compile, fresh=meta is None)  # FSDP2: blocks compiled before sharding
    model.checkpoint_blocks = memory.choose_checkpointing(args.activation_checkpointing, plan, device, dist_info.mode,
                                                          model.recompute_mlp)
    if meta:  # on another world size or in another mode than the checkpoint's: resharded
        resume.load_state(model, optimizer, ckpt_dir, start_step, meta["world_size"], world, device, print0,
                          weights=model_state is None)
    describe_model(args, plan, device, model, converted, dist_info.mode)
    states = (meta or {}).get("dataloader")  # every rank's position (absent: from the data's beginning)
    loader = DataLoader(tokenizer, args.device_batch_size, args.max_seq_len, split="train", dataset=args.dataset,
                        rank=rank, world_size=world, device=device, state=states)  # dealt anew on another world
    log = MetricsLog(ckpt_dir / "metrics.jsonl", run=args.run, config=vars(args) | plan.to_json(),
                     enabled=dist_info.is_master)
    batches = loader.batches()
    whole = use_compile and not dist_info.fsdp  # the replicated model is compiled whole
    train_step = TrainStep(torch.compile(model, dynamic=False) if whole else model, optimizer,
                           schedule_of(plan, args), batches, plan.grad_accum_steps, autocast_for(device),
                           next(batches))
    print0(f"training {plan.num_iterations} steps from step {start_step} on {world} x {device.type}, "
           f"compile={'on' if use_compile else 'off'}, checkpoints in {ckpt_dir}")
    replicas = world // optimizer.world_size if dist_info.fsdp else 1  # HSDP: a copy of the model per node
    if replicas > 1 and optimizer.world_size == 1:
        print0("warning: FSDP2 with one rank per node shards nothing (each node holds a whole copy of the model): "
               "--fsdp off communicates less")
    print0("data parallel: " + ("replicated (the optimizer state sharded over the ranks)" if not dist_info.fsdp else
                                "FSDP2 (weights, gradients and optimizer state sharded over the ranks)" if replicas == 1
                                else f"HSDP (FSDP2 over each node's {optimizer.world_size} "
                                     f"rank{'s' * (optimizer.world_size > 1)}, replicated over {replicas} nodes)"))
    return Run(args, plan, tokenizer, dist_info, ckpt_dir, model, train_step, loader, log, loop_state,
               StopSignal(), start_step, resumed=meta is not None, step=start_step, in_the_way=in_the_way,
               passed_over_suspect=any(checkpoint.suspect_marker(ckpt_dir, s).exists() for s in in_the_way))


def checkpoints_in_the_way(args, ckpt_dir: Path, resumed: int | None) -> list[int]:
    """The folder's checkpoints after the resumed step (all of them on a fresh start): another run's, or a later
    point of this one. Refused unless --set-aside, so that a run's checkpoints never mix with another's and
    --keep-last never deletes the run's own; the ones that could not be resumed anyway (damaged or marked suspect:
    with `latest`, every later one) are set aside without asking."""
    later = [s for s in checkpoint.saved_steps(ckpt_dir) if resumed is None or s > resumed]
    usable = [s for s in later if args.resume_from_step != "latest" and checkpoint.meta_damage(ckpt_dir, s) is None]
    if usable and not args.set_aside:
        what = "of an earlier run" if resumed is None else f"after step {resumed}"
        raise UserError(f"{ckpt_dir} holds checkpoints {what} (steps {', '.join(map(str, usable))}): resume the "
                        "newest with --resume-from-step latest, give this run another --model-tag, or pass "
                        "--set-aside to move them out of the way")
    return later


def tidy_folder(ckpt_dir: Path, in_the_way: list[int], resumed: int | None) -> None:
    """Rank 0, once the run is sure to start: the checkpoints in the way (and a copy of the metrics file) go to a
    set-aside folder; the metrics file continues at the resumed step (an earlier run's is moved aside)."""
    if in_the_way:
        aside = checkpoint.set_aside(ckpt_dir, in_the_way)
        print0(f"set aside the checkpoints of steps {', '.join(map(str, in_the_way))} in {aside}")
    said = metrics.continue_file(ckpt_dir / "metrics.jsonl", resumed, aside if in_the_way else None)
    if said:
        print0(f"metrics: {said}")


def take_folder(ckpt_dir) -> checkpoint.FolderLock:
    """Rank 0 locks the run's folder (one run writes there at a time), then removes what killed saves left."""
    lock = checkpoint.FolderLock(ckpt_dir)
    if lock.previous:
        print0(f"warning: took over the lock of {ckpt_dir}, left by a run that ended without releasing it "
               f"({lock.previous})")
    removed = checkpoint.remove_leftovers(ckpt_dir)
    if removed:
        print0(f"removed what unfinished saves left in {ckpt_dir}: {', '.join(removed)}")
    return lock


def check_inputs(args, tokenizer, device) -> None:
    """What a run needs before it builds anything: FP8 support, a tokenizer, the data, the CORE bundle."""
    if args.fp8:
        fp8.check_fp8_available(device, emulate=args.fp8_emulate)
    if tokenizer is None:
        raise UserError("no tokenizer found: train one with "
                        f"`python -m train.tokenizer train --dataset {args.dataset}`")
    ensure_dataset(args.dataset)
    if distributed.is_rank0():  # a folder from before the stored digests: hashed once, now, by one rank
        dataset_fingerprint(args.dataset)
    distributed.barrier()
    if args.core_metric_every > 0:  # the eval bundle now, so that a missing one fails before training, not after
        from train.core_eval import ensure_eval_bundle
        try:
            ensure_eval_bundle()
        except UserError as e:
            raise UserError(f"{e} (or turn CORE off with --core-metric-every -1)") from None


def resume_meta(args, plan, tokenizer, ckpt_dir, rank: int = 0, world: int = 1) -> tuple[int, dict | None]:
    """(the step to start from, the meta of the checkpoint to resume, its files and it checked against this model,
    tokenizer and data; or 0, None)."""
    step = resume.pick_step(args.resume_from_step, ckpt_dir, print0, fresh_ok=args.set_aside, rank=rank, world=world)
    if step < 0:
        return 0, None
    meta = checkpoint.load_meta(ckpt_dir, step)
    if args.resume_from_step != "latest":  # latest: its files have just been checked
        resume.verify(ckpt_dir, step, rank, world)
    if step > plan.num_iterations:
        raise UserError(f"checkpoint step {step} is past this run's last step ({plan.num_iterations}, from "
                        "--num-iterations or the scaling law): nothing is left to train; raise --num-iterations to "
                        "go on from it")
    if resume.check_meta(meta, args, plan, tokenizer, [p.name for p in split_shards(args.dataset, "train")],
                         ckpt_dir):
        print0(f"--allow-data-change: the data differs from step {step}'s; the loader starts at its beginning")
        meta = {k: v for k, v in meta.items() if k != "dataloader"}
    changed = resume.changed_flags(meta, args)
    if changed:
        print0(f"resuming step {step} with other settings than its run, in effect from here: {', '.join(changed)}")
    return step, meta


def describe_model(args, plan, device, model, converted: list[str], mode: str = "replicated") -> None:
    if args.fp8:
        print0(f"fp8 ({args.fp8_recipe}): converted {len(converted)} linear layers")
    print0(f"MLP relu² {'recomputed in the backward' if model.recompute_mlp else 'kept for the backward'}")
    print0("activation checkpointing: " + ("each layer run again in the backward, only its input kept"
                                           if model.checkpoint_blocks else "off"))
    if model.checkpoint_blocks and args.activation_checkpointing == "auto":
        print0(memory.checkpointing_note(plan, device, mode, model.recompute_mlp))
    memory_now = dict(mode=mode, checkpoint_blocks=model.checkpoint_blocks)
    if device.type == "cuda" and estimate_memory_gib(plan, model.recompute_mlp, **memory_now) > gpu_memory_gib(device):
        print0(f"warning: {memory_advice(plan, device, model.recompute_mlp, **memory_now)}")


def saves_at(run: Run, step: int) -> bool:
    every = run.args.save_every
    return step in (run.plan.num_iterations, run.stop_at) or (every > 0 and step > run.start_step
                                                                 and step % every == 0)


def due(every: int, step: int, last: bool) -> bool:
    return every > 0 and (last or step % every == 0)


def evaluate_if_due(run: Run, last: bool) -> None:
    """Val bpb, CORE and samples, each at its cadence and at the last step."""
    args, step = run.args, run.step
    if due(args.eval_every, step, last):
        bpb = val_bpb(run)
        if not math.isfinite(bpb):
            raise UserError(f"val bpb became {bpb} at step {step}; {resume.last_good(run.ckpt_dir)}")
        state = run.loop_state
        state.val_bpb = bpb
        state.min_val_bpb = bpb if state.min_val_bpb is None else min(state.min_val_bpb, bpb)
        print0(f"step {step:05d} | val bpb {bpb:.4f}")
        run.log.log({"step": step, "val/bpb": bpb})
    if due(args.core_metric_every, step, last) and step > 0:
        from train.core_eval import evaluate_core
        with evaluating(run):
            core = evaluate_core(run.orig_model, run.tokenizer, run.device, args.core_metric_max_per_task,
                                 run.autocast)
        run.loop_state.core_metric = core["core_metric"]
        print0(f"step {step:05d} | CORE {core['core_metric']:.4f}"
               + (f" ({core['cropped']} example(s) cropped to what the model can take)" if core["cropped"] else ""))
        run.log.log({"step": step, "core_metric": core["core_metric"]})
    # FSDP2: every rank runs the model (its forward gathers the weights), rank 0 prints
    if due(args.sample_every, step, last) and (last or step > 0) and (run.dist.is_master or run.dist.fsdp):
        with evaluating(run):
            for text in sample(run.orig_model, run.tokenizer, autocast=run.autocast):
                print0(f"  sample: {text!r}")
    run.loop_state.evaluated_step = step


@contextmanager
def evaluating(run: Run):
    """The model uncompiled (FSDP2 compiles its blocks in place: run eagerly) in eval mode, with plain linears, for
    the block; back in training mode after, FSDP2's weights sharded again (an eval leaves some gathered)."""
    run.orig_model.eval()
    try:
        with run.in_bf16(), torch.compiler.set_stance("force_eager") if run.dist.fsdp else nullcontext():
            yield
    finally:
        run.orig_model.train()
        if run.dist.fsdp:
            fsdp.reshard(run.orig_model)


def val_bpb(run: Run) -> float:
    """Bits per byte on the same validation tokens every time (the val split from its start)."""
    args, world = run.args, run.dist.world_size
    batches = DataLoader(run.tokenizer, args.device_batch_size, args.max_seq_len, split="val",
                         dataset=args.dataset, rank=run.dist.rank, world_size=world, device=run.device)
    steps = max(1, args.eval_tokens // (args.device_batch_size * args.max_seq_len * world))
    with evaluating(run):
        bpb = evaluate_bpb(run.orig_model, batches, steps, run.tokenizer.token_bytes.to(run.device), run.autocast)
    if batches.batch_epoch > 1 and not run.val_repeats_said:
        run.val_repeats_said = True
        print0(f"note: --eval-tokens {args.eval_tokens:,} is more than the val split of {args.dataset!r} holds: "
               "a val pass reads some of its documents more than once")
    return bpb


def save(run: Run) -> None:
    """Every rank's part of the model and optimizer state (DCP) and its loader position, rank 0's meta; --keep-last
    prunes after.
    Nothing is saved when any rank holds a non-finite weight or optimizer state, or a weight far beyond anything
    training makes (a diverged run that is still finite): the run stops instead."""
    step = run.step
    bad = [name for names in distributed.all_gather_objects(unsaveable(run)) for name in names]
    if bad:
        raise UserError(f"non-finite or diverged values at step {step} in {', '.join(bad[:3])}"
                        f"{f' and {len(bad) - 3} more' if len(bad) > 3 else ''}: not saved; "
                        f"{resume.last_good(run.ckpt_dir)}")
    meta = {"step": step, "model_config": run.plan.config.to_dict(), "user_config": vars(run.args),
            "plan": run.plan.to_json(), "val_bpb": run.loop_state.val_bpb, "world_size": run.dist.world_size,
            "dataloader": distributed.all_gather_objects(run.train_step.batch.resume_point.to_dict()),
            "loop_state": dataclasses.asdict(run.loop_state),
            "tokenizer": run.tokenizer.fingerprint,
            "dataset": {"name": run.args.dataset, "train_shards": [p.name for p in run.loader.paths],
                        "digests": dataset_fingerprint(run.args.dataset)}}
    # --async-save: in the background, but for the last step's and a stop signal's (the run ends there)
    background = run.saver is not None and step not in (run.plan.num_iterations, run.stop_at)
    try:
        if run.saver is not None:  # the one before, first: one at a time
            run.saver.wait()
        if run.resumed and step == run.start_step:  # nothing trained since it was saved: a new meta only
            if run.dist.is_master:
                checkpoint.rewrite_meta(run.ckpt_dir, step, meta)
            return saved(run, step)
        model = run.orig_model  # FSDP2: its state dict holds this rank's rows (DTensors)
        plain = run.args.fp8 and not run.dist.fsdp  # FSDP2's FP8 linears hold their weights as DTensors
        state = {"model": fp8.plain_state_dict(model) if plain else model.state_dict(),
                 "optimizer": optim.named_state(run.optimizer, {p: n for n, p in model.named_parameters()})}
        if background:
            run.saver.start(run.ckpt_dir, step, state, meta, run.dist.rank, lambda s: saved(run, s))
        else:
            checkpoint.save_checkpoint(run.ckpt_dir, step, state, meta, rank=run.dist.rank,
                                       world=run.dist.world_size, gather=distributed.all_gather_objects)
            saved(run, step)
    except checkpoint.CheckpointWriteError as e:  # disk full, quota, permissions: the previous one is whole
        raise UserError(f"could not write the checkpoint of step {getattr(e, 'step', step)} ({e}); "
                        f"{resume.last_good(run.ckpt_dir)}") from None


def saved(run: Run, step: int) -> None:
    """Said once the checkpoint of step is whole (from the writing thread with --async-save); --keep-last after."""
    print0(f"step {step:05d} | saved checkpoint to {run.ckpt_dir}")
    if run.args.keep_last > 0 and run.dist.is_master:
        for old in checkpoint.prune(run.ckpt_dir, run.args.keep_last):
            print0(f"step {step:05d} | deleted the checkpoint of step {old} (--keep-last {run.args.keep_last})")


WEIGHT_LIMIT = 1e8  # no weight of a healthy run comes near this (they stay within a few hundred)


def unsaveable(run: Run) -> list[str]:
    """Names of this rank's parameters and optimizer state tensors holding NaN or inf, and of the parameters with a
    value beyond WEIGHT_LIMIT (one device sync)."""
    params = list(run.orig_model.named_parameters())
    names = {id(p): n for n, p in params}
    state = [(f"{names.get(id(p), '?')} ({k})", v) for p, st in run.optimizer.state.items() for k, v in st.items()
             if torch.is_tensor(v) and v.is_floating_point()]
    if not params and not state:
        return []
    ok = torch.stack([healthy(p.detach(), WEIGHT_LIMIT) for _, p in params] + [healthy(t) for _, t in state]).cpu()
    return [n for (n, _), good in zip(params + state, ok.tolist()) if not good]


def healthy(t: torch.Tensor, limit: float | None = None) -> torch.Tensor:
    """t is finite (and within limit): a 0-d bool tensor. FSDP2: of this rank's rows only (maybe none)."""
    t = optim._local(t)
    ok = t.isfinite().all()
    return ok & (t.abs().max() < limit) if limit is not None and t.numel() else ok


def optimizer_step(run: Run) -> tuple[float, float, float]:
    """One step of run.train_step, timed; returns (the mean loss of its micro-batches, the LR multiplier, seconds)."""
    if run.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.time()
    loss, lrm = run.train_step(run.step)
    loss_value = loss.item()  # syncs the device
    dt = time.time() - t0
    run.step += 1
    if run.loader.passes_done > run.loop_state.passes_done:  # once per pass (the loop state is resumed)
        run.loop_state.passes_done = run.loader.passes_done
        print0(f"step {run.step:05d} | the train split of {run.args.dataset!r} is being read again "
               f"(pass {run.loop_state.passes_done + 1}): the data repeats")
    return loss_value, lrm, dt


def agree_on_stop(run: Run, loss: float) -> None:
    """Every rank learns of a signal any rank received (and which one), and of a non-finite loss on any rank, in one
    collective: they all stop at the same step, or all stop at once with the same message."""
    signal_number, diverged_somewhere = distributed.max_over_ranks(
        [int(run.stop.received or 0), int(not math.isfinite(loss))], run.device)
    if diverged_somewhere:
        what = f"loss became {loss}" if not math.isfinite(loss) else "the loss became non-finite on another rank"
        raise UserError(f"{what} at step {run.step - 1}; {diverged(run)}")
    if signal_number and run.stop_at is None:
        run.stop.received = signal.Signals(signal_number)
        run.stop_at = run.step


def diverged(run: Run) -> str:
    """Where to go on from after the loss became non-finite. At the first step after a resume the checkpoint itself
    may be bad: it is marked suspect (`latest` passes over it) and the one before it is named; unless this run
    already passed over a suspect one, when the cause is likely elsewhere (and nothing is marked)."""
    step, folder = run.step - 1, run.ckpt_dir
    if not (run.resumed and step == run.start_step):
        return resume.last_good(folder)
    if run.passed_over_suspect:
        return (f"it diverged at once from checkpoint step {step} too, after `latest` passed over a checkpoint "
                "marked suspect: the cause is likely not the checkpoints (a changed flag, the data, the machine); "
                "nothing more is marked")
    if run.dist.is_master:
        checkpoint.mark_suspect(folder, step, "the loss became non-finite at the first step after resuming it")
    return (f"it diverged at once from checkpoint step {step}, which may itself be bad: it is marked suspect and "
            f"`--resume-from-step latest` passes over it (delete {checkpoint.suspect_marker(folder, step)} to use it "
            f"again); {resume.last_good(folder)}")


def log_step(run: Run, loss: float, lrm: float, dt: float) -> None:
    plan, state, step = run.plan, run.loop_state, run.step
    state.smooth_loss = 0.9 * state.smooth_loss + 0.1 * loss
    debiased = state.smooth_loss / (1 - 0.9 ** step)
    done = step - run.start_step
    if done > 10:  # the first steps include compilation
        state.training_time += dt
    tok_per_sec = plan.total_batch_size / dt
    peak = peak_bf16_flops(torch.cuda.get_device_name(run.device)) if run.device.type == "cuda" else None
    util = mfu(plan.flops_per_token, tok_per_sec, peak, run.dist.world_size)
    eta = (state.training_time / (done - 10)) * (plan.num_iterations - step) if done > 10 else float("nan")
    print0(f"step {step:05d}/{plan.num_iterations} ({100 * step / plan.num_iterations:.1f}%) | loss {debiased:.4f} | "
           f"lrm {lrm:.3f} | dt {dt * 1000:.0f}ms | tok/s {tok_per_sec:,.0f} | "
           f"mfu {'n/a' if util is None else f'{util:.1f}%'} | time {format_duration(state.training_time)} | "
           f"eta {'?' if math.isnan(eta) else format_duration(eta)}")
    run.log.log({"step": step, "train/loss": debiased, "train/loss_step": loss, "train/lrm": lrm, "train/dt": dt,
                 "train/tok_per_sec": tok_per_sec, "train/mfu": util,
                 "total_flops": plan.flops_per_token * plan.total_batch_size * step})


if __name__ == "__main__":
    run_cli(main)
