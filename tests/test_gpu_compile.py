"""Every Triton kernel compiles for Hopper (sm_90) and Ampere (sm_80), every autotune config, without a GPU.

The interpreter accepts things the GPU compiler does not; this builds each launch the code makes down to a
cubin (bench.compile_check, in subprocesses without TRITON_INTERPRET), so such a kernel fails here, on the CPU.
"""
import ast
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kernels import attention, cross_entropy, newton_schulz

ROOT = Path(__file__).resolve().parents[1]
TENSOR_CORE_KERNELS = {"_symmetric_kernel", "_update_kernel", "_attn_fwd", "_attn_bwd_dkdv", "_attn_bwd_dq"}


def launched_kernels() -> set[str]:
    """The @triton.jit functions of kernels/ that no other jit function calls: the ones launched from Python."""
    jitted, sources = set(), {}
    for module in (attention, cross_entropy, newton_schulz):
        tree = ast.parse(inspect.getsource(module))
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and any("jit" in ast.unparse(d) for d in node.decorator_list):
                jitted.add(node.name)
                sources[node.name] = node
    called = {c.func.id for node in sources.values() for c in ast.walk(node)
              if isinstance(c, ast.Call) and isinstance(c.func, ast.Name)}
    return jitted - called


def build_all(out: Path) -> dict:
    """{arch: rows} from bench.compile_check for sm_90 and sm_80, both at once (one per CPU core)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # triton's own default; set to keep its warning out of the logs
    procs = {arch: subprocess.Popen([sys.executable, "-m", "bench.compile_check", "--arch", str(arch),
                                     "--json", str(out / f"{arch}.json")],
                                    cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for arch in (90, 80)}
    try:
        logs = {arch: proc.communicate(timeout=1800)[0] for arch, proc in procs.items()}  # ~110 builds per target
    finally:
        for proc in procs.values():
            proc.kill()  # after a timeout, no compiler is left running beside the other tests
    failed = [f"sm_{arch}: a kernel did not compile\n{logs[arch][-4000:]}" for arch, proc in procs.items()
              if proc.returncode != 0]
    assert not failed, "\n".join(failed)
    return {arch: json.loads((out / f"{arch}.json").read_text())["rows"] for arch in procs}


@pytest.mark.slow
def test_every_kernel_and_config_compiles_for_sm90_and_sm80(tmp_path):
    """One test, so that the builds are made once on whichever pytest-xdist worker runs it."""
    builds = build_all(tmp_path)
    for arch, rows in builds.items():
        assert rows and all(r["ok"] for r in rows), (arch, [r for r in rows if not r["ok"]])
        # every kernel the code launches is among the builds: a new kernel cannot escape this check
        assert launched_kernels() <= {r["kernel"].split("[")[0] for r in rows}, arch
        # each autotuned launch contributes all its configs (+ the fp32 path)
        assert sum(r["kernel"] == "_attn_fwd" for r in rows) == 2 * len(attention._FWD_CONFIGS) + 1, arch
        # every config can launch on the target: none needs more shared memory than one block may have
        assert all(r["fits"] for r in rows), (arch, [(r["kernel"], r["config"], r["shared_bytes"])
                                                     for r in rows if not r["fits"]])
    # bf16 matmul kernels on sm_90 run on Hopper's warpgroup tensor cores (wgmma), not the older mma.sync
    bf16 = [r for r in builds[90] if r["kernel"].split("[")[0] in TENSOR_CORE_KERNELS and "bf16" in r["case"]]
    assert {r["kernel"].split("[")[0] for r in bf16} == TENSOR_CORE_KERNELS
    assert all(r["wgmma"] > 0 for r in bf16), [(r["kernel"], r["config"]) for r in bf16 if not r["wgmma"]]
    assert not any(r["wgmma"] for r in builds[80])  # sm_80 has none: the count reads the PTX for real


def test_launched_kernels_found():
    """The scan finds the launched kernels and leaves out the helpers they call."""
    found = launched_kernels()
    assert {"_attn_fwd", "_attn_bwd_dkdv", "_symmetric_kernel", "_softcap_ce_rows_kernel"} <= found
    assert not found & {"_fwd_inner", "_lower_tile", "_store_symmetric", "_tanh"}


def test_each_distinct_binary_is_built_once(monkeypatch):
    """A variant's case that launches an earlier case's kernel as it was (the plain dk/dv kernel beside the TMA forward
    and dq) is not built twice; a changed switch, dtype, stride, int argument or config is a build of its own."""
    import torch
    from bench import compile_check as cc

    def dkdv(): pass

    def launch(case, x, n=2048, **kwargs):
        return cc.Launch("attention", case, dkdv, (x, n), {"HEAD_DIM": 128} | kwargs,
                         [{"num_warps": 4}, {"num_warps": 8}])
    x = torch.empty(4, 8, dtype=torch.bfloat16)
    launches = [launch("plain", x), launch("tma", torch.empty(4, 8, dtype=torch.bfloat16)),  # the same binaries
                launch("fused", x, FUSED_DQ=True), launch("fp32", x.float()), launch("strided", x.t()),
                launch("short", x, n=1)]
    monkeypatch.setattr(cc, "LAUNCHES", {"attention": lambda: launches})
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # nothing is compiled here
    monkeypatch.setattr(cc.triton_shim, "check_version", lambda: None)
    built = []
    monkeypatch.setattr(cc, "check", lambda launch, config, arch: built.append((launch.case, config["num_warps"]))
                        or cc.Row("attention", launch.case, "dkdv", "", True))
    assert len(cc.run(["attention"], 90)) == 10
    assert [case for case, _ in built] == ["plain", "plain", "fused", "fused", "fp32", "fp32", "strided", "strided",
                                           "short", "short"]


def test_refuses_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "bench.compile_check", "--op", "cross_entropy"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "without TRITON_INTERPRET" in proc.stderr
    assert "Traceback" not in proc.stderr
