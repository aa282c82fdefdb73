"""MuonAdamW: Muon for the 2-D matrices inside the transformer blocks, AdamW for everything else.

Three versions with the same math and the same param groups:
  MuonAdamW      one device.
  DistMuonAdamW  several ranks without DDP, ZeRO-2 style: each rank reduce-scatters the gradients,
                 updates only its share (and keeps optimizer state only for it), then all-gathers weights.
  FSDPMuonAdamW  over FSDP2's sharded parameters (train.fsdp).
A checkpoint holds named_state(): every rank's share keyed by parameter name, each tensor global, so that DCP loads it
onto any world size and either mode (load_named_state). Format 2's per-rank state_dict()s are put together by
full_state() and cut for another world size by shard_state().

Muon, per shape (all matrices of one shape are stacked and updated as one batch):
  Nesterov momentum -> MuonEq (each row rescaled to the matrix's mean row norm) -> Polar Express
  orthogonalization (kernels.newton_schulz) -> Muon+ (each matrix rescaled to Frobenius norm
  sqrt(min(rows, cols)), that of an exactly semi-orthogonal one) -> NorMuon per-row (tall) / per-column
  (wide) second-moment normalisation -> cautious weight decay + update, the lr times sqrt(max(1, rows / cols)).
AdamW: decoupled weight decay per group, bias-corrected moments, eps 1e-10, fp32 math and fp32 state even
for bf16 parameters. The groups and their settings: ADAMW_GROUPS.

Schedules live here too: Schedule.apply sets, before each step, every group's lr (its initial_lr times
lr_multiplier) and the Muon groups' momentum (muon_momentum) and weight decay (weight_decay_at).
"""
import functools
import math
from collections import defaultdict
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard

from kernels.newton_schulz import orthogonalize
from train.errors import UserError

# Learning rates and betas at the reference size (and the defaults of train.pretrain's flags of the same names)
MATRIX_LR = 0.02
EMBEDDING_LR = 0.3
UNEMBEDDING_LR = 0.004
SCALAR_LR = 0.5
ADAM_BETAS = (0.8, 0.95)
ADAMW_EPS = 1e-10
MUON_BETA2 = 0.9
MUON_MOMENTUM = (0.85, 0.97, 0.90)  # at step 0, from step MUON_MOMENTUM_RAMP until the warmdown, at the last step
MUON_MOMENTUM_RAMP = 400
SMEAR_BACKOUT_LR = 0.2  # the smear and backout parameters: not rescaled by batch or width
MUON_NS_STEPS = 5
SHARD_MIN_NUMEL = 1024  # distributed AdamW: smaller tensors are all-reduced and updated whole
WARMUP_RATIO, WARMDOWN_RATIO, FINAL_LR_FRAC = 0.0, 0.5, 0.0  # the LR schedule's defaults (train.pretrain's flags)

# -----------------------------------------------------------------------------
# Schedules


def lr_multiplier(step: int, num_iterations: int, warmup_ratio: float, warmdown_ratio: float,
                  final_lr_frac: float) -> float:
    """Linear warmup to 1, flat, then linear warmdown to final_lr_frac at step num_iterations (and after it)."""
    step = min(step, num_iterations)
    warmup = round(warmup_ratio * num_iterations)
    start = warmdown_start(num_iterations, warmdown_ratio)
    if step < warmup:
        return (step + 1) / warmup
    if step <= start:
        return 1.0
    progress = (num_iterations - step) / (num_iterations - start)
    return progress + (1 - progress) * final_lr_frac


def warmdown_start(num_iterations: int, warmdown_ratio: float) -> int:
    """The last step at full LR: the warmdown takes the last round(warmdown_ratio * num_iterations) steps."""
    return num_iterations - round(warmdown_ratio * num_iterations)


def muon_momentum(step: int, num_iterations: int, warmdown_ratio: float) -> float:
    """0.85 -> 0.97 linearly over the first 400 steps (whatever the LR does then), then 0.97 until the LR warmdown
    starts, then linearly from 0.97 to 0.90 at the last step: nanochat's get_muon_momentum."""
    start, peak, end = MUON_MOMENTUM
    step = min(step, num_iterations)
    if step < MUON_MOMENTUM_RAMP:
        return start + (peak - start) * step / MUON_MOMENTUM_RAMP
    start_wd = warmdown_start(num_iterations, warmdown_ratio)
    if step >= start_wd and start_wd < num_iterations:
        return peak + (end - peak) * (step - start_wd) / (num_iterations - start_wd)
    return peak


def weight_decay_at(step: int, num_iterations: int, weight_decay: float) -> float:
    """Cosine from weight_decay at step 0 to 0 at step num_iterations."""
    if num_iterations <= 0:
        return weight_decay
    progress = min(max(step / num_iterations, 0.0), 1.0)
    return weight_decay * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class Schedule:
    """The schedules of a run of num_iterations steps: what every step, in training and in bench.mfu, applies."""
    num_iterations: int
    warmup_ratio: float = WARMUP_RATIO
    warmdown_ratio: float = WARMDOWN_RATIO
    final_lr_frac: float = FINAL_LR_FRAC

    def apply(self, optimizer: "MuonAdamW", step: int) -> float:
        """Set every group's lr for step (its initial_lr x the LR multiplier) and the Muon groups' momentum and
        weight decay; returns the LR multiplier."""
        N = self.num_iterations
        lrm = lr_multiplier(step, N, self.warmup_ratio, self.warmdown_ratio, self.final_lr_frac)
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * lrm
            if group["kind"] == "muon":
                group["momentum"] = muon_momentum(step, N, self.warmdown_ratio)
                group["weight_decay"] = weight_decay_at(step, N, group["initial_weight_decay"])
        return lrm

