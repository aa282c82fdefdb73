"""FP8 training through torchao (train/fp8.py): which layers convert, the FLOP count, bf16 evaluation on
the same weights, plain checkpoints both ways, the availability check, and a few emulated training steps."""
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from model.config import config_from_depth
from model.gpt import GPT
from train import fp8
from train.errors import UserError, run_cli

try:
    from torchao.float8.float8_linear import Float8Linear
    TORCHAO_ERROR = None
except Exception as e:  # noqa: BLE001 - any import failure means: no FP8 here
    Float8Linear, TORCHAO_ERROR = None, f"{type(e).__name__}: {e}"

needs_torchao = pytest.mark.skipif(Float8Linear is None,
                                   reason=f"torchao not importable ({TORCHAO_ERROR}); pip install -e .[fp8]")

BLOCK_LINEARS = ("attn.c_q", "attn.c_k", "attn.c_v", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def meta_gpt(depth: int) -> GPT:
    with torch.device("meta"):
        return GPT(config_from_depth(depth))


def tiny_config():
    """2 layers, 128 wide (so every block Linear and lm_head qualify), 2 heads, T = 32, vocab 256."""
    return config_from_depth(2, aspect_ratio=64, head_dim=64, max_seq_len=32, vocab_size=256)


def tiny_gpt(seed: int = 0) -> GPT:
    with torch.device("meta"):
        model = GPT(tiny_config())
    model.to_empty(device="cpu")
    torch.manual_seed(seed)
    model.init_weights()
    return model


def tiny_batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 256, (4, 33), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def fp8_modules(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, Float8Linear)]


# ---- which layers convert ----------------------------------------------------------------------

@pytest.mark.parametrize("shape, fqn, fused_ce, expected", [
    ((1280, 1280), "transformer.h.0.attn.c_q", True, True),
    ((1280, 5120), "transformer.h.0.mlp.c_fc", True, True),
    ((128, 144), "x", True, True),                 # smallest dim exactly 128, both multiples of 16
    ((12, 10), "transformer.h.1.attn.ve_gate", True, False),
    ((112, 256), "x", True, False),                # multiples of 16 but min < 128
    ((136, 256), "x", True, False),                # 136 is not a multiple of 16
    ((256, 200), "x", True, False),                # 200 is not a multiple of 16
    ((1280, 32768), "lm_head", True, False),       # the fused cross-entropy reads lm_head itself
    ((1280, 32768), "lm_head", False, True),
])
def test_fp8_filter(shape, fqn, fused_ce, expected):
    with torch.device("meta"):
        lin = nn.Linear(*shape, bias=False)
    assert fp8.fp8_filter(lin, fqn, fused_ce=fused_ce) is expected


def test_fp8_filter_ignores_other_modules():
    with torch.device("meta"):
        assert not fp8.fp8_filter(nn.Embedding(1024, 256), "transformer.wte", fused_ce=False)
        assert not fp8.fp8_filter(nn.Conv1d(256, 256, 1), "conv", fused_ce=False)


@needs_torchao
@pytest.mark.parametrize("depth", [4, 20])
@pytest.mark.parametrize("fused_ce", [True, False])
def test_converted_layers(depth, fused_ce):
    model = meta_gpt(depth)
    cfg = model.config
    gates = [f"transformer.h.{i}.attn.ve_gate" for i in range(depth) if cfg.has_value_embedding(i)]
    assert gates, "the model should have value-embedding gates to leave out"
    flops, params = model.estimate_flops(), [id(p) for p in model.parameters()]

    converted = fp8.convert_to_fp8(model, "tensorwise", fused_ce=fused_ce)

    expected = [f"transformer.h.{i}.{n}" for i in range(depth) for n in BLOCK_LINEARS]
    expected += [] if fused_ce else ["lm_head"]
    assert sorted(converted) == sorted(expected)
    assert sorted(fp8_modules(model)) == sorted(expected)
    for name in gates + (["lm_head"] if fused_ce else []):
        assert type(model.get_submodule(name)) is nn.Linear, name
    # the shapes the rule was written for: d4 is 256 wide (2 heads), d20 1280 wide (10 heads)
    d = {4: 256, 20: 1280}[depth]
    assert cfg.n_embd == d
    assert model.transformer.h[0].attn.c_q.weight.shape == (d, d)
    assert model.transformer.h[0].mlp.c_fc.weight.shape == (4 * d, d)
    assert model.transformer.h[0].mlp.c_proj.weight.shape == (d, 4 * d)
    # same Parameters (the optimizer and param groups are untouched) and the same FLOP count (MFU)
    assert [id(p) for p in model.parameters()] == params
    assert model.estimate_flops() == flops
    assert fp8.convert_to_fp8(model, "tensorwise", fused_ce=fused_ce) == []  # converting twice is a no-op


