"""The model and its optimizer, built one way for pretraining, the bench tools, CORE and sampling.

The GPT is built on the meta device (no memory), materialised on the target device and initialised there;
FP8 conversion (torchao) comes after the weights are loaded and before torch.compile and the optimizer.
"""
import torch

from kernels import dispatch
from model.config import GPTConfig
from model.gpt import GPT
from train.errors import UserError
from train.optim import Schedule, make_optimizer


def build_model(config: GPTConfig, device, seed: int | None = None, recompute_mlp: bool = False) -> GPT:
    """A freshly initialised GPT on device (seeded first when seed is given)."""
    if seed is not None:
        torch.manual_seed(seed)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()
    model.recompute_mlp = recompute_mlp
    return model


def build_sharded_model(config: GPTConfig, device, seed: int | None = None, recompute_mlp: bool = False,
                        compile: bool = False, convert=None, initialise: bool = True) -> GPT:
    """A freshly initialised GPT sharded by FSDP2 (train.fsdp.shard_model) over the process group, never whole on
    any rank: built (and convert(model)ed: FP8's linears) and sharded on the meta device, each rank's rows
    materialised, then every parameter initialised in init_weights' order, drawn whole (the very random numbers
    build_model draws for it: bit for bit its model) and cut to this rank's rows. Peak memory: this rank's rows plus
    the largest single parameter. initialise False (a checkpoint's rows come next): the parameters are NaN instead,
    so that one the checkpoint would not fill could not pass for trained."""
    from torch.distributed.tensor import DTensor

    from train.fsdp import shard_model
    device = torch.device(device)
    if seed is not None:
        torch.manual_seed(seed)
    with torch.device("meta"):
        model = GPT(config)
    model.recompute_mlp = recompute_mlp
    if convert is not None:  # module swaps: before FSDP2 holds on to the modules
        convert(model)
    shard_model(model, device, compile=compile)
    model.to_empty(device=device)
    with torch.no_grad():
        for tensor, init in model.init_steps():
            if not isinstance(tensor, DTensor):  # the buffers (rotary tables): whole on every rank
                init(tensor)
                continue
            local = tensor.to_local()
            if not initialise:
                local.fill_(float("nan"))
                continue
            full = torch.empty(tensor.shape, dtype=tensor.dtype, device=local.device)
            init(full)
            mesh, shards = tensor.device_mesh, tensor.device_mesh.ndim - 1  # HSDP: (replicas, shards)
            pieces = full.chunk(mesh.size(shards), dim=0)  # FSDP2's Shard(0) rows: torch.chunk's
            rank = mesh.get_local_rank(shards)
            if local.numel():
                local.copy_(pieces[rank])
            del full, pieces
    return model


def convert_to_fp8(model: GPT, recipe: str, emulate: bool = False) -> list[str]:
    """The model's large linears to torchao Float8Linear (lm_head too where the fused loss is not in use)."""
    from train import fp8
    fused_ce = dispatch.requested("cross_entropy") not in ("torch", "compile")
    return fp8.convert_to_fp8(model, recipe, fused_ce=fused_ce, emulate=emulate)


def build_optimizer(model: GPT, plan, args, distributed: bool = False, fsdp: bool = False):
    """MuonAdamW over the model's parameter groups, with the flags' learning rates scaled as the plan says."""
    return make_optimizer(model.param_groups(), matrix_lr=args.matrix_lr, embedding_lr=args.embedding_lr,
                          unembedding_lr=args.unembedding_lr, scalar_lr=args.scalar_lr,
                          adam_betas=(args.adam_beta1, args.adam_beta2), weight_decay=plan.weight_decay,
                          lr_scale=plan.lr_scale, adam_width_scale=plan.adam_width_scale, distributed=distributed,
                          fsdp=fsdp)