# -----------------------------------------------------------------------------
# The update math. Works with Python floats (eager) or 0-D CPU tensors (compiled: a new lr value
# is then a new input, not a recompilation).


def adamw_update_(p: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor,
                  step, lr, beta1, beta2, eps, weight_decay) -> None:
    """One AdamW step on p in place, in the dtype of the state (fp32 for bf16/fp32 params)."""
    p32 = p.to(exp_avg.dtype)  # no copy when p is already fp32
    g32 = grad.to(exp_avg.dtype)
    p32.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(g32, 1 - beta1)
    exp_avg_sq.lerp_(g32.square(), 1 - beta2)
    bias1 = 1 - beta1 ** step
    bias2 = 1 - beta2 ** step
    denom = (exp_avg_sq / bias2).sqrt() + eps
    p32.sub_(exp_avg / denom * (lr / bias1))
    p.copy_(p32)


def nesterov_(grads: Tensor, momentum_buffer: Tensor, momentum) -> Tensor:
    """buf <- m buf + (1 - m) g; returns (1 - m) g + m buf, written into grads (our own stack)."""
    momentum_buffer.lerp_(grads, 1 - momentum)
    return grads.lerp_(momentum_buffer, momentum)


def muon_eq(X: Tensor) -> Tensor:
    """MuonEq: every row of each matrix of the (k, rows, cols) stack rescaled to the matrix's mean row norm,
    row *= (||X||_F / sqrt(rows)) / max(||row||, 1e-6)."""
    row_norms = X.norm(dim=-1, keepdim=True)
    mean_norm = X.norm(dim=(-2, -1), keepdim=True) / math.sqrt(X.size(-2))
    return X * (mean_norm / row_norms.clamp_min(1e-6))


def muon_plus(X: Tensor) -> Tensor:
    """Muon+: each matrix of the stack rescaled to Frobenius norm sqrt(min(rows, cols))."""
    target = math.sqrt(min(X.size(-2), X.size(-1)))
    return X * (target / X.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-12))


def normuon_cautious_update_(update: Tensor, params: Tensor, second_moment: Tensor,
                             lr, weight_decay, beta2, red_dim: int) -> None:
    """NorMuon: scale each row (tall) / column (wide) of the orthogonalized update by the rsqrt of its
    running mean square, keeping the update's Frobenius norm; then cautious weight decay: decay only
    where update and weight have the same sign. Updates params (a stack) in place."""
    n = update.size(red_dim)
    mean_sq = update.square().mean(dim=red_dim, keepdim=True)
    norm = (mean_sq.sum(dim=(-2, -1), keepdim=True) * n).sqrt()
    second_moment.lerp_(mean_sq, 1 - beta2)
    scale = second_moment.clamp_min(1e-10).rsqrt()
    new_norm = (mean_sq * n * scale.square()).sum(dim=(-2, -1), keepdim=True).sqrt()
    update = update * (scale * (norm / new_norm.clamp_min(1e-10)))
    mask = (update * params) >= 0
    params.sub_(lr * update + (lr * weight_decay) * params * mask)


@functools.cache
def _compiled(fn):
    """fn compiled once per process (a recompilation per tensor shape), as nanochat does."""
    return torch.compile(fn, dynamic=False, fullgraph=True)


def _orthogonalize(x: Tensor, steps: int) -> Tensor:
    """Polar Express on a (K, m, n) stack: bf16 on CUDA (fast, stable), the stack's dtype elsewhere."""
    y = orthogonalize(x.bfloat16() if x.is_cuda else x, steps=steps)
    return y.to(x.dtype)

# -----------------------------------------------------------------------------
# Single device


def new_adamw_state(p: Tensor) -> dict:
    """AdamW's state at its first step for p (a whole param, a rank's rows, or a DTensor: the moments are alike)."""
    state_dtype = torch.promote_types(p.dtype, torch.float32)
    return {"step": 0, "exp_avg": torch.zeros_like(p, dtype=state_dtype),
            "exp_avg_sq": torch.zeros_like(p, dtype=state_dtype)}


def new_muon_state(p: Tensor, slots: int) -> dict:
    """A Muon group's stacked state at its first step, for `slots` matrices of p's shape (the last two dims)."""
    rows, cols = p.shape[-2:]
    kw = {"dtype": p.dtype, "device": p.device}
    # factored second moment: one value per row (tall) or per column (wide)
    return {"momentum_buffer": torch.zeros(slots, rows, cols, **kw),
            "second_moment": torch.zeros((slots, rows, 1) if rows >= cols else (slots, 1, cols), **kw)}


