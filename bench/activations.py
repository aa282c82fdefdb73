"""Activation memory of the compiled training step, predicted without a GPU.

    python -m bench.activations --depth 20                       # bytes kept per token, by layer and tensor
    python -m bench.activations --depth 20 --no-recompute-mlp    # the same with relu² kept, not recomputed
    python -m bench.activations --depth 20 --checkpoint-blocks   # each layer checkpointed (only its input kept)

What the backward needs is decided by AOTAutograd's min-cut partitioner, the one inductor uses: this traces
the model's training forward through torch.compile with that partitioner and a backend that only reads the
forward graph's saved outputs (nothing is run). The trace is on the CPU under bf16 autocast, through the
kernels' custom ops (bf16 attention in), so what it counts is what a compiled CUDA step keeps; the one
difference is the loss's input h, kept in fp32 here and in bf16 on CUDA (once per model, not per layer).
Per-layer bytes come from the difference between a 6-layer and a 4-layer model of the same width, so the
once-per-model tensors (embedding, loss) drop out: two layers apart, as value embeddings come every other layer, and
not 4 and 2 layers, as a 2-layer model's backout reads its last layer (checkpointed, it keeps one residual less).

How the resulting estimate compares with peaks measured on a GPU is in docs/gpu.md.
"""
import contextlib
import json
import os

import torch

from kernels import dispatch
from model.config import config_from_depth
from train.errors import Parser, run_cli


@contextlib.contextmanager
def interpreter_on():
    """TRITON_INTERPRET=1 within the block (our kernels then accept CPU tensors), as it was afterwards."""
    before = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TRITON_INTERPRET")
        else:
            os.environ["TRITON_INTERPRET"] = before


class _Traced(Exception):
    """Raised by the capturing backend once the forward graph is read: nothing needs to run."""


def saved_bytes(depth: int, layers: int, seq_len: int = 256, recompute_mlp: bool = True,
                checkpoint_blocks: bool = False) -> tuple[int, list]:
    """Bytes the forward keeps for the backward per token (weights excluded), and the saved tensors."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    from train.builder import build_model

    cfg = config_from_depth(depth, max_seq_len=seq_len)
    cfg.n_layer = layers
    model = build_model(cfg, "cpu", recompute_mlp=recompute_mlp)
    model.checkpoint_blocks = checkpoint_blocks
    B, T = 1, seq_len
    saved: list = []

    def read_forward(gm, example_inputs):
        placeholders = {n for n in gm.graph.nodes if n.op == "placeholder"}
        outputs = next(n for n in gm.graph.nodes if n.op == "output").args[0]
        for node in outputs[1:]:  # outputs[0] is the loss; the rest is kept for the backward
            val = getattr(node, "meta", {}).get("val")
            if not isinstance(val, torch.Tensor) or node in placeholders:
                continue  # parameters and inputs are not activations
            if val.dim() < 2 or val.shape[0] * (val.shape[1] if val.shape[0] == B else 1) != B * T:
                continue  # bf16 weight copies made by autocast: per step, not per token
            saved.append((val.numel() * val.element_size() // (B * T), tuple(val.shape), str(val.dtype), node.name))
        raise _Traced

    backend = aot_autograd(fw_compiler=read_forward, bw_compiler=lambda gm, _: gm,
                           partition_fn=min_cut_rematerialization_partition)
    compiled = torch.compile(model, backend=backend, dynamic=False, fullgraph=True)
    idx = torch.randint(0, cfg.vocab_size, (B, T))
    # The CUDA path of the kernels: their custom ops with bf16 inputs (only their fake versions are traced);
    # the interpreter switch only lets the CPU tensors through the kernels' device checks.
    with dispatch.forced(attention="triton", cross_entropy="triton"), interpreter_on():
        try:
            with torch.autocast("cpu", torch.bfloat16):
                compiled(idx, idx)
        except Exception as e:  # dynamo wraps what the backend raises
            if not isinstance(e, _Traced) and not isinstance(e.__cause__, _Traced) and "_Traced" not in str(e):
                raise
        finally:
            torch._dynamo.reset()
    return sum(row[0] for row in saved), saved


def per_layer(depth: int, seq_len: int = 256, recompute_mlp: bool = True, checkpoint_blocks: bool = False) -> dict:
    """Bytes kept per token: per layer (6-layer minus 4-layer trace, halved) and once per model."""
    six, _ = saved_bytes(depth, 6, seq_len, recompute_mlp, checkpoint_blocks)
    four, rows = saved_bytes(depth, 4, seq_len, recompute_mlp, checkpoint_blocks)
    layer = (six - four) / 2
    return {"depth": depth, "n_embd": config_from_depth(depth).n_embd, "recompute_mlp": recompute_mlp,
            "checkpoint_blocks": checkpoint_blocks,
            "bytes_per_token_per_layer": layer, "bytes_per_channel_per_layer": layer / config_from_depth(depth).n_embd,
            "bytes_per_token_once": four - 4 * layer, "rows_4_layers": rows}


def main(argv=None) -> None:
    p = Parser(prog="bench.activations", description=__doc__.splitlines()[0])
    p.add_argument("--depth", type=int, default=20)
    p.add_argument("--seq-len", type=int, default=256, help="traced length (per-token bytes do not depend on it)")
    p.add_argument("--device-batch-size", type=int, default=32, help="for the predicted total")
    p.add_argument("--max-seq-len", type=int, default=2048, help="for the predicted total")
    p.add_argument("--recompute-mlp", action=__import__("argparse").BooleanOptionalAction, default=True)
    p.add_argument("--checkpoint-blocks", action="store_true", help="each layer checkpointed (GPT.checkpoint_blocks)")
    p.add_argument("--json", action="store_true", help="print one JSON line")
    args = p.parse_args(argv)
    r = per_layer(args.depth, args.seq_len, args.recompute_mlp, args.checkpoint_blocks)
    tokens = args.device_batch_size * args.max_seq_len
    total = tokens * (r["bytes_per_token_per_layer"] * args.depth + r["bytes_per_token_once"])
    r["predicted_activation_gib"] = total / 2**30
    if args.json:
        print(json.dumps({k: v for k, v in r.items() if k != "rows_4_layers"}))
        return
    print(f"d{args.depth} (width {r['n_embd']}), relu² {'recomputed' if args.recompute_mlp else 'kept'}: "
          f"{r['bytes_per_channel_per_layer']:.2f} B per channel per layer per token, "
          f"{r['bytes_per_token_once'] / r['n_embd']:.2f} B per channel once")
    print(f"predicted activations at device batch {args.device_batch_size} x {args.max_seq_len}: "
          f"{r['predicted_activation_gib']:.1f} GiB (plus weights, grads, optimizer state"
          f"{'; and one layer recomputed in the backward at a time' if args.checkpoint_blocks else ''})")
    print("tensors kept by the 4-layer trace (bytes per token, shape, dtype, node):")
    for nbytes, shape, dtype, name in sorted(r["rows_4_layers"], reverse=True):
        print(f"  {nbytes:8d}  {str(shape):24s} {dtype:16s} {name}")


if __name__ == "__main__":
    run_cli(main)
