"""Pretrain nanochat's GPT from one dial.

    python -m train.pretrain --depth 20                      # one device
    torchrun --nproc_per_node=8 -m train.pretrain --depth 20 --fp8
    python -m train.pretrain --depth 20 --dry-run            # the plan, no data, no memory

Flags follow ../shared/spec/pretraining.md; every hyperparameter not given follows from --depth
through the scaling laws in train/scaling.py.
"""
import argparse
import json
import math
import os
import signal
import time
from contextlib import nullcontext

import torch

from kernels import dispatch
from train.errors import Parser, UserError, run_cli
from train.scaling import choose_recompute_mlp, estimate_memory_gib, gpu_memory_gib, make_plan, memory_advice


def build_parser() -> Parser:
    p = Parser(prog="train.pretrain", description="Pretrain a GPT sized by --depth at compute-optimal settings.")
    a = p.add_argument
    a("--run", default="dummy", help="wandb run name; 'dummy' disables wandb")
    a("--depth", type=int, default=20, help="number of transformer layers: the one dial that sizes everything")
    a("--aspect-ratio", type=int, default=64, help="model_dim = depth x aspect_ratio, rounded up to a multiple of head_dim")
    a("--head-dim", type=int, default=128, help="target size of one attention head")
    a("--max-seq-len", type=int, default=2048, help="context length")
    a("--window-pattern", default="SSSL", help="per-layer window, tiled: L = full, S = half context; last layer always L")
    a("--num-iterations", type=int, default=-1, help="explicit number of optimizer steps (highest precedence)")
    a("--target-flops", type=float, default=-1, help="steps = target_flops / (flops_per_token x total_batch_size)")
    a("--target-param-data-ratio", type=float, default=10.5, help="tokens = ratio x scaling params (the default mode)")
    a("--device-batch-size", type=int, default=32, help="sequences per device per micro-step")
    a("--total-batch-size", type=int, default=-1, help="tokens per optimizer step over all devices; -1 = scaling law")
    a("--matrix-lr", type=float, default=0.02, help="Muon learning rate for the matrices in the blocks")
    a("--embedding-lr", type=float, default=0.3, help="AdamW learning rate for the token (and value) embeddings")
    a("--unembedding-lr", type=float, default=0.004, help="AdamW learning rate for lm_head")
    a("--scalar-lr", type=float, default=0.5, help="AdamW learning rate for the per-layer scalars")
    a("--weight-decay", type=float, default=0.2, help="Muon weight decay at the reference size (rescaled)")
    a("--adam-beta1", type=float, default=0.8)
    a("--adam-beta2", type=float, default=0.95)
    a("--warmup-ratio", type=float, default=0.0, help="fraction of steps with linear LR warmup")
    a("--warmdown-ratio", type=float, default=0.5, help="fraction of steps, at the end, with linear LR warmdown")
    a("--final-lr-frac", type=float, default=0.0, help="final LR as a fraction of the peak")
    a("--eval-every", type=int, default=250, help="val bpb every N steps (and at the last); -1 disables")
    a("--eval-tokens", type=int, default=40 * 524288, help="tokens per validation pass")
    a("--core-metric-every", type=int, default=2000, help="CORE metric every N steps (and at the last); -1 disables")
    a("--core-metric-max-per-task", type=int, default=500, help="examples per CORE task")
    a("--sample-every", type=int, default=2000, help="greedy samples every N steps (and at the last); -1 disables")
    a("--save-every", type=int, default=-1, help="checkpoint every N steps; -1 = only at the end")
    a("--keep-last", type=int, default=-1, help="after each save keep only the newest N checkpoints; -1 = all")
    a("--device-type", default="", help="cuda, cpu or mps; empty = autodetect")
    a("--fp8", action="store_true", help="FP8 training of the large linears through torchao (H100 and newer)")
    a("--fp8-recipe", default="tensorwise", choices=["tensorwise", "rowwise"], help="torchao float8 recipe")
    a("--fp8-emulate", action="store_true", help="allow --fp8 without FP8 hardware (torchao emulation; for tests)")
    a("--resume-from-step", type=resume_step, default=-1,
      help="resume from the checkpoint at that step; 'latest': the last one saved, if any (for requeued jobs)")
    a("--model-tag", default=None, help="checkpoint folder name; default d{depth}")
    # beyond the spec's table
    a("--dataset", default="climbmix", help="folder of parquet shards under $NANOCHAT_BASE_DIR/data/")
    a("--compile", action=argparse.BooleanOptionalAction, default=None,
      help="torch.compile the model (default: on for CUDA)")
    a("--seed", type=int, default=42, help="seed for the initial weights")
    a("--recompute-mlp", action=argparse.BooleanOptionalAction, default=None,
      help="recompute each MLP's relu² in the backward instead of keeping it: 18%% less activation memory for "
           "one more elementwise pass per layer (default: on when the plan would not fit in 90%% of the GPU's "
           "memory otherwise)")
    a("--kernel-attention", default="auto", choices=["auto", "triton", "fa3", "fa2", "sdpa", "flex", "torch"],
      help="force the attention implementation (A/B)")
    a("--kernel-cross-entropy", default="auto", choices=["auto", "triton", "torch", "compile", "liger", "cce"],
      help="force the loss implementation (A/B)")
    a("--kernel-newton-schulz", default="auto", choices=["auto", "triton", "triton_full", "torch"],
      help="force the Muon orthogonalization implementation (A/B)")
    a("--dry-run", action="store_true", help="print the plan (and one JSON line) and exit; needs no data")
    return p