class MuonAdamW(torch.optim.Optimizer):
    """Muon + AdamW on one device. Param groups are dicts with kind 'adamw' (lr, betas, eps,
    weight_decay) or 'muon' (lr, momentum, ns_steps, beta2, weight_decay; all params one shape).
    Muon state (stacked momentum and factored second moment) lives in the state of the group's
    first parameter."""

    rank, world_size = 0, 1

    def __init__(self, param_groups: list[dict], compile: bool | None = None):
        super().__init__(param_groups, defaults={})
        for group in self.param_groups:
            if group["kind"] == "muon":
                shapes = {tuple(p.shape) for p in group["params"]}
                if len(shapes) != 1 or len(next(iter(shapes))) != 2:
                    raise ValueError(f"a Muon group needs 2-D params of one shape, got {sorted(shapes)}")
            elif group["kind"] != "adamw":
                raise ValueError(f"unknown optimizer kind {group['kind']!r}")
        self.compile = compile  # None: compile the update math for CUDA tensors
        # 0-D CPU tensors for the compiled path (refilled every call)
        self._scalars = {k: torch.tensor(0.0) for k in
                         ("step", "lr", "beta1", "beta2", "eps", "wd", "momentum")}

    # --- what this rank keeps (the distributed versions keep a share)

    def muon_share(self, k: int) -> tuple[int, slice]:
        """(the slots of a Muon group's stacked state, the matrices of the group this rank updates and keeps)."""
        return _muon_share(k, self.rank, self.world_size)

    def moment_like(self, p: Tensor) -> Tensor:
        """What p's AdamW moments are shaped as on this rank."""
        return p

    def global_moment(self, p: Tensor, moment: Tensor) -> Tensor:
        """This rank's AdamW moment of p as a tensor of p's global shape (a DTensor where the rank keeps rows)."""
        return moment

    # --- helpers shared with DistMuonAdamW

    def _use_compiled(self, t: Tensor) -> bool:
        return t.is_cuda if self.compile is None else self.compile

    def _fn(self, fn, t: Tensor):
        """fn, compiled when the tensors it will see call for it."""
        return _compiled(fn) if self._use_compiled(t) else fn

    def _values(self, t: Tensor, **values) -> dict:
        """The scalars as floats (eager) or as refilled 0-D CPU tensors (compiled)."""
        if not self._use_compiled(t):
            return values
        return {k: self._scalars[k].fill_(v) for k, v in values.items()}

    def _adamw_param(self, group: dict, p: Tensor, grad: Tensor, state: dict) -> None:
        """AdamW on p (a whole param or this rank's shard), state initialised lazily."""
        if not state:
            state.update(new_adamw_state(p))
        state["step"] += 1
        beta1, beta2 = group["betas"]
        s = self._values(p, step=float(state["step"]), lr=group["lr"], beta1=beta1, beta2=beta2,
                         eps=group["eps"], wd=group["weight_decay"])
        self._fn(adamw_update_, p)(p, grad, state["exp_avg"], state["exp_avg_sq"], s["step"], s["lr"],
                                   s["beta1"], s["beta2"], s["eps"], s["wd"])

    def _muon_stack(self, group: dict, grads: Tensor, params: Tensor, state: dict, slots: int) -> None:
        """Muon on a (k, rows, cols) stack of grads and params; params updated in place. state holds
        the stacked buffers, made for `slots` matrices (k here; a whole chunk in DistMuonAdamW, of
        which this rank may own fewer)."""
        k, rows, cols = params.shape
        tall = rows >= cols
        if "momentum_buffer" not in state:
            state.update(new_muon_state(params, slots))
        lr = group["lr"] * max(1.0, rows / cols) ** 0.5
        s = self._values(params, momentum=group["momentum"], lr=lr, wd=group["weight_decay"],
                         beta2=group["beta2"])
        g = self._fn(nesterov_, params)(grads, state["momentum_buffer"][:k], s["momentum"])
        g = _orthogonalize(self._fn(muon_eq, params)(g), group["ns_steps"])
        self._fn(normuon_cautious_update_, params)(self._fn(muon_plus, params)(g), params,
                                                   state["second_moment"][:k], s["lr"], s["wd"], s["beta2"],
                                                   -1 if tall else -2)

    # --- the step

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            if group["kind"] == "adamw":
                for p in group["params"]:
                    if p.grad is not None:
                        self._adamw_update(group, p)
            elif any(p.grad is not None for p in group["params"]):
                self._muon_update(group)

    def _adamw_update(self, group: dict, p: Tensor) -> None:
        self._adamw_param(group, p, p.grad, self.state[p])

    def _muon_update(self, group: dict) -> None:
        params = group["params"]
        grads = torch.stack([torch.zeros_like(p) if p.grad is None else p.grad for p in params])
        stacked = torch.stack(params)
        self._muon_stack(group, grads, stacked, self.state[params[0]], len(params))
        torch._foreach_copy_(params, list(stacked.unbind(0)))

    # --- checkpoints

    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["world_size"] = self.world_size  # the state is sharded by rank: another world size reshards it
        return sd

    def check_layout(self, state_dict: dict) -> None:
        """A saved state (state_dict() or full_state()) is of this optimizer's groups, in its order and sizes."""
        layout = [(g.get("name"), len(g["params"])) for g in self.param_groups]
        saved_layout = [(g.get("name"), len(g["params"])) for g in state_dict["param_groups"]]
        if layout != saved_layout:
            raise UserError(f"the optimizer checkpoint does not match this model's parameter groups: "
                            f"{saved_layout} vs {layout}")

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore the state state_dict() saved exactly (dtypes kept: fp32 moments stay fp32, unlike torch's
        default load, which casts them to the param dtype). The groups keep the hyperparameters they were built
        with, this run's flags: a resumed run with other learning rates, betas or weight decay uses its own.
        The state must be of this world size: one rank's shard of another is resharded with shard_state()."""
        saved_world = state_dict.get("world_size", 1)
        if saved_world != self.world_size:
            raise ValueError(f"a state_dict of {saved_world} rank(s) loaded on {self.world_size}: reshard it "
                             "(full_state, then shard_state)")
        self.check_layout(state_dict)
        saved_groups = state_dict["param_groups"]
        index_to_param = {}
        for group, saved in zip(self.param_groups, saved_groups):
            index_to_param.update(zip(saved["params"], group["params"]))
        self.state = defaultdict(dict)
        for index, saved_state in state_dict["state"].items():
            p = index_to_param[index]
            self.state[p] = {k: v.to(p.device) if torch.is_tensor(v) else v for k, v in saved_state.items()}

