"""kernels.dispatch: the one list of implementation names, the one auto rule, forcing, and auto under compile."""
import logging

import pytest
import torch

from kernels import dispatch


@pytest.fixture
def fresh_auto():
    cached = dispatch._auto
    cached.cache_clear()
    yield
    cached.cache_clear()


def test_every_name_is_registered_and_every_flag_value_is_a_name():
    for op, names in dispatch.IMPLS.items():
        for name in names:
            assert callable(dispatch.implementation(op, name)), (op, name)
        assert dispatch.choices(op) == ("auto", *names)
    with pytest.raises(ValueError, match="not in dispatch.IMPLS"):
        dispatch.register("attention", "mine")


@pytest.mark.parametrize("op", dispatch.OPS)
def test_auto_answers_a_valid_flag_value(op, fresh_auto):
    for on_cuda in (False, True):
        for supported in (False, True):
            picked = dispatch.auto(op, on_cuda, 0, True, supported)
            assert picked in dispatch.IMPLS[op]
            assert picked == (dispatch.OURS[op] if on_cuda and supported else dispatch.PORTABLE[op])


def test_auto_picks_fa3_on_hopper_and_says_so_once(monkeypatch, caplog, fresh_auto):
    monkeypatch.setattr(dispatch, "_fa3_fits", lambda device_index: True)
    with caplog.at_level(logging.WARNING, logger="kernels"):
        assert dispatch.auto("attention", True, 0, True, True) == "fa3"
        assert dispatch.auto("attention", True, 0, True, True) == "fa3"
    assert [r.message for r in caplog.records].count(
        "kernels: attention 'auto' runs FlashAttention-3 (fa3) instead of ours: installed, Hopper, bf16") == 1
    assert dispatch.auto("attention", True, 0, False, True) == "triton"  # fp16/fp32: ours


def test_auto_sends_full_bf16_layers_to_sdpa_and_windowed_ones_to_ours(fresh_auto):
    assert dispatch.auto("attention", True, 0, True, True, full=True) == "sdpa"
    assert dispatch.auto("attention", True, 0, True, True, full=False) == "triton"
    assert dispatch.auto("attention", True, 0, False, True, full=True) == "triton"  # fp16/fp32: as measured, ours
    assert dispatch.auto("attention", False, 0, True, True, full=True) == "blocked"
    assert dispatch.auto("cross_entropy", True, 0, True, True, full=True) == "triton"


def test_forcing_and_unknown_names():
    x = torch.zeros(2)
    with dispatch.forced(newton_schulz="torch"):
        assert dispatch.choose("newton_schulz", "auto", x, True) == "torch"
    assert dispatch.choose("newton_schulz", "auto", x, True) == dispatch.PORTABLE["newton_schulz"]
    with pytest.raises(dispatch.KernelUnavailable, match="unknown impl 'nope'"):
        dispatch.choose("attention", "nope", x, True)


def test_auto_is_decided_while_compiling_without_a_graph_break(monkeypatch, fresh_auto, capsys):
    """On a GPU auto probes for FlashAttention-3 and may log: torch.compile must run it, not trace it."""
    def probing(op, on_cuda, device_index, bf16, supported, full):
        print("probing")  # a side effect dynamo cannot trace: fullgraph fails unless auto is a constant
        return "torch"
    monkeypatch.setattr(dispatch, "_auto", probing)

    def f(x):
        return x * 2 if dispatch.choose("newton_schulz", "auto", x, True) == "torch" else x * 3

    torch._dynamo.reset()
    assert torch.equal(torch.compile(f, fullgraph=True, backend="eager")(torch.ones(3)), torch.full((3,), 2.0))
    assert capsys.readouterr().out.count("probing") == 1