def resume_step(text: str) -> int | str:
    if text == "latest":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a step number or 'latest', got {text!r}") from None


def validate(args) -> None:
    """Checks of flags that the plan does not see (train.scaling.make_plan checks the rest)."""
    args.window_pattern = args.window_pattern.upper()
    if not 0 <= args.warmup_ratio <= 1 or not 0 <= args.warmdown_ratio <= 1 or args.warmup_ratio + args.warmdown_ratio > 1:
        raise UserError("--warmup-ratio and --warmdown-ratio must lie in [0, 1] and add up to at most 1")
    if args.eval_tokens < 1:
        raise UserError(f"--eval-tokens must be positive, got {args.eval_tokens}")
    if args.keep_last == 0 or args.keep_last < -1:
        raise UserError(f"--keep-last must be at least 1, or -1 to keep every checkpoint; got {args.keep_last}")


class StopSignal:
    """Remembers a SIGTERM or SIGUSR1 (what schedulers send before they stop a job) instead of dying at once."""

    def __init__(self):
        self.received: signal.Signals | None = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._receive)

    def _receive(self, number, frame) -> None:
        self.received = signal.Signals(number)


def load_tokenizer_or_none():
    from train.tokenizer import load_tokenizer, tokenizer_dir
    if not tokenizer_dir().exists():
        return None
    return load_tokenizer()


def print_plan(plan, memory_gib) -> None:
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
    if memory_gib is not None:
        print(f"estimated GPU memory per device: {memory_gib:.1f} GiB, or "
              f"{estimate_memory_gib(plan, recompute_mlp=True):.1f} GiB with relu² recomputed "
              f"(--recompute-mlp: automatic where the first would not fit) (estimates)")


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    validate(args)
    from train import distributed

    world_size = int(os.environ.get("WORLD_SIZE", 1))
    tokenizer = load_tokenizer_or_none()
    vocab_size = tokenizer.vocab_size if tokenizer is not None else 32768
    plan = make_plan(args.depth, aspect_ratio=args.aspect_ratio, head_dim=args.head_dim, max_seq_len=args.max_seq_len,
                     vocab_size=vocab_size, window_pattern=args.window_pattern,
                     device_batch_size=args.device_batch_size, total_batch_size=args.total_batch_size,
                     num_iterations=args.num_iterations, target_flops=args.target_flops,
                     target_param_data_ratio=args.target_param_data_ratio, weight_decay=args.weight_decay,
                     world_size=world_size)
    if args.dry_run:
        print_plan(plan, estimate_memory_gib(plan, recompute_mlp=False))
        print(json.dumps(plan.to_json()))
        return

    dist_info = distributed.setup(args.device_type)
    try:
        train(args, plan, tokenizer, dist_info)
    except dispatch.KernelUnavailable as e:  # a forced kernel that cannot run here: one line, exit 2
        raise UserError(str(e))
    except torch.OutOfMemoryError:  # a batch too large for this GPU is bad input: say what would fit
        recompute = choose_recompute_mlp(args.recompute_mlp, plan, dist_info.device)
        advice = memory_advice(plan, dist_info.device, recompute, ran_out=True)
        raise UserError(f"out of GPU memory at --device-batch-size {args.device_batch_size}: {advice}") from None
    finally:
        distributed.cleanup()