# -----------------------------------------------------------------------------
# Distributed (ZeRO-2 style)


def _adamw_rows(p: Tensor, rank: int, world: int) -> slice | None:
    """The rows of p whose AdamW state rank keeps among world ranks; None: every rank keeps all of p. Tensors of
    >= SHARD_MIN_NUMEL elements whose dim 0 splits evenly are sharded along it, rank r keeping piece r."""
    if p.numel() < SHARD_MIN_NUMEL or p.shape[0] % world:
        return None
    n = p.shape[0] // world
    return slice(rank * n, (rank + 1) * n)


def _muon_share(k: int, rank: int, world: int) -> tuple[int, slice]:
    """(chunk, the matrices rank owns) of a Muon stack of k among world ranks: the stack is zero-padded to
    chunk x world with chunk = ceil(k / world), and rank r owns [r chunk, (r+1) chunk) (at the end fewer, or none)."""
    chunk = -(-k // world)
    return chunk, slice(rank * chunk, (rank + 1) * chunk)


def _rank_and_world(who: str) -> tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"{who} needs torch.distributed to be initialised")
    return dist.get_rank(), dist.get_world_size()


class _Pending:
    """An async collective and what finishes it: gloo has no AVG, so it sums and we divide here."""

    def __init__(self, work, divide: Tensor | None = None, by: int = 1):
        self.work, self.divide, self.by = work, divide, by

    def wait(self) -> None:
        self.work.wait()
        if self.divide is not None:
            self.divide.div_(self.by)


