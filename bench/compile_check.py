"""Compile every Triton kernel for a GPU, without one: each launch the code makes, with each autotune config.

    python -m bench.compile_check                    # Hopper (sm_90): a row per kernel, launch and config
    python -m bench.compile_check --arch 80          # Ampere (A100)
    python -m bench.compile_check --op attention --json out.json

The kernels' own launchers run on small CPU tensors of the real widths (T 2048, D 128, V 32768, the d20 Muon
stacks) with Triton's launch replaced by a recorder, so what is compiled is exactly what a GPU run would
launch, with the same argument specialisation. Each launch is then compiled down to a cubin for the target
(Triton's bundled ptxas), and a row reports the shared memory it needs against the target's limit, registers
per thread and bytes spilled (ptxas -v), the wgmma instructions (Hopper's tensor cores) in its PTX, and the
compile time. It shows that nothing in the kernels only the interpreter accepts, which configs cannot launch
on the target, and which spill. It says nothing about speed: the installed Triton's code generation, which
may differ from the GPU machine's.

Run it without TRITON_INTERPRET (under it @triton.jit makes interpreter functions, which do not compile).
Exit status: 0 when every launch compiled, 1 when one did not, 2 for bad input.

The reports of every op for sm_90 and sm_80 are committed as REPORTS/sm_<arch>.json with their build_key(): what
the builds read (every file of kernels/, this file and the Triton shim by content, the Triton and torch versions,
the target). tests/test_gpu_compile.py reads a report whose key is the tree's instead of building again; after a
change to any of those, `python -m bench.compile_check --arch 90 --json bench/results/compile_check/sm_90.json`
(and 80) refreshes it.
"""
import contextlib
import hashlib
import json
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import triton

from bench import triton_shim
from kernels import dispatch
from train.errors import Parser, UserError, run_cli

# Largest shared memory one block may use (opt-in), bytes: CUDA's compute-capability table.
SHARED_MEMORY_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
ROOT = Path(__file__).resolve().parents[1]
REPORTS = ROOT / "bench" / "results" / "compile_check"


def triton_settings(environ=os.environ) -> list:
    """The TRITON_* settings of environ but the interpreter switch, the default fp fusion as 1 when unset."""
    settings = {k: v for k, v in environ.items() if k.startswith("TRITON_") and k != "TRITON_INTERPRET"}
    settings.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton's own default: set or not, the same builds
    return sorted(settings.items())


# as the process started: compiling sets some of Triton's own knobs in os.environ
STARTING_SETTINGS = triton_settings()