def train(args, plan, tokenizer, dist_info) -> None:
    from model.gpt import GPT
    from train import checkpoint, distributed
    from train.dataloader import DataLoader
    from train.dataset import ensure_dataset
    from train.evaluate import evaluate_bpb, sample
    from train.optim import lr_multiplier, make_optimizer, muon_momentum, weight_decay_at
    from train.report import MetricsLog, format_duration, mfu, peak_bf16_flops

    print0 = distributed.print0
    device, rank, world = dist_info.device, dist_info.rank, dist_info.world_size
    if dist_info.is_master:
        print_plan(plan, None)
    fp8 = None  # the train.fp8 module when --fp8 is on: torchao is imported only then
    if args.fp8:
        from train import fp8
        fp8.check_fp8_available(device, emulate=args.fp8_emulate)
    if tokenizer is None:
        raise UserError("no tokenizer found: train one with "
                        f"`python -m train.tokenizer train --dataset {args.dataset}`")
    ensure_dataset(args.dataset)
    if args.core_metric_every > 0:  # the eval bundle now, so that a missing one fails before training, not after
        from train.core_eval import ensure_eval_bundle
        try:
            ensure_eval_bundle()
        except UserError as e:
            raise UserError(f"{e} (or turn CORE off with --core-metric-every -1)")
    for op, impl in (("attention", args.kernel_attention), ("cross_entropy", args.kernel_cross_entropy),
                     ("newton_schulz", args.kernel_newton_schulz)):
        dispatch.force(op, impl)
    use_compile = args.compile if args.compile is not None else device.type == "cuda"
    autocast = (torch.autocast(device_type="cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext())
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    # Resume: the checkpoint must match this model and tokenizer.
    model_tag = args.model_tag or f"d{args.depth}"
    ckpt_dir = checkpoint.checkpoint_dir(model_tag)
    meta = None
    start_step = 0
    if args.resume_from_step == "latest":  # rank 0's view of the folder decides for every rank
        saved = checkpoint.saved_steps(ckpt_dir)
        args.resume_from_step = distributed.all_gather_objects(saved[-1] if saved else -1)[0]
        found = f"step {args.resume_from_step}" if args.resume_from_step >= 0 else "no checkpoint yet, starting from scratch"
        print0(f"--resume-from-step latest: {found} in {ckpt_dir}")
    if args.resume_from_step >= 0:
        meta = checkpoint.load_meta(ckpt_dir, args.resume_from_step)
        if meta["model_config"] != plan.config.to_dict():
            if meta["model_config"].get("vocab_size") != plan.config.vocab_size:
                raise UserError(f"the tokenizer's vocabulary ({plan.config.vocab_size}) does not match the "
                                f"checkpoint's ({meta['model_config'].get('vocab_size')})")
            raise UserError(f"checkpoint step {args.resume_from_step} in {ckpt_dir} is a different model: "
                            f"{meta['model_config']} vs {plan.config.to_dict()}")
        start_step = meta["step"]

    # Model: built on the meta device (no memory), materialised on ours, then initialised or loaded.
    torch.manual_seed(args.seed)
    with torch.device("meta"):
        orig_model = GPT(plan.config)
    orig_model.to_empty(device=device)
    orig_model.init_weights()
    if meta is not None:
        orig_model.load_state_dict(checkpoint.load_model_state(ckpt_dir, start_step, device))
    if fp8:
        fused_ce = dispatch.requested("cross_entropy") not in ("torch", "compile")
        converted = fp8.convert_to_fp8(orig_model, args.fp8_recipe, fused_ce=fused_ce, emulate=args.fp8_emulate)
        print0(f"fp8 ({args.fp8_recipe}): converted {len(converted)} linear layers")

    def in_bf16():  # eval, sampling and saving see plain linears (bf16 weights), FP8 or not
        return fp8.fp8_disabled(orig_model) if fp8 else nullcontext()
    orig_model.recompute_mlp = choose_recompute_mlp(args.recompute_mlp, plan, device)
    print0(f"MLP relu² {'recomputed in the backward' if orig_model.recompute_mlp else 'kept for the backward'}")
    if device.type == "cuda" and estimate_memory_gib(plan, orig_model.recompute_mlp) > gpu_memory_gib(device):
        print0(f"warning: {memory_advice(plan, device, orig_model.recompute_mlp)}")
    model = torch.compile(orig_model, dynamic=False) if use_compile else orig_model

    optimizer = make_optimizer(orig_model.param_groups(), matrix_lr=args.matrix_lr, embedding_lr=args.embedding_lr,
                               unembedding_lr=args.unembedding_lr, scalar_lr=args.scalar_lr,
                               adam_betas=(args.adam_beta1, args.adam_beta2), weight_decay=plan.weight_decay,
                               lr_scale=plan.lr_scale, adam_width_scale=plan.adam_width_scale,
                               distributed=dist_info.distributed)
    if meta is not None:
        optimizer.load_state_dict(checkpoint.load_optimizer_state(ckpt_dir, start_step, rank, device))

    B, T = args.device_batch_size, args.max_seq_len
    loader_states = (meta or {}).get("dataloader")
    loader_state = None
    if loader_states:
        loader_state = loader_states[rank] if len(loader_states) == world else loader_states[0]
    train_loader = DataLoader(tokenizer, B, T, split="train", dataset=args.dataset, rank=rank, world_size=world,
                              device=device, state=loader_state)
    train_iter = iter(train_loader)
    token_bytes = tokenizer.token_bytes.to(device)
    eval_steps = max(1, args.eval_tokens // (B * T * world))

    def val_bpb() -> float:
        val_iter = iter(DataLoader(tokenizer, B, T, split="val", dataset=args.dataset, rank=rank,
                                   world_size=world, device=device))
        orig_model.eval()
        with in_bf16():
            bpb = evaluate_bpb(orig_model, val_iter, eval_steps, token_bytes, autocast)
        orig_model.train()
        return bpb

    peak = peak_bf16_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    log = MetricsLog(ckpt_dir / "metrics.jsonl", run=args.run, config=vars(args) | plan.to_json(),
                     enabled=dist_info.is_master)
    loop = (meta or {}).get("loop_state", {"smooth_loss": 0.0, "training_time": 0.0, "val_bpb": None,
                                           "min_val_bpb": None, "core_metric": None})
    N, grad_accum = plan.num_iterations, plan.grad_accum_steps

    stop = StopSignal()  # SIGTERM or SIGUSR1 (preemption, scancel): save at the next step and exit
    stop_at = None  # the step a stop signal ends the run at, once every rank knows of it

    def saves_at(s: int) -> bool:
        return s in (N, stop_at) or (args.save_every > 0 and s > start_step and s % args.save_every == 0)

    # The loader state saved with a checkpoint is the one from before the batch we hold, so a resumed
    # run trains on that batch first. Taken only ahead of a saving step (it walks the document buffer).
    loader_state_now = train_loader.state_dict()
    x, y = next(train_iter)
    print0(f"training {N} steps from step {start_step} on {world} x {device.type}, "
           f"compile={'on' if use_compile else 'off'}, checkpoints in {ckpt_dir}")

    step = start_step
    while True:
        last = step == N
        stopping = step == stop_at  # only the checkpoint: an evaluation could outlast the signal's grace period
        evals = not stopping and (step > start_step or meta is None)
        if evals and args.eval_every > 0 and (last or step % args.eval_every == 0):
            bpb = val_bpb()
            loop["val_bpb"] = bpb
            loop["min_val_bpb"] = bpb if loop["min_val_bpb"] is None else min(loop["min_val_bpb"], bpb)
            print0(f"step {step:05d} | val bpb {bpb:.4f}")
            log.log({"step": step, "val/bpb": bpb})
        if evals and args.core_metric_every > 0 and step > start_step and (last or step % args.core_metric_every == 0):
            from train.core_eval import evaluate_core
            orig_model.eval()
            with in_bf16():
                core = evaluate_core(orig_model, tokenizer, device, args.core_metric_max_per_task, autocast)
            orig_model.train()
            loop["core_metric"] = core["core_metric"]
            print0(f"step {step:05d} | CORE {core['core_metric']:.4f}")
            log.log({"step": step, "core_metric": core["core_metric"]})
        samples = args.sample_every > 0 and (last or (step > 0 and step % args.sample_every == 0))
        if evals and samples and dist_info.is_master:
            orig_model.eval()
            with in_bf16():
                for text in sample(orig_model, tokenizer, autocast=autocast):
                    print0(f"  sample: {text!r}")
            orig_model.train()
        if saves_at(step):
            state = {"step": step, "model_config": plan.config.to_dict(), "user_config": vars(args),
                     "plan": plan.to_json(), "val_bpb": loop["val_bpb"], "world_size": world,
                     "dataloader": distributed.all_gather_objects(loader_state_now), "loop_state": loop}
            model_state = fp8.plain_state_dict(orig_model) if fp8 else orig_model.state_dict()
            try:
                checkpoint.save_checkpoint(ckpt_dir, step, model_state, optimizer.state_dict(), state, rank=rank,
                                           barrier=distributed.barrier)
            except OSError as e:  # disk full, quota, permissions: the previous checkpoint is still whole
                have = checkpoint.saved_steps(ckpt_dir)
                raise UserError(f"could not write the checkpoint of step {step} to {ckpt_dir} ({e.strerror or e}); "
                                f"the last good one is " + (f"step {have[-1]}" if have else "none")) from None
            print0(f"step {step:05d} | saved checkpoint to {ckpt_dir}")
            if args.keep_last > 0 and dist_info.is_master:
                for old in checkpoint.prune(ckpt_dir, args.keep_last):
                    print0(f"step {step:05d} | deleted the checkpoint of step {old} (--keep-last {args.keep_last})")
        if stopping:
            print0(f"stopped by {stop.received.name} at step {step}: resume with --resume-from-step {step}")
            log.close()
            raise SystemExit(128 + stop.received)
        if last:
            break

        # One optimizer step: grad_accum micro-steps, the next batch fetched while the GPU works.
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.time()
        for micro in range(grad_accum):
            with autocast:
                loss = model(x, y)
            train_loss = loss.detach()
            (loss / grad_accum).backward()
            if micro == grad_accum - 1 and saves_at(step + 1):
                loader_state_now = train_loader.state_dict()
            x, y = next(train_iter)
        lrm = lr_multiplier(step, N, args.warmup_ratio, args.warmdown_ratio, args.final_lr_frac)
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * lrm
            if "initial_weight_decay" in group:
                group["momentum"] = muon_momentum(step)
                group["weight_decay"] = weight_decay_at(step, N, group["initial_weight_decay"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = train_loss.item()  # syncs the device
        if stop_at is None:  # every rank learns of a signal any rank received (and which one)
            agreed = distributed.max_over_ranks(int(stop.received or 0), device)
            if agreed:
                stop.received = signal.Signals(agreed)
                stop_at = step + 2  # one more step, so that its last micro-step captures the loader state first
        dt = time.time() - t0
        if not math.isfinite(loss_value):
            raise UserError(f"loss became {loss_value} at step {step}; the last good checkpoint is in {ckpt_dir}")

        step += 1
        loop["smooth_loss"] = 0.9 * loop["smooth_loss"] + 0.1 * loss_value
        debiased = loop["smooth_loss"] / (1 - 0.9 ** step)
        if step - start_step > 10:  # the first steps include compilation
            loop["training_time"] += dt
        tok_per_sec = plan.total_batch_size / dt
        util = mfu(plan.flops_per_token, tok_per_sec, peak, world)
        done = step - start_step
        eta = (loop["training_time"] / max(1, done - 10)) * (N - step) if done > 10 else float("nan")
        print0(f"step {step:05d}/{N} ({100 * step / N:.1f}%) | loss {debiased:.4f} | lrm {lrm:.3f} | "
               f"dt {dt * 1000:.0f}ms | tok/s {tok_per_sec:,.0f} | "
               f"mfu {'n/a' if util is None else f'{util:.1f}%'} | "
               f"time {format_duration(loop['training_time'])} | "
               f"eta {'?' if math.isnan(eta) else format_duration(eta)}")
        log.log({"step": step, "train/loss": debiased, "train/loss_step": loss_value, "train/lrm": lrm, "train/dt": dt,
                 "train/tok_per_sec": tok_per_sec, "train/mfu": util,
                 "total_flops": plan.flops_per_token * plan.total_batch_size * step})

    if device.type == "cuda":
        print0(f"peak memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB")
    print0(f"done: val bpb {loop['val_bpb']}, min val bpb {loop['min_val_bpb']}, "
           f"training time {format_duration(loop['training_time'])}")
    log.close()


if __name__ == "__main__":
    run_cli(main)