# reduce_scatter_tensor / all_gather_into_tensor are renamed *_single in newer torch
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class DistMuonAdamW(MuonAdamW):
    """MuonAdamW over torch.distributed ranks (no DDP: this optimizer averages the gradients).

    Three phases so that communication overlaps compute:
      1. launch every gradient reduction (async);
      2. per group in order: wait for its reduction, update this rank's share, launch its all-gather;
      3. wait for the gathers, copy the gathered Muon stacks back into the params.
    Muon: a shape's K matrices are stacked and zero-padded to chunk x world (chunk = ceil(K / world));
      the reduce-scatter hands rank r matrices [r chunk, (r+1) chunk), the only ones it orthogonalizes
      and keeps momentum for.
    AdamW: tensors with >= SHARD_MIN_NUMEL elements and dim 0 divisible by world are reduce-scattered
      along dim 0 (state for the shard only) and all-gathered; smaller ones are all-reduced and
      updated whole on every rank.
    A parameter without a gradient counts as a zero gradient (every rank must join every collective).
    Works with NCCL (CUDA) and gloo (CPU).
    """

    def __init__(self, param_groups: list[dict], compile: bool | None = None):
        super().__init__(param_groups, compile=compile)
        self.rank, self.world_size = _rank_and_world(type(self).__name__)
        self._avg = dist.get_backend() == "nccl"  # NCCL averages natively; gloo sums, we divide
        # gloo's worker thread drops its reference to a finished collective a moment after wait()
        # returns; if that is the last one, it needs the GIL to free the tensors, and a process that
        # exits right then aborts ("terminate called without an active exception"). So with gloo
        # (CPU runs, memory is no concern) we hold the last step's collectives until the next step.
        self._hold: list = []
        # for the checkpoints' DTensors of AdamW rows; made here, with every rank, as it may be a collective
        self._mesh = init_device_mesh(self.param_groups[0]["params"][0].device.type, (self.world_size,))

    def _rows(self, p: Tensor) -> slice | None:
        return _adamw_rows(p, self.rank, self.world_size)

    def moment_like(self, p: Tensor) -> Tensor:
        rows = self._rows(p)
        return p if rows is None else p[rows]

    def global_moment(self, p: Tensor, moment: Tensor) -> Tensor:
        if self._rows(p) is None:
            return moment
        return DTensor.from_local(moment, self._mesh, [Shard(0)], shape=p.shape, stride=p.stride(), run_check=False)

    def _launched(self, work):
        if not self._avg:
            self._hold.append(work)
        return work

    def _reduce_scatter_avg(self, out: Tensor, inp: Tensor) -> _Pending:
        op = dist.ReduceOp.AVG if self._avg else dist.ReduceOp.SUM
        work = self._launched(_reduce_scatter(out, inp, op=op, async_op=True))
        return _Pending(work, None if self._avg else out, self.world_size)

    def _all_reduce_avg(self, t: Tensor) -> _Pending:
        op = dist.ReduceOp.AVG if self._avg else dist.ReduceOp.SUM
        work = self._launched(dist.all_reduce(t, op=op, async_op=True))
        return _Pending(work, None if self._avg else t, self.world_size)

    def _all_gather(self, out: Tensor, inp: Tensor):
        return self._launched(_all_gather(out, inp, async_op=True))

    # phase 1

    def _launch_adamw(self, group: dict) -> list:
        launched = []
        for p in group["params"]:
            grad = torch.zeros_like(p) if p.grad is None else p.grad
            rows = self._rows(p)
            if rows is not None:
                shard = torch.empty_like(grad[rows])
                launched.append((self._reduce_scatter_avg(shard, grad.contiguous()), shard))
            else:  # averaged in place
                launched.append((self._all_reduce_avg(grad), grad))
        return launched

    def _launch_muon(self, group: dict) -> tuple:
        params = group["params"]
        chunk, _ = _muon_share(len(params), self.rank, self.world_size)
        p = params[0]
        padded = torch.zeros(chunk * self.world_size, *p.shape, dtype=p.dtype, device=p.device)
        for i, q in enumerate(params):
            if q.grad is not None:
                padded[i].copy_(q.grad)
        grad_chunk = torch.empty(chunk, *p.shape, dtype=p.dtype, device=p.device)
        return self._reduce_scatter_avg(grad_chunk, padded), grad_chunk, padded

    # phase 2

    def _update_adamw(self, group: dict, launched: list, gathers: list) -> None:
        for p, (pending, grad) in zip(group["params"], launched):
            pending.wait()
            rows = self._rows(p)
            if rows is None:
                self._adamw_param(group, p, grad, self.state[p])
                continue
            shard = p[rows]
            self._adamw_param(group, shard, grad, self.state[p])
            # NCCL gathers in place when the input is the output's own slice; gloo gets a copy
            src = shard if self._avg else shard.clone()
            gathers.append((self._all_gather(p, src), None, None))

    def _update_muon(self, group: dict, launched: tuple, gathers: list) -> None:
        pending, grad_chunk, padded = launched
        pending.wait()
        params = group["params"]
        chunk, share = _muon_share(len(params), self.rank, self.world_size)
        owned = params[share]
        updated = torch.zeros_like(grad_chunk)
        if owned:
            stacked = torch.stack(owned)
            self._muon_stack(group, grad_chunk[:len(owned)], stacked, self.state[params[0]], chunk)
            updated[:len(owned)].copy_(stacked)
        # the padded gradient buffer is free again: gather the weights into it
        gathers.append((self._all_gather(padded, updated), padded, params))

    @torch.no_grad()
    def step(self) -> None:
        self._hold = []  # the previous step's collectives are long finished
        launched = [self._launch_adamw(g) if g["kind"] == "adamw" else self._launch_muon(g)
                    for g in self.param_groups]
        gathers = []
        for group, item in zip(self.param_groups, launched):
            if group["kind"] == "adamw":
                self._update_adamw(group, item, gathers)
            else:
                self._update_muon(group, item, gathers)
        for work, stacked, params in gathers:
            work.wait()
            if params is not None:
                torch._foreach_copy_(params, list(stacked[:len(params)].unbind(0)))

# -----------------------------------------------------------------------------
# FSDP2: the parameters are DTensors sharded on dim 0 (train.fsdp)


def _fsdp_rows(n: int, world: int) -> list[int]:
    """How many rows of a dim 0 of n each rank holds under FSDP2's Shard(0): torch.chunk's pieces (ceil(n / world)
    rows each, the last ones fewer or none)."""
    sizes = [len(c) for c in torch.arange(n).chunk(world)]
    return sizes + [0] * (world - len(sizes))


def _local(t):
    """This rank's piece of a DTensor (a view: writing it writes the DTensor); any other tensor as it is."""
    return t.to_local() if isinstance(t, DTensor) else t