@needs_torchao
def test_flops_match_an_unconverted_model():
    """Not only unchanged in place: equal to a fresh bf16 GPT's count (nanochat's FP8 under-count)."""
    bf16, model = meta_gpt(20), meta_gpt(20)
    fp8.convert_to_fp8(model, "rowwise", fused_ce=False)
    assert len(fp8_modules(model)) == 6 * 20 + 1
    assert model.estimate_flops() == bf16.estimate_flops()
    assert model.num_scaling_params() == bf16.num_scaling_params()


@needs_torchao
@pytest.mark.parametrize("recipe", fp8.RECIPES)
def test_recipe_reaches_torchao(recipe):
    model = tiny_gpt()
    fp8.convert_to_fp8(model, recipe, fused_ce=False, emulate=True)
    lin = model.transformer.h[0].attn.c_q
    granularity = lin.config.cast_config_weight.scaling_granularity.value
    assert granularity == {"tensorwise": "tensorwise", "rowwise": "axiswise"}[recipe]
    assert lin.config.emulate


def test_bad_recipe_is_a_user_error():
    with pytest.raises(UserError, match="tensorwise, rowwise"):
        fp8.convert_to_fp8(nn.Sequential(), "blockwise")


# ---- bf16 evaluation on the same weights ----------------------------------------------------------

@needs_torchao
def test_fp8_disabled_runs_the_bf16_model():
    model = tiny_gpt()
    with torch.no_grad():  # weights away from the init (zero projections) so every layer matters
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    twin = tiny_gpt()
    twin.load_state_dict(model.state_dict())
    converted = fp8.convert_to_fp8(model, "tensorwise", fused_ce=False, emulate=True)
    modules = {name: model.get_submodule(name) for name in converted}
    x, y = tiny_batch()

    ref = twin(x)
    out = model(x)
    assert not torch.equal(out, ref), "FP8 conversion changed nothing"
    assert rel_err(out, ref) < 0.1  # but FP8 is close to the high-precision result

    with fp8.fp8_disabled(model):
        assert torch.equal(model(x), ref)  # the same modules (FSDP2 holds on to them), bf16's forward
        # backward runs into the same Parameters as the FP8 modules own
        model(x, y).backward()
        twin(x, y).backward()
    for name in converted:
        assert model.get_submodule(name) is modules[name]
        assert torch.equal(modules[name].weight.grad, twin.get_submodule(name).weight.grad)

    with pytest.raises(RuntimeError, match="boom"), fp8.fp8_disabled(model):
        raise RuntimeError("boom")
    assert sorted(fp8_modules(model)) == sorted(converted)
    assert torch.equal(model(x), out)  # FP8 again