def build_key(arch: int, root: Path = ROOT, versions: str | None = None) -> str:
    """sha256 (16 hex digits) of everything a full report's builds depend on: the content of every file under
    kernels/ and of the launch recorder (this file, bench/triton_shim.py), the Triton (its compiler and ptxas)
    and torch versions, the target, and the TRITON_* settings of the environment (another ptxas, other codegen
    knobs)."""
    versions = versions or f"triton {triton.__version__} torch {torch.__version__} {STARTING_SETTINGS}"
    h = hashlib.sha256(f"sm_{arch} {versions}".encode())
    files = sorted(p for p in (root / "kernels").rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    for path in files + [root / "bench" / "compile_check.py", root / "bench" / "triton_shim.py"]:
        h.update(b"\0" + path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


@dataclass
class Launch:
    """One kernel launch as a GPU run makes it: the jit function, its arguments, and the configs to build."""
    op: str
    case: str
    kernel: object  # triton JITFunction
    args: tuple
    kwargs: dict
    configs: list  # list of dicts of config kwargs (num_warps, num_stages, block sizes); [{}] = as launched


@dataclass
class Row:
    op: str
    case: str
    kernel: str
    config: str
    ok: bool
    shared_bytes: int = 0
    fits: bool = True
    registers: int = 0
    spill_bytes: int = 0
    wgmma: int = 0
    seconds: float = 0.0
    error: str = ""


@contextlib.contextmanager
def recording(launches: list, op: str, case: str):
    """Record the launches of the block (nothing runs) as Launch rows: an autotuned one with all its configs."""
    def autotuned(fn, args, kwargs, configs):
        launches.append(Launch(op, case, fn, args, kwargs, configs))

    def plain(fn, args, kwargs):
        launches.append(Launch(op, case, fn, args, kwargs, [{}]))

    with triton_shim.recording_launches(autotuned, plain):
        yield


def newton_schulz_launches() -> list[Launch]:
    """One Polar Express step on a bf16 d20 stack: X·Xᵀ, b·A + c·A·A (symmetric), a·X + B·X (ours)."""
    from kernels import newton_schulz as ns
    launches: list = []
    with recording(launches, "newton_schulz", "bf16 2x1280x5120"):
        ns._polar_express_op(torch.randn(2, 1280, 5120).bfloat16(), 1, True)
    return launches


def cross_entropy_launches() -> list[Launch]:
    """The row kernel as the three passes call it: training (loss + gradient), bpb (loss), its backward."""
    from kernels import cross_entropy as ce
    launches: list = []
    N, H, V = 16, 1280, 32768  # N does not reach the kernel's code (a program per row); V picks its blocks
    h, w = torch.randn(N, H).bfloat16(), torch.randn(V, H).bfloat16() * 0.02
    y = torch.randint(0, V, (N,))
    nats, lse = torch.empty(N), torch.empty(N)
    dh, dw = torch.empty_like(h), torch.zeros(V, H)
    with recording(launches, "cross_entropy", "bf16 V=32768 train"):
        ce._chunked(h, w, y, 15.0, -1, nats, lse, False, dh, dw)
    with recording(launches, "cross_entropy", "bf16 V=32768 bpb"):
        ce._chunked(h, w, y, 15.0, -1, nats, lse, False, None, None)
    with recording(launches, "cross_entropy", "bf16 V=32768 backward"):
        ce._chunked(h, w, y, 15.0, -1, nats, lse, True, dh, dw, row_grad=torch.ones(N))
    return launches


def attention_launches() -> list[Launch]:
    """Forward and backward at T 2048 with window 1024: bf16 at D 128 and 64 (tensor cores), fp32 at D 128."""
    from kernels import attention as at
    launches: list = []
    for dtype, D in ((torch.bfloat16, 128), (torch.bfloat16, 64), (torch.float32, 128)):
        B, T, H = 1, 2048, 10
        q, k, v = (torch.randn(B, T, H, D, dtype=dtype) for _ in range(3))
        out, lse = torch.empty_like(q), torch.empty(B, H, T)
        name = {torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]
        scale, grads = 1.44 / D ** 0.5, [torch.empty_like(t) for t in (q, k, v)]
        with recording(launches, "attention", f"{name} D={D}"):
            at._forward_into(q, k, v, 1024, scale, out, lse)
            at._backward_into(out, q, k, v, out, lse, 1024, scale, *grads)
    return launches


LAUNCHES = {"newton_schulz": newton_schulz_launches, "cross_entropy": cross_entropy_launches,
            "attention": attention_launches}


def compile_launch(launch: Launch, config: dict, arch: int):
    """(compiled kernel, ptxas -v log) for one config of a launch on sm_<arch>."""
    return triton_shim.compile_for(launch.kernel, launch.args, {**launch.kwargs, **config}, arch)


def _config_name(launch: Launch, config: dict) -> str:
    merged = {**launch.kwargs, **config}
    short = {"num_warps": "w", "num_stages": "s"}
    return " ".join(f"{short.get(k, k)}={v}" for k, v in merged.items()
                    if v is not None and (k.startswith("BLOCK") or k in short))


def _kernel_name(launch: Launch) -> str:
    """The kernel, with the constexpr switches it was launched with on (one kernel can serve two products)."""
    flags = [k for k, v in launch.kwargs.items() if v is True and k.isupper()]
    return launch.kernel.__name__ + (f"[{','.join(flags)}]" if flags else "")


def check(launch: Launch, config: dict, arch: int) -> Row:
    row = Row(launch.op, launch.case, _kernel_name(launch), _config_name(launch, config), ok=False)
    t0 = time.perf_counter()
    try:
        kernel, log = compile_launch(launch, config, arch)
        row.ok = True
    except Exception as e:  # noqa: BLE001 - a compile error is the finding: report it, go on
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        row.error = f"{type(e).__name__}: {' ... '.join(dict.fromkeys(lines[:1] + lines[-1:]))}"[:300]
    row.seconds = time.perf_counter() - t0
    if not row.ok:
        return row
    row.shared_bytes = int(kernel.metadata.shared)
    row.fits = row.shared_bytes <= SHARED_MEMORY_LIMIT[arch]
    registers = re.findall(r"Used (\d+) registers", log)
    spills = re.findall(r"(\d+) bytes spill stores", log)
    row.registers = max(map(int, registers)) if registers else 0
    row.spill_bytes = sum(map(int, spills))
    row.wgmma = kernel.asm.get("ptx", "").count("wgmma.mma_async")
    return row


def run(ops: list[str], arch: int) -> list[Row]:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise UserError("bench.compile_check compiles for a GPU: run it without TRITON_INTERPRET=1")
    triton_shim.check_version()
    rows = []
    for op in ops:
        for launch in LAUNCHES[op]():
            for config in launch.configs:
                row = check(launch, config, arch)
                rows.append(row)
                print(format_row(row))
    return rows


def format_row(r: Row) -> str:
    if not r.ok:
        return f"{r.op:14s} {r.case:22s} {r.kernel:36s} {r.config:34s} FAILED {r.error}"
    smem = f"{r.shared_bytes / 1024:6.0f} KB{'' if r.fits else ' (over)'}"
    return (f"{r.op:14s} {r.case:22s} {r.kernel:36s} {r.config:34s} {smem:14s} {r.registers:4d} regs "
            f"{r.spill_bytes:6d} B spilled {r.wgmma:4d} wgmma {r.seconds:5.1f}s")


def main(argv=None) -> None:
    p = Parser(prog="bench.compile_check", description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability x10: 90 H100/H200, 80 A100")
    p.add_argument("--op", action="append", choices=dispatch.OPS, default=None, help="only this op (repeatable)")
    p.add_argument("--json", default=None, help="write the rows here")
    args = p.parse_args(argv)
    if args.arch not in SHARED_MEMORY_LIMIT:
        raise UserError(f"--arch {args.arch}: expected one of {', '.join(map(str, SHARED_MEMORY_LIMIT))}")
    print(f"compiling for sm_{args.arch} (shared memory limit {SHARED_MEMORY_LIMIT[args.arch] / 1024:.0f} KB)")
    rows = run(args.op or list(dispatch.OPS), args.arch)
    failed = [r for r in rows if not r.ok]
    over = [r for r in rows if r.ok and not r.fits]
    print(f"{len(rows)} builds: {len(rows) - len(failed)} compiled, {len(failed)} failed; "
          f"{len(over)} need more shared memory than sm_{args.arch} has (the autotuner skips those); "
          f"{sum(r.spill_bytes > 0 for r in rows)} spill; {sum(r.seconds for r in rows):.0f}s")
    if args.json:
        key = build_key(args.arch) if not args.op else None  # a report of every op stands for a build
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"arch": args.arch, "key": key, "triton": triton.__version__, "torch": torch.__version__,
                       "rows": [asdict(r) for r in rows]}, f, indent=1)
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    run_cli(main)