class FSDPMuonAdamW(MuonAdamW):
    """MuonAdamW over FSDP2's sharded parameters (DTensors, Shard(0)); the gradients arrive averaged (FSDP2
    reduce-scatters them), so nothing is reduced here.

    AdamW is elementwise: each rank updates its own rows, with moments sharded as the parameter (DTensors).
    Muon orthogonalizes whole matrices, each once (HSDP: once per copy of the model): matrix i of a group belongs to
    the rank _muon_share gives it (the owners of DistMuonAdamW, so that the stacked state and the checkpoints are the
    same). Per group, one
    all_to_all brings the owner every rank's rows of its matrices' gradients and weights (cautious weight decay
    reads the weights), the owner runs _muon_stack on them whole, and a second all_to_all sends every rank its rows
    of the updated weights.
    Checkpoints: named_state() (train.checkpoint, DCP); load_state_dict() takes format 2's DistMuonAdamW state.
    """

    def __init__(self, param_groups: list[dict], compile: bool | None = None):
        super().__init__(param_groups, compile=compile)
        if not all(isinstance(p, DTensor) for g in self.param_groups for p in g["params"]):
            raise ValueError("FSDPMuonAdamW takes the parameters of a model sharded by train.fsdp (DTensors)")
        # the ranks one copy of the model is sharded over (HSDP, a 2-D mesh: each replica's, which runs as one)
        mesh = self.param_groups[0]["params"][0].device_mesh
        self.group = mesh.get_group(mesh.ndim - 1)
        self.rank, self.world_size = mesh.get_local_rank(mesh.ndim - 1), mesh.size(mesh.ndim - 1)

    def _adamw_update(self, group: dict, p: DTensor) -> None:
        state = self.state[p]
        if not state:  # the moments sharded as p, so that they are saved (and resharded) as p is
            state.update(new_adamw_state(p))
        local = {k: _local(v) for k, v in state.items()}
        self._adamw_param(group, p.to_local(), p.grad.to_local(), local)
        state["step"] = local["step"]

    def _muon_update(self, group: dict) -> None:
        # step() calls it alike on every rank (FSDP2 gives each a gradient for every matrix): the all_to_alls meet
        params, W = group["params"], self.world_size
        rows, cols = params[0].shape
        n = _fsdp_rows(rows, W)  # rows per rank
        chunk, _ = _muon_share(len(params), 0, W)
        owned = [params[_muon_share(len(params), o, W)[1]] for o in range(W)]  # each owner's matrices
        mine = owned[self.rank]
        local = [(_local(p.grad) if p.grad is not None else torch.zeros_like(p.to_local()), p.to_local())
                 for p in params]
        # to owner o: my rows of its matrices' gradients, then of their weights
        send = torch.cat([torch.stack([g for g, _ in local[o * chunk:o * chunk + len(owned[o])]] +
                                      [w for _, w in local[o * chunk:o * chunk + len(owned[o])]]).flatten()
                          if owned[o] else local[0][1].new_empty(0) for o in range(W)])
        recv = send.new_empty(2 * len(mine) * rows * cols)
        dist.all_to_all_single(recv, send, [2 * len(mine) * n[s] * cols for s in range(W)],
                               [2 * len(owned[o]) * n[self.rank] * cols for o in range(W)], group=self.group)
        updated = recv.new_empty(len(mine), rows, cols)
        if mine:  # every source's (2, k, its rows, cols) piece, in rank order = row order
            pieces = recv.split([2 * len(mine) * n[s] * cols for s in range(W)])
            full = torch.cat([x.view(2, len(mine), n[s], cols) for s, x in enumerate(pieces)], dim=2)
            grads, updated = full[0], full[1].contiguous()
            self._muon_stack(group, grads, updated, self.state[params[0]], chunk)
        # back to rank d: its rows of the matrices I updated
        starts = [sum(n[:d]) for d in range(W)]
        back = torch.cat([updated[:, starts[d]:starts[d] + n[d]].flatten() for d in range(W)])
        out = back.new_empty(sum(len(owned[o]) for o in range(W)) * n[self.rank] * cols)
        dist.all_to_all_single(out, back, [len(owned[o]) * n[self.rank] * cols for o in range(W)],
                               [len(mine) * n[d] * cols for d in range(W)], group=self.group)
        torch._foreach_copy_([w for _, w in local], list(out.view(len(params), n[self.rank], cols).unbind(0)))

    def load_state_dict(self, state_dict: dict) -> None:
        """This rank's DistMuonAdamW state_dict() at this world size (format 2's checkpoints): the AdamW moments,
        whole or in _adamw_rows, become this rank's FSDP2 rows, as DTensors sharded as their parameter."""
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            if group["kind"] != "adamw":
                continue
            for p in group["params"]:
                state = self.state.get(p)
                if not state:
                    continue
                n = _fsdp_rows(p.shape[0], self.world_size)
                mine = slice(sum(n[:self.rank]), sum(n[:self.rank + 1]))
                whole = _adamw_rows(p, self.rank, self.world_size) is None  # else its rows are FSDP2's: even
                for k, v in state.items():
                    if torch.is_tensor(v):
                        v = v[mine] if whole else v
                        state[k] = DTensor.from_local(v.contiguous(), p.device_mesh, p.placements,
                                                      shape=p.shape, stride=p.stride())

# -----------------------------------------------------------------------------
# Checkpoints: the state keyed by parameter name, every tensor global (train.checkpoint saves it through DCP, which
# reshards it onto any world size and either mode)