def build_model_and_optimizer(plan, args, device, recompute_mlp: bool, distributed: bool = False,
                              model_state: dict | None = None, fsdp: bool = False,
                              compile_blocks: bool = False, fresh: bool = True) -> tuple[GPT, object, list[str]]:
    """(model, optimizer, names of the FP8 linears) as train.pretrain runs them: seeded init or model_state,
    then FP8 when args.fp8, then (fsdp) the model sharded, its blocks compiled first when compile_blocks, then the
    optimizer; fresh False: FSDP2's rows are left for a checkpoint to fill (not initialised). args carries
    train.pretrain's flags (its parser's defaults)."""
    if fsdp and model_state is None:  # FSDP2, fresh or to load its rows: never the whole model on a rank
        converted = []
        model = build_sharded_model(plan.config, device, seed=args.seed, recompute_mlp=recompute_mlp,
                                    compile=compile_blocks, convert=lambda m: converted.extend(
                                        convert_to_fp8(m, args.fp8_recipe, emulate=args.fp8_emulate) if args.fp8
                                        else []), initialise=fresh)
        return model, build_optimizer(model, plan, args, distributed, fsdp), converted
    model = build_model(plan.config, device, seed=args.seed, recompute_mlp=recompute_mlp)
    if model_state is not None:  # whole, on every rank: FSDP2 then keeps each rank's rows
        load_weights(model, model_state)
    converted = convert_to_fp8(model, args.fp8_recipe, emulate=args.fp8_emulate) if args.fp8 else []
    if fsdp:
        from train.fsdp import shard_model
        shard_model(model, device, compile=compile_blocks)
    return model, build_optimizer(model, plan, args, distributed, fsdp), converted


def find_checkpoint(model_tag: str, step: int | None, note=print) -> tuple:
    """(folder, meta, tokenizer) of the checkpoint that --model-tag and --step name, checked before any weights
    are read (train.core_eval and train.sample). step None: the newest that verifies, as --resume-from-step latest
    picks it (newer damaged or suspect ones are passed over, each named through note). The saved tokenizer must
    be the one the checkpoint was trained with."""
    from train import checkpoint, resume
    from train.paths import checkpoint_dir, plain_name
    from train.tokenizer import load_tokenizer
    ckpt_dir = checkpoint_dir(plain_name(model_tag, "--model-tag"))
    if step is None:
        step, skipped = checkpoint.newest_good_step(ckpt_dir)
        if step is None:
            raise UserError(f"no checkpoints in {ckpt_dir}" if not skipped else
                            f"no checkpoint in {ckpt_dir} verifies (step {skipped[0][0]}: {skipped[0][1]})")
        for bad, why in skipped:
            note(f"skipped step {bad} of {ckpt_dir}: {why}")
    meta = checkpoint.load_meta(ckpt_dir, step)  # an explicit step that is not there: one line naming those that are
    if "model_config" not in meta:
        raise UserError(f"the meta of step {step} in {ckpt_dir} lacks model_config: it was not written by "
                        "train.pretrain")
    tokenizer = load_tokenizer()
    resume.check_tokenizer(meta, tokenizer)
    return ckpt_dir, meta, tokenizer


def model_from_checkpoint(ckpt_dir, step: int, device) -> tuple[GPT, dict]:
    """(the GPT of a saved checkpoint, in eval mode, its meta)."""
    from train import checkpoint
    meta = checkpoint.load_meta(ckpt_dir, step)
    model = build_model(GPTConfig(**meta["model_config"]), device)
    load_weights(model, checkpoint.load_model_state(ckpt_dir, step, device))
    return model.eval(), meta


def load_weights(model: GPT, state: dict) -> None:
    """The checkpoint's weights into model; one line when they are of another architecture (an earlier
    version's model has no smear and backout, and its attention was not sharpened: it cannot continue here)."""
    missing, unexpected = set(model.state_dict()) - set(state), set(state) - set(model.state_dict())
    if missing or unexpected:
        earlier = {"smear_gate.weight", "smear_lambda", "backout_lambda"} <= missing and not unexpected
        raise UserError("the checkpoint is of an earlier architecture (before smear, backout and the sharper "
                        "attention): this version cannot continue or evaluate it; use the version that wrote it"
                        if earlier else f"the checkpoint's weights are not this model's: missing "
                        f"{sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}")
    model.load_state_dict(state)


def schedule_of(plan, args) -> Schedule:
    """The run's LR, momentum and weight-decay schedules from train.pretrain's flags."""
    return Schedule(plan.num_iterations, args.warmup_ratio, args.warmdown_ratio, args.final_lr_frac)
