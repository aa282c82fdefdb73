"""bench/gpu_check.sh's results folder as one check.json and one check.md (rebuilt after every step).

    python -m bench.check bench/results/<stamp> [--print]

check.json has every key of KEYS; a part whose step did not run (or ran out of time) is null, and `steps` says why.
"""
import importlib.util
import json
from pathlib import Path

from bench.mfu import NANOCHAT
from kernels import dispatch, tuned
from train.errors import Parser, UserError, run_cli
from train.paths import atomic_write

KEYS = ("kind", "mode", "env", "steps", "peers", "d20_step", "profile", "fp8", "kernels_ab", "bf16_correctness",
        "autotune")
PEERS = {"liger_kernel": "Liger-Kernel", "cut_cross_entropy": "cut-cross-entropy", "torchao": "torchao (FP8)",
         "flash_attn_interface": "FlashAttention-3", "flash_attn": "FlashAttention-2"}
STEP_FIELDS = ("tokens_per_s", "step_ms", "mfu_h100", "mfu_device", "peak_mem_gb", "loss", "first_step_s",
               "extras_error", "recompute_mlp", "checkpoint_blocks")


def _load(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _variant(doc, name: str) -> dict | None:
    for row in (doc or {}).get("results", []):
        if row["variant"].startswith(name):
            if row["status"] != "ok":
                return {"status": row["status"], "reason": row["reason"]}
            return {"status": "ok"} | {k: row.get(k) for k in STEP_FIELDS}
    return None


def _ratio(a: dict | None, b: dict | None) -> float | None:
    if a and b and a.get("tokens_per_s") and b.get("tokens_per_s"):
        return a["tokens_per_s"] / b["tokens_per_s"]
    return None


def d20_step(folder: Path) -> dict | None:
    doc = _load(folder / "d20.json")
    if doc is None:
        return None
    ours, torch_only = _variant(doc, "default"), _variant(doc, NANOCHAT)
    return {"depth": doc["depth"], "batch": f"{doc['args']['device_batch_size']} x {doc['args']['seq_len']}",
            "ours": ours, "torch_only": torch_only, "speedup": _ratio(ours, torch_only)}


def fp8(folder: Path, bf16: dict | None) -> dict | None:
    rows = {recipe: _variant(_load(folder / name), "default")
            for recipe, name in (("tensorwise", "fp8.json"), ("rowwise", "fp8_rowwise.json"))}
    if not any(rows.values()):
        return None
    ours = (bf16 or {}).get("ours")
    return rows | {"bf16": ours, "speedup_tensorwise": _ratio(rows["tensorwise"], ours),
                   "speedup_rowwise": _ratio(rows["rowwise"], ours)}


def _ab_row(r: dict) -> dict:
    tflops = next(iter(r["tflops"].values())) if r.get("tflops") else None
    return {"shape": r["label"], "mode": r["mode"], "impl": r["impl"], "dtype": r["dtype"], "status": r["status"],
            "reason": r["reason"], "ms": r.get("ms"), "tflops": tflops, "rel_error": r.get("rel_error"),
            "tol": r["tol"], "ok": r.get("ok"), "first_call_s": r.get("first_call_s")}


def kernels_ab(folder: Path) -> dict | None:
    """The A/B rows per op, from its ab_<op> step."""
    docs = {op: _load(folder / f"ab_{op}.json") for op in dispatch.OPS}
    return {op: [_ab_row(r) for r in doc["results"]] for op, doc in docs.items() if doc is not None} or None


def bf16_correctness(ab: dict | None) -> dict | None:
    if not ab:
        return None
    rows = [{"op": op} | {k: r[k] for k in ("impl", "shape", "mode", "dtype", "rel_error", "tol", "ok")}
            for op, op_rows in ab.items() for r in op_rows if r["status"] == "ok"]
    return {"all_ok": bool(rows) and all(r["ok"] for r in rows), "rows": rows}  # nothing checked is not ok


def autotune(folder: Path, env: dict | None, d20: dict | None, ab: dict | None) -> dict:
    ours = (d20 or {}).get("ours") or {}
    first_calls = {f"{op} {r['impl']} {r['shape']} {r['mode']}": r["first_call_s"]
                   for op, rows in (ab or {}).items() for r in rows if r["impl"] in dispatch.TRITON[op]
                   and r["first_call_s"] is not None}
    written = sorted(str(p) for p in (folder / "tuned").glob("*.json"))
    device = (env or {}).get("device")
    committed = device and tuned.table_path(device).exists()
    return {"d20_first_step_s": ours.get("first_step_s"),
            "torch_only_first_step_s": ((d20 or {}).get("torch_only") or {}).get("first_step_s"),
            "ab_first_call_s": first_calls, "table_written": written, "committed_table_used": bool(committed)}


def assemble(folder: Path, mode: str) -> dict:
    steps = [json.loads(line) for line in (folder / "steps.jsonl").read_text().splitlines()
             if line.strip()] if (folder / "steps.jsonl").exists() else []
    env = _load(folder / "env.json")
    d20 = d20_step(folder)
    ab = kernels_ab(folder)
    profile = _load(folder / "profile.json")
    return {"kind": "gpu_check", "mode": mode, "env": env, "steps": steps,
            "peers": {label: importlib.util.find_spec(mod) is not None for mod, label in PEERS.items()},
            "d20_step": d20, "profile": profile and {k: profile[k] for k in ("step_ms", "steps", "units",
                                                                             "categories", "top_kernels")},
            "fp8": fp8(folder, d20), "kernels_ab": ab, "bf16_correctness": bf16_correctness(ab),
            "autotune": autotune(folder, env, d20, ab)}


def _pct(x) -> str:
    return "-" if x is None else f"{x:.1f}%"


def _num(x, spec=",.0f") -> str:
    return "-" if x is None else format(x, spec)


def ab_table(rows: list[dict]) -> str:
    """One op's A/B rows as a table: a line per shape and mode, a column per impl; the skipped and failed below."""
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    out = ["| shape | mode | " + " | ".join(impls) + " |", "|---|---|" + "---:|" * len(impls)]
    notes = {}
    for shape, mode in dict.fromkeys((r["shape"], r["mode"]) for r in rows):
        cells = {r["impl"]: r for r in rows if (r["shape"], r["mode"]) == (shape, mode)}
        best = min((r["ms"] for r in cells.values() if r["status"] == "ok" and r["ok"] and r["ms"]), default=None)
        line = []
        for impl in impls:
            r = cells.get(impl)
            if r is None or r["status"] != "ok":
                if r is not None:
                    notes.setdefault((impl, r["status"], r["reason"]), []).append(r)
                line.append("-" if r is None or r["status"] == "skipped" else "error")
                continue
            text = f"{_num(r['ms'], '.3g')} ({_num(r['tflops'], '.3g')}) {_num(r['rel_error'], '.0e')}" + \
                ("" if r["ok"] else " ! wrong")
            line.append(f"**{text}**" if r["ms"] == best else text)
        out.append(f"| {shape} | {mode} | " + " | ".join(line) + " |")
    out += [""] * bool(notes) + [f"- {impl} {status} ({len(rs)} case{'s' * (len(rs) > 1)}): {reason}"
                                 for (impl, status, reason), rs in notes.items()]
    return "\n".join(out)


def markdown(doc: dict) -> str:
    env = doc["env"] or {}
    out = [f"# GPU check ({doc['mode']}) on {env.get('device', '?')}",
           f"driver {env.get('driver')}, torch {env.get('torch')}, triton {env.get('triton')}, commit "
           f"{env.get('git_commit')} (source {env.get('source_hash')}), {env.get('date')}", "",
           "| step | seconds | status |", "|---|---:|---|"]
    out += [f"| {s['step']} | {s['seconds']} | {s['status']} |" for s in doc["steps"]]
    missing = [name for name, ok in doc["peers"].items() if not ok]
    out += ["", f"peers missing: {', '.join(missing) or 'none'}"]
    if doc["d20_step"]:
        d = doc["d20_step"]
        out += ["", f"## d{d['depth']} training step, batch {d['batch']}", "",
                "| kernels | tok/s | step ms | MFU (H100 peak) | peak GB | loss | first step s |",
                "|---|---:|---:|---:|---:|---:|---:|"]
        for label, r in (("ours (auto)", d["ours"]), (NANOCHAT, d["torch_only"])):
            if r and r["status"] == "ok":
                out.append(f"| {label} | {_num(r['tokens_per_s'])} | {r['step_ms']:.1f} | {_pct(r['mfu_h100'])} | "
                           f"{_num(r['peak_mem_gb'], '.1f')} | {r['loss']:.4f} | {r['first_step_s']:.0f} |")
            elif r:
                out.append(f"| {label} | {r['status']}: {r['reason']} |")
        out.append(f"\nours / torch only: {_num(d['speedup'], '.3f')}x")
    if doc["profile"]:
        from bench.step_profile import table
        out += ["", "## Profile of our step", "", "```", table(doc["profile"]), "```"]
    if doc["fp8"]:
        f = doc["fp8"]
        out += ["", "## FP8", ""]
        for recipe in ("tensorwise", "rowwise"):
            r = f[recipe]
            if r and r["status"] == "ok":
                out.append(f"- {recipe}: {_num(r['tokens_per_s'])} tok/s, MFU {_pct(r['mfu_h100'])}, "
                           f"{_num(f[f'speedup_{recipe}'], '.3f')}x bf16, loss {r['loss']:.4f}")
            elif r:
                out.append(f"- {recipe}: {r['status']}: {r['reason']}")
    if doc["kernels_ab"]:
        out += ["", f"## Kernels at {'the d20 shapes' if doc['mode'] == 'gpu' else 'tiny CPU shapes'}", "",
                "Median ms (TFLOP/s) and the relative error against the fp32 reference; bold: the fastest within "
                "its error tolerance; '! wrong': above it."]
        for op, rows in doc["kernels_ab"].items():
            out += ["", f"### {op}", "", ab_table(rows)]
        c = doc["bf16_correctness"]
        out.append(f"\nevery kernel within its tolerance of the fp32 reference: {c['all_ok']}")
    a = doc["autotune"]
    out += ["", f"autotune: first d20 step {_num(a['d20_first_step_s'], '.0f')} s (ours), "
            f"{_num(a['torch_only_first_step_s'], '.0f')} s (torch only); committed table used: "
            f"{a['committed_table_used']}; table written: {', '.join(a['table_written']) or 'none'}"]
    out += [f"- first call (compile, autotune) of {case}: {seconds:.1f} s" for case, seconds in
            a["ab_first_call_s"].items()]
    return "\n".join(out) + "\n"


def main(argv=None) -> None:
    p = Parser(prog="bench.check", description="Assemble bench/gpu_check.sh's results into check.json and check.md.")
    p.add_argument("folder")
    p.add_argument("--mode", choices=["gpu", "cpu"], default="gpu")
    p.add_argument("--print", action="store_true", help="print check.md")
    args = p.parse_args(argv)
    folder = Path(args.folder)
    if not folder.is_dir():
        raise UserError(f"no results folder {folder}")
    doc = assemble(folder, args.mode)
    for name, text in (("check.json", json.dumps(doc, indent=1)), ("check.md", markdown(doc))):
        with atomic_write(folder / name, "w") as f:  # whole or old: gpu_check.sh copies the folder meanwhile
            f.write(text)
    if args.print:
        print(markdown(doc))


if __name__ == "__main__":
    run_cli(main)
