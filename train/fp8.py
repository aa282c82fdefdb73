"""FP8 training of the large Linear layers through torchao's float8 (`--fp8`, H100 and newer).

- convert_to_fp8 swaps the qualifying nn.Linear modules for torchao's Float8Linear, before torch.compile.
  Float8Linear subclasses nn.Linear and keeps the very same weight Parameter (the high-precision master
  weight); only its matmuls run in FP8, with dynamic scales (tensorwise or rowwise recipe). So the
  optimizer, the parameter groups and the FLOP count (GPT.estimate_flops counts weights) stay those of
  the bf16 model, and MFU is measured against the bf16 peak, as for a bf16 run.
- fp8_disabled(model) runs nn.Linear's forward in every Float8Linear (the same modules and Parameters: FSDP2 holds on
  to them) while validation, CORE and sampling run (bf16 under autocast, the bf16 model's matmuls), then FP8 again.
- plain_state_dict(model) is the bf16 model's state dict (same keys, plain tensors): an FP8 run resumes
  with or without --fp8 and loads in a bf16-only evaluation.

torchao is an optional extra (`pip install -e .[fp8]`), imported only from the functions here.
"""
import dataclasses
import functools
from contextlib import contextmanager

import torch
import torch.nn as nn

from train.errors import UserError, first_line

RECIPES = ("tensorwise", "rowwise")
MIN_CAPABILITY = (8, 9)  # FP8 tensor cores: Ada (8.9), Hopper (9.0) and newer
MIN_DIM = 128  # below this the casts cost more than the FP8 matmul saves
INSTALL_HINT = "pip install -e .[fp8]"


def check_fp8_available(device: torch.device, emulate: bool = False) -> None:
    """Raise a one-line UserError unless FP8 training can run on device (emulate: torchao's emulated
    FP8 matmuls, which run anywhere, for tests)."""
    device = torch.device(device)
    if not emulate:
        if device.type != "cuda":
            raise UserError(f"--fp8 needs an NVIDIA GPU with FP8 support (compute capability 8.9+, e.g. H100); "
                            f"this run is on {device.type}")
        cap = tuple(torch.cuda.get_device_capability(device))
        if cap < MIN_CAPABILITY:
            raise UserError(f"--fp8 needs a GPU with FP8 support (compute capability 8.9+, e.g. H100); "
                            f"{torch.cuda.get_device_name(device)} is {cap[0]}.{cap[1]}")
    try:
        import torchao.float8  # noqa: F401
    except Exception as e:  # missing, or built for another torch: either way the user must (re)install it
        raise UserError(f"--fp8 needs torchao, which did not import ({first_line(e)}): {INSTALL_HINT}") from None


def fp8_filter(module: nn.Module, fqn: str, *, fused_ce: bool) -> bool:
    """Which Linear layers train in FP8: both dims multiples of 16 (FP8 matmul requirement) and
    min(in, out) >= 128, so the small value-embedding gates stay out. lm_head only without the fused
    cross-entropy: an FP8 lm_head would bring the full (B*T, vocab) logits back into memory."""
    if type(module) is not nn.Linear:  # plain Linear only: an already converted Float8Linear is left alone
        return False
    if fused_ce and fqn.split(".")[-1] == "lm_head":
        return False
    n_in, n_out = module.in_features, module.out_features
    return n_in % 16 == 0 and n_out % 16 == 0 and min(n_in, n_out) >= MIN_DIM


def convert_to_fp8(model: nn.Module, recipe: str = "tensorwise", *, fused_ce: bool = True,
                   emulate: bool = False) -> list[str]:
    """Swap the qualifying Linear layers of model for torchao Float8Linear, in place (call before
    torch.compile and before the optimizer sees the model, though the Parameters are the same objects).
    Returns the names of the converted modules."""
    if recipe not in RECIPES:
        raise UserError(f"--fp8-recipe must be one of {', '.join(RECIPES)}, got {recipe!r}")
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    config = Float8LinearConfig.from_recipe_name(recipe)
    if emulate:  # the config is a frozen dataclass: emulated FP8 matmuls (any device, for tests)
        config = dataclasses.replace(config, emulate=True)
    converted: list[str] = []

    def module_filter_fn(module: nn.Module, fqn: str) -> bool:
        keep = fp8_filter(module, fqn, fused_ce=fused_ce)
        if keep:
            converted.append(fqn)
        return keep

    convert_to_float8_training(model, config=config, module_filter_fn=module_filter_fn)
    return converted


def _float8_linear_type():
    """torchao's Float8Linear class, or None without torchao (then no model can hold one)."""
    try:
        from torchao.float8.float8_linear import Float8Linear
    except Exception:
        return None
    return Float8Linear


@contextmanager
def fp8_disabled(model: nn.Module):
    """Within the block, every Float8Linear of model runs nn.Linear's forward on its own weight and bias, so forward
    (and backward) run the bf16 model exactly; FP8 comes back on exit. The modules stay in place (an instance
    attribute shadows the forward): FSDP2 puts the gathered weights on the very modules it sharded."""
    float8_linear = _float8_linear_type()
    patched = [m for m in model.modules() if float8_linear is not None and isinstance(m, float8_linear)]
    try:
        for module in patched:
            module.forward = functools.partial(nn.Linear.forward, module)
        yield model
    finally:
        for module in patched:
            module.__dict__.pop("forward", None)


def plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of the bf16 model (same keys, plain tensors) from an FP8-converted one: loads into
    an unconverted GPT with strict=True and through torch.load(weights_only=True)."""
    model = getattr(model, "_orig_mod", model)  # a torch.compile wrapper: its keys carry a prefix
    with fp8_disabled(model):
        state = model.state_dict()
    out = {}
    for key, value in state.items():
        value = getattr(value, "_tensor", value)  # torchao's float8 all-gather weight wrapper keeps it inside
        if type(value) is not torch.Tensor:
            raise TypeError(f"plain_state_dict: {key} is a {type(value).__name__}, not a plain tensor")
        out[key] = value
    return out