@needs_torchao
def test_fp8_disabled_does_not_recompile():
    """The train loop compiles the FP8 model and evaluates its uncompiled module in bf16: swapping the
    modules out and back must not trigger a recompile (checked with Dynamo's frontend, no C++ compiler)."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    model = tiny_gpt()
    fp8.convert_to_fp8(model, "tensorwise", fused_ce=False, emulate=True)
    compiled = torch.compile(model, backend="aot_eager", dynamic=False, fullgraph=True)
    x, y = tiny_batch()
    for _ in range(2):
        compiled(x, y).backward()
        with fp8.fp8_disabled(model), torch.no_grad():
            model(x, y)
    assert counters["stats"]["unique_graphs"] == 1
    torch._dynamo.reset()


# ---- checkpoints hold plain weights -------------------------------------------------------------

@needs_torchao
def test_checkpoint_round_trip(tmp_path):
    x, y = tiny_batch()
    model = tiny_gpt()
    converted = fp8.convert_to_fp8(model, "tensorwise", fused_ce=False, emulate=True)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(2):  # move the weights off their init
        model(x, y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    # FP8 -> plain file -> bf16 model (strict) -> same bf16 outputs
    state = fp8.plain_state_dict(model)
    assert sorted(fp8_modules(model)) == sorted(converted)  # the FP8 modules are back after saving
    assert all(type(v) is torch.Tensor for v in state.values())
    torch.save(state, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=True)
    bf16 = tiny_gpt(seed=123)
    assert set(loaded) == set(bf16.state_dict())
    bf16.load_state_dict(loaded, strict=True)
    with torch.no_grad(), fp8.fp8_disabled(model):
        assert torch.equal(bf16(x, y), model(x, y))

    # bf16 file -> FP8 model, loaded before conversion (as train.pretrain resumes) or after it
    torch.save(bf16.state_dict(), tmp_path / "bf16.pt")
    bf16_state = torch.load(tmp_path / "bf16.pt", weights_only=True)
    before, after = tiny_gpt(seed=7), tiny_gpt(seed=8)
    before.load_state_dict(bf16_state, strict=True)
    fp8.convert_to_fp8(before, "tensorwise", fused_ce=False, emulate=True)
    fp8.convert_to_fp8(after, "tensorwise", fused_ce=False, emulate=True)
    after.load_state_dict(bf16_state, strict=True)
    with torch.no_grad():
        want = model(x, y)  # the FP8 forward of the original run
        for resumed in (before, after):
            assert sorted(fp8_modules(resumed)) == sorted(converted)
            assert torch.equal(resumed(x, y), want)


# ---- availability: one line, exit 2 -------------------------------------------------------------

def test_cpu_without_emulation_is_refused():
    with pytest.raises(UserError) as e:
        fp8.check_fp8_available(torch.device("cpu"))
    msg = str(e.value)
    assert "\n" not in msg and "cpu" in msg and "8.9" in msg


def test_old_gpu_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(UserError) as e:
        fp8.check_fp8_available(torch.device("cuda", 0))
    assert "\n" not in str(e.value) and "A100" in str(e.value) and "8.0" in str(e.value)


@needs_torchao
def test_hopper_and_emulation_are_accepted(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    fp8.check_fp8_available(torch.device("cuda", 0))
    fp8.check_fp8_available(torch.device("cpu"), emulate=True)


def test_missing_torchao_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    for name in [m for m in sys.modules if m == "torchao" or m.startswith("torchao.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "torchao", None)  # import torchao now raises ImportError
    with pytest.raises(UserError) as e:
        fp8.check_fp8_available(torch.device("cuda", 0))
    assert "\n" not in str(e.value) and "pip install -e .[fp8]" in str(e.value)
    with pytest.raises(UserError, match=r"pip install -e \.\[fp8\]"):
        fp8.check_fp8_available(torch.device("cpu"), emulate=True)


def test_refusal_exits_2_with_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        run_cli(lambda argv: fp8.check_fp8_available(torch.device("cpu")), [])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--fp8" in err


@pytest.mark.slow
def test_torchao_is_imported_only_for_fp8():
    code = ("import sys, train.fp8, train.pretrain, model.gpt; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torchao'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ---- a few training steps on torchao's emulated FP8 (CPU) ------------------------------------------

def train_tiny(recipe: str | None, steps: int = 8) -> list[float]:
    """AdamW on one batch; recipe None = the unconverted (high-precision) model."""
    x, y = tiny_batch()
    model = tiny_gpt()
    if recipe is not None:
        assert len(fp8.convert_to_fp8(model, recipe, fused_ce=False, emulate=True)) == 13
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@pytest.fixture(scope="module")
def reference_losses() -> list[float]:
    return train_tiny(None)


@needs_torchao
@pytest.mark.parametrize("recipe", fp8.RECIPES)
def test_emulated_fp8_training(recipe, reference_losses):
    """8 AdamW steps on one batch: the FP8 loss is finite, falls, differs from the high-precision
    run (FP8 is really in use) and stays close to it."""
    losses, ref = train_tiny(recipe), reference_losses
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 1.5, losses  # ln(256) = 5.55 falls to ~3.2 in 8 steps
    assert losses != ref
    assert max(abs(a - b) / b for a, b in zip(losses, ref)) < 0.05, (losses, ref)