def named_state(optimizer: MuonAdamW, names: dict) -> dict[str, Tensor]:
    """This rank's state as "<param name>.<key>": tensor, each aliasing the state (loading into it loads the state).
    Muon: each matrix's momentum buffer and second moment, on the rank that updates it only; AdamW: step (a 0-d
    tensor) and moments of the global shape (whole, the same on every rank that keeps them whole, or DTensors of a
    rank's rows). names: param -> name."""
    out = {}
    for group in optimizer.param_groups:
        params = group["params"]
        if group["kind"] == "muon":
            stacks = optimizer.state.get(params[0])
            if stacks:
                for j, p in enumerate(params[optimizer.muon_share(len(params))[1]]):
                    out.update({f"{names[p]}.{k}": v[j] for k, v in stacks.items()})
            continue
        for p in params:
            for k, v in optimizer.state.get(p, {}).items():
                out[f"{names[p]}.{k}"] = optimizer.global_moment(p, v) if torch.is_tensor(v) else torch.tensor(v)
    return out


def load_named_state(optimizer: MuonAdamW, names: dict, saved: set[str], load) -> None:
    """The state of a checkpoint, whatever world size and mode wrote it, into optimizer: this rank's share made as a
    first step makes it (for the parameters with state there; saved: named_state's keys that the checkpoint holds),
    then load(named_state(...)) fills it in place."""
    optimizer.state = defaultdict(dict)
    for group in optimizer.param_groups:
        params = group["params"]
        if group["kind"] == "muon":
            slots, share = optimizer.muon_share(len(params))
            if params[share] and f"{names[params[share][0]]}.momentum_buffer" in saved:
                optimizer.state[params[0]] = new_muon_state(params[0], slots)
            continue
        for p in params:
            if f"{names[p]}.step" in saved:
                optimizer.state[p] = new_adamw_state(optimizer.moment_like(p))
    wanted = named_state(optimizer, names)
    load(wanted)
    for p, state in optimizer.state.items():
        if "step" in state:  # an int in the state; a tensor in the checkpoint
            state["step"] = int(wanted[f"{names[p]}.step"])

# -----------------------------------------------------------------------------
# Format 2's checkpoints (before DCP): every rank's state_dict() put together (full_state) and one rank's share of
# another world size taken from it (shard_state)


def full_state(optimizer: MuonAdamW, names: dict, states: list[dict]) -> dict:
    """The state that len(states) ranks saved (states[r]: rank r's state_dict()) in a form of no world size:
    torch's state_dict layout with parameter names (names: param -> name) for indices and every tensor whole.
    Muon: per matrix its momentum buffer (rows, cols) and NorMuon second moment ((rows, 1) tall, (1, cols) wide),
    the stack's padding dropped; AdamW: step and moments, the shards' rows put together. optimizer: one over the
    same parameters, of any world size (its groups and shapes say how the states were sharded)."""
    world, full = len(states), {}
    for sd in states:
        optimizer.check_layout(sd)
    for group, saved in zip(optimizer.param_groups, states[0]["param_groups"]):
        params, index = group["params"], saved["params"]  # every rank numbers the params alike
        if group["kind"] == "muon":  # the stacks live in the state of the group's first parameter
            for rank, sd in enumerate(states):
                stacks = sd["state"].get(index[0])
                if not stacks:  # this rank owns no matrix of the group (or no step yet)
                    continue
                for j, p in enumerate(params[_muon_share(len(params), rank, world)[1]]):
                    full[names[p]] = {k: v[j].clone() for k, v in stacks.items()}  # a copy: not the padding too
            continue
        for p, i in zip(params, index):
            shards = [sd["state"][i] for sd in states if i in sd["state"]]
            if not shards:
                continue  # no step yet
            if _adamw_rows(p, 0, world) is None:  # whole on every rank
                full[names[p]] = shards[0]
            else:  # rank r's rows are piece r
                full[names[p]] = {k: torch.cat([s[k] for s in shards]) if torch.is_tensor(v) else v
                                  for k, v in shards[0].items()}
    groups = [saved | {"params": [names[p] for p in group["params"]]}
              for group, saved in zip(optimizer.param_groups, states[0]["param_groups"])]
    return {"state": full, "param_groups": groups}


def shard_state(optimizer: MuonAdamW, names: dict, full: dict, rank: int, world: int) -> dict:
    """Rank's state_dict() among world ranks, from full_state(): what that rank holds after the same steps."""
    optimizer.check_layout(full)
    state, groups, start = {}, [], 0
    for group, saved in zip(optimizer.param_groups, full["param_groups"]):
        params = group["params"]
        index = list(range(start, start + len(params)))  # torch numbers the params in group order
        start += len(params)
        groups.append(saved | {"params": index})
        if group["kind"] == "muon":
            chunk, share = _muon_share(len(params), rank, world)
            owned = [full["state"].get(names[p]) for p in params[share]]
            if owned and owned[0]:  # stacked in chunk slots, those past the group's last matrix zero
                zero = {k: torch.zeros_like(v) for k, v in owned[0].items()}
                state[index[0]] = {k: torch.stack([m[k] for m in owned + [zero] * (chunk - len(owned))])
                                   for k in zero}
            continue
        for p, i in zip(params, index):
            if names[p] in full["state"]:
                rows = _adamw_rows(p, rank, world) or slice(None)  # None: the whole tensor
                state[i] = {k: v[rows].clone() if torch.is_tensor(v) else v
                            for k, v in full["state"][names[p]].items()}
    return {"state": state, "param_groups": groups, "world_size": world}

