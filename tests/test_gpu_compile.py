"""Every Triton kernel compiles for Hopper (sm_90) and Ampere (sm_80), every autotune config, without a GPU.

The interpreter accepts things the GPU compiler does not; this builds each launch the code makes down to a
cubin (bench.compile_check, in subprocesses without TRITON_INTERPRET), so such a kernel fails here, on the CPU.
A committed report (bench/results/compile_check/sm_<arch>.json) whose build key is this tree's is what building
again would give: it is checked instead (the builds take minutes).
"""
import ast
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import compile_check
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


def committed(arch: int) -> list | None:
    """The committed report's rows when its key is this tree's, else None."""
    path = compile_check.REPORTS / f"sm_{arch}.json"
    doc = json.loads(path.read_text()) if path.exists() else {}
    return doc["rows"] if doc.get("key") == compile_check.build_key(arch) else None


def build_all(out: Path, archs) -> dict:
    """{arch: rows} from bench.compile_check for each arch, all at once (one per CPU core)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # triton's own default; set to keep its warning out of the logs
    procs = {arch: subprocess.Popen([sys.executable, "-m", "bench.compile_check", "--arch", str(arch),
                                     "--json", str(out / f"{arch}.json")],
                                    cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for arch in archs}
    try:
        logs = {arch: proc.communicate(timeout=1800)[0] for arch, proc in procs.items()}  # ~50 builds per target
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
    builds = {arch: committed(arch) for arch in (90, 80)}
    stale = [arch for arch, rows in builds.items() if rows is None]
    if stale:
        print(f"building for {', '.join(f'sm_{a}' for a in stale)}: no committed report with this tree's build key "
              "(bench.compile_check's docstring says how to refresh it)")
        builds |= build_all(tmp_path, stale)
    for arch, rows in builds.items():
        assert rows and all(r["ok"] for r in rows), (arch, [r for r in rows if not r["ok"]])
        # every kernel the code launches is among the builds: a new kernel cannot escape this check
        assert launched_kernels() <= {r["kernel"].split("[")[0] for r in rows}, arch
        # each autotuned launch contributes all its configs (+ the fp32 path)
        assert sum(r["kernel"] == "_attn_fwd" for r in rows) == 2 * len(attention.FWD.autotuner.configs) + 1, arch
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


def test_the_build_key_covers_what_the_builds_read(tmp_path):
    """Any byte of a kernel file or of the launch recorder, the Triton or torch version, a Triton setting, or the
    target changes the key: a committed report can never stand for builds of other sources."""
    import shutil
    root = tmp_path / "tree"
    shutil.copytree(ROOT / "kernels", root / "kernels", ignore=shutil.ignore_patterns("__pycache__"))
    (root / "bench").mkdir()
    for name in ("compile_check.py", "triton_shim.py"):
        shutil.copy(ROOT / "bench" / name, root / "bench" / name)
    key = compile_check.build_key(90, root)
    assert key == compile_check.build_key(90)  # the copy is this tree
    assert compile_check.build_key(80, root) != key
    assert compile_check.build_key(90, root, versions="triton 3.6.0 torch 2.11.0") != key
    other_ptxas = compile_check.triton_settings({"TRITON_PTXAS_PATH": "/opt/other/ptxas", "TRITON_INTERPRET": "1"})
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(compile_check, "STARTING_SETTINGS", other_ptxas)
        assert compile_check.build_key(90, root) != key
    for changed in ("kernels/attention.py", "kernels/tuned/README.md", "bench/triton_shim.py"):
        path = root / changed
        saved = path.read_bytes()
        path.write_bytes(saved + b" ")
        assert compile_check.build_key(90, root) != key, changed
        path.write_bytes(saved)
    (root / "kernels" / "new.py").write_text("")
    assert compile_check.build_key(90, root) != key


def test_refuses_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "bench.compile_check", "--op", "cross_entropy"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "without TRITON_INTERPRET" in proc.stderr
    assert "Traceback" not in proc.stderr
