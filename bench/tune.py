"""The tuned-config table of this GPU (kernels/tuned/<device>.json): what the autotuner chooses at the model shapes,
and how long choosing takes.

    python -m bench.tune                         # d12, d20, d26 shapes; writes kernels/tuned/<device>.json
    python -m bench.tune --depth 20 --out DIR    # one depth; the table goes to DIR/<device>.json
    python -m bench.tune --merge FILE.json       # fold a table written elsewhere (a GPU run's results) into ours

Per depth, the shapes a training step launches: the whole-model Newton-Schulz stacks (triton_full, auto's) and
attention (fwd + bwd) at B 32, T 2048, D 128 with the window of S layers (T/2), and full L layers (auto runs SDPA
there for bf16; a forced --kernel-attention triton does not). Each kernel's first call autotunes (tables
ignored, so the choice is made afresh); its seconds are reported next to a second, tuned call.
Every key the autotuners chose is then added to the table (a key already there is replaced). Needs CUDA.
"""
import json
import time
from pathlib import Path

import torch
import triton

from bench import timing
from bench.ops import NS_MODELS, SPEC_DEPTHS
from kernels import tuned
from model.config import MAX_SEQ_LEN, config_from_depth
from train.errors import Parser, UserError, run_cli
from train.paths import atomic_write
from train.scaling import DEVICE_BATCH_SIZE

SEQ_LEN, BATCH = MAX_SEQ_LEN, DEVICE_BATCH_SIZE  # train.pretrain's defaults


def choices() -> dict:
    """{kernel: {key text: config}} of every autotuned kernel, from what its autotuner has chosen so far."""
    from bench import triton_shim
    out = {}
    for name, kernel in tuned.AUTOTUNED.items():
        chosen = {tuned.key_text(key): cfg for key, cfg in triton_shim.autotune_choices(kernel.autotuner)}
        if chosen:
            out[name] = chosen
    return out


def write_table(path: Path, device_name: str, kernels: dict, commit: str | None) -> dict:
    """Merge kernels into the table at path (created when missing); returns the written document."""
    doc = json.loads(path.read_text()) if path.exists() else {"device": device_name, "kernels": {}}
    for name, configs in kernels.items():
        doc["kernels"].setdefault(name, {}).update(configs)
    doc |= {"device": device_name, "git_commit": commit, "triton": triton.__version__}
    with atomic_write(path, "w") as f:
        f.write(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    return doc


def save_choices(folder, device_name: str, commit: str | None) -> tuple[Path, dict]:
    """What the autotuners chose so far, merged into that GPU's table in folder: (its path, the table)."""
    path = tuned.table_path(device_name, folder)
    return path, write_table(path, device_name, choices(), commit)


def _first_and_second(fn) -> tuple[float, float]:
    """Seconds of fn's first call (compile + autotune) and of its second (tuned)."""
    times = []
    for _ in range(2):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times[0], times[1]


def tune_depth(depth: int, device) -> list[dict]:
    from kernels.attention import attention
    from kernels.newton_schulz import orthogonalize
    rows = []
    for k, m, n in NS_MODELS[depth]:
        G = torch.randn(k, m, n, device=device, dtype=torch.bfloat16)
        first, second = _first_and_second(lambda G=G: orthogonalize(G, impl="triton_full"))
        rows.append({"depth": depth, "kernel": "newton_schulz (triton_full)", "shape": f"{k}x{m}x{n}",
                     "first_s": first, "second_s": second})
    H = config_from_depth(depth).n_head
    for window in (SEQ_LEN // 2, -1):
        q, k, v = (torch.randn(BATCH, SEQ_LEN, H, 128, device=device, dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))

        def fwd_bwd(q=q, k=k, v=v, window=window):
            attention(q, k, v, window=window, impl="triton").sum().backward()
        first, second = _first_and_second(fwd_bwd)
        rows.append({"depth": depth, "kernel": "attention fwd+bwd (triton)", "shape": f"{BATCH}x{SEQ_LEN}x{H}x128",
                     "window": window, "first_s": first, "second_s": second})
    return rows


def build_parser() -> Parser:
    p = Parser(prog="bench.tune", description="Autotune our kernels at the model shapes; write this GPU's table.")
    p.add_argument("--depth", default="12,20,26", help="comma-separated depths among 12, 20, 26")
    p.add_argument("--out", default=str(tuned.TABLE_DIR), help="folder of the tables (default: kernels/tuned)")
    p.add_argument("--json", default=None, help="also write the autotuning times here")
    p.add_argument("--merge", default=None, metavar="TABLE.json", help="merge this table into --out's and stop")
    return p


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    if args.merge:
        src = json.loads(Path(args.merge).read_text())
        path = tuned.table_path(src["device"], args.out)
        write_table(path, src["device"], src["kernels"], src.get("git_commit"))
        print(f"merged {args.merge} into {path}")
        return
    depths = [int(d) for d in args.depth.split(",")]
    if set(depths) - set(SPEC_DEPTHS):
        raise UserError(f"--depth takes {', '.join(map(str, SPEC_DEPTHS))}, got {args.depth}")
    if not torch.cuda.is_available():
        raise UserError("bench.tune autotunes Triton kernels on a GPU; no CUDA device here")
    info = timing.device_info("cuda")
    rows = []
    with tuned.autotuning_only():
        for depth in depths:
            for row in tune_depth(depth, "cuda"):
                rows.append(row)
                print(f"  d{depth} {row['kernel']} {row['shape']} {row.get('window', '')}: first call "
                      f"{row['first_s']:.1f} s (compile + autotune), then {1e3 * row['second_s']:.1f} ms", flush=True)
    path, doc = save_choices(args.out, info["device"], info["git_commit"])
    print(f"{sum(len(c) for c in doc['kernels'].values())} tuned keys in {path}; "
          f"{sum(r['first_s'] for r in rows):.0f} s of first calls")
    if args.json:
        Path(args.json).write_text(json.dumps({"kind": "tune", "device": info, "results": rows}, indent=1))


if __name__ == "__main__":
    run_cli(main)