# -----------------------------------------------------------------------------


class AdamWGroup(NamedTuple):
    """One AdamW group of the model's parameters and how its settings follow from the flags."""
    name: str
    lr_flag: str | None  # the flag its LR comes from (None: SMEAR_BACKOUT_LR, not rescaled)
    lr_factor: float = 1.0
    by_width: bool = False  # also scaled by adam_width_scale
    betas: tuple = (None, None)  # None: --adam-beta1 / --adam-beta2
    weight_decay: float = 0.0  # decoupled


# as nanochat's setup_optimizer: beta2 0.96 for lm_head, 0.995 for the embeddings (their rows are seen rarely)
ADAMW_GROUPS = (
    AdamWGroup("lm_head", "unembedding_lr", by_width=True, betas=(None, 0.96), weight_decay=0.01),
    AdamWGroup("wte", "embedding_lr", by_width=True, betas=(None, 0.995), weight_decay=0.001),
    AdamWGroup("value_embeds", "embedding_lr", lr_factor=0.5, by_width=True, betas=(None, 0.995), weight_decay=0.01),
    AdamWGroup("resid_lambdas", "scalar_lr", lr_factor=0.01, weight_decay=0.05),
    AdamWGroup("x0_lambdas", "scalar_lr", betas=(0.96, None)),
    AdamWGroup("smear_backout", None, betas=(0.8, 0.95)),
)


def adamw_settings(lrs: dict, adam_betas: tuple[float, float], lr_scale: float, adam_width_scale: float) -> list:
    """(name, lr, betas, weight decay) of every AdamW group. lrs: the flags' {embedding_lr, ...};
    lr_scale (sqrt(B / B_ref), the batch-size law) scales every LR but smear/backout's, adam_width_scale
    ((model_dim / 768)^-0.5, muP-style) those of lm_head, wte and value_embeds too, as nanochat does."""
    out = []
    for g in ADAMW_GROUPS:
        if g.lr_flag is None:
            lr = SMEAR_BACKOUT_LR
        else:
            lr = lrs[g.lr_flag] * g.lr_factor * lr_scale * (adam_width_scale if g.by_width else 1.0)
        betas = tuple(default if b is None else b for b, default in zip(g.betas, adam_betas))
        out.append((g.name, lr, betas, g.weight_decay))
    return out


def make_optimizer(groups: dict[str, list[torch.nn.Parameter]], *, matrix_lr: float = MATRIX_LR,
                   embedding_lr: float = EMBEDDING_LR, unembedding_lr: float = UNEMBEDDING_LR,
                   scalar_lr: float = SCALAR_LR, adam_betas: tuple[float, float] = ADAM_BETAS,
                   weight_decay: float = 0.0, lr_scale: float = 1.0, adam_width_scale: float = 1.0,
                   distributed: bool = False, fsdp: bool = False, compile: bool | None = None) -> MuonAdamW:
    """The optimizer for the model's param_groups() dict.

    AdamW groups: adamw_settings(). Muon: matrix_lr x lr_scale; weight_decay is its decay at step 0
    (weight_decay_at() anneals it). compile: None compiles the update math for CUDA tensors only.
    distributed: DistMuonAdamW (replicated parameters); fsdp: FSDPMuonAdamW (parameters sharded by train.fsdp).
    Each group carries "initial_lr" (and Muon groups "initial_weight_decay") for Schedule.apply.
    """
    expected = {"matrices"} | {g.name for g in ADAMW_GROUPS}
    if set(groups) != expected:
        raise ValueError(f"param groups must be exactly {sorted(expected)}, got {sorted(groups)}")
    lrs = dict(embedding_lr=embedding_lr, unembedding_lr=unembedding_lr, scalar_lr=scalar_lr)
    param_groups = []
    for name, lr, betas, wd in adamw_settings(lrs, adam_betas, lr_scale, adam_width_scale):
        if groups[name]:
            param_groups.append(dict(kind="adamw", name=name, params=list(groups[name]), lr=lr, initial_lr=lr,
                                     betas=betas, eps=ADAMW_EPS, weight_decay=wd))
    matrices = list(groups["matrices"])
    for p in matrices:
        if p.ndim != 2:
            raise ValueError(f"Muon takes 2-D matrices, got a parameter of shape {tuple(p.shape)}")
    lr = matrix_lr * lr_scale
    for shape in sorted({tuple(p.shape) for p in matrices}):
        params = [p for p in matrices if tuple(p.shape) == shape]
        param_groups.append(dict(kind="muon", name=f"matrices {shape[0]}x{shape[1]}", params=params,
                                 lr=lr, initial_lr=lr, momentum=MUON_MOMENTUM[0], ns_steps=MUON_NS_STEPS,
                                 beta2=MUON_BETA2, weight_decay=weight_decay, initial_weight_decay=weight_decay))
    seen = [id(p) for g in param_groups for p in g["params"]]
    if len(seen) != len(set(seen)):
        raise ValueError("a parameter appears in more than one group")
    cls = FSDPMuonAdamW if fsdp else DistMuonAdamW if distributed else MuonAdamW
    return cls(param_groups, compile=compile)
