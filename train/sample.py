"""Talk to a trained checkpoint: its continuation of a prompt, streamed token by token.

    python -m train.sample --model-tag d4 --prompt "def "
    echo "import os" | python -m train.sample --model-tag d4 --temperature 0      # the prompt from stdin, greedy
    python -m train.sample --model-tag d4 --step 100 --top-k 50 --seed 7 --max-tokens 64 --prompt "class "

The checkpoint is the newest of $NANOCHAT_BASE_DIR/base_checkpoints/<tag>/ that verifies (the rule of
--resume-from-step latest), or --step N. Only the continuation goes to stdout; notes go to stderr.
"""
import math
import os
import sys

import torch

from train import distributed
from train.builder import find_checkpoint, model_from_checkpoint
from train.errors import Parser, UserError, require, run_cli
from train.step import autocast_for


def build_parser() -> Parser:
    p = Parser(prog="train.sample", description="A checkpoint's continuation of a prompt, streamed.")
    p.add_argument("--model-tag", required=True, help="checkpoint folder under $NANOCHAT_BASE_DIR/base_checkpoints/")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest that verifies)")
    p.add_argument("--prompt", default=None, help="the text to continue (default: read from stdin)")
    p.add_argument("--max-tokens", type=int, default=256, help="new tokens at most")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (deterministic)")
    p.add_argument("--top-k", type=int, default=None, help="draw among the k most likely tokens (default: all)")
    p.add_argument("--seed", type=int, default=42, help="the same seed, flags and checkpoint give the same text")
    p.add_argument("--device-type", default="", help="cuda, cpu or mps; empty = autodetect")
    return p


def note(message: str) -> None:
    print(message, file=sys.stderr)  # stdout carries the continuation only


def read_prompt(prompt: str | None) -> str:
    if prompt is not None:
        return prompt
    if sys.stdin.isatty():
        note("type the prompt, then Ctrl-D")
    try:
        return sys.stdin.read()  # as it is: a trailing newline is part of the prompt
    except UnicodeDecodeError as e:
        raise UserError(f"the prompt on stdin is not text in {sys.stdin.encoding}: {e.reason}") from None


def stream_text(ids, decode):
    """The text of the ids as they come: a token that ends inside a character (byte-level BPE) waits for the
    tokens that complete it, so no half character is ever printed as U+FFFD."""
    pending = []
    for i in ids:
        pending.append(i)
        text = decode(pending)
        if not text.endswith("\ufffd"):
            yield text
            pending = []
    if pending:
        yield decode(pending)  # bytes that never became a character: shown as the tokenizer decodes them


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    require(args.step is None or args.step >= 0, f"--step must be a step (>= 0), got {args.step}")
    require(args.max_tokens >= 1, f"--max-tokens must be at least 1, got {args.max_tokens}")
    require(math.isfinite(args.temperature) and args.temperature >= 0,
            f"--temperature must be a finite number >= 0, got {args.temperature}")
    require(args.top_k is None or args.top_k >= 1, f"--top-k must be at least 1, got {args.top_k}")
    require(0 <= args.seed < 2**64, f"--seed must be an integer in [0, 2^64), got {args.seed}")

    # everything that can be checked without the weights first: a bad tag or prompt costs no load
    ckpt_dir, meta, tokenizer = find_checkpoint(args.model_tag, args.step, note)
    context = meta["model_config"]["sequence_len"]
    prompt = read_prompt(args.prompt)
    ids = tokenizer.encode(prompt, prepend_bos=True)  # as the in-run sampler does: BOS starts every document
    require(len(ids) <= context, f"the prompt is {len(ids)} tokens (BOS included), longer than the model's "
                                 f"context of {context}")

    device = distributed.setup(args.device_type).device
    try:
        model, _ = model_from_checkpoint(ckpt_dir, meta["step"], device)
        # past the training context the model runs on (its rotary table is longer), never past its positions
        max_tokens = min(args.max_tokens, model.rotary_seq_len - len(ids))
        if max_tokens < args.max_tokens:
            note(f"--max-tokens {args.max_tokens}: stopping after {max_tokens}, where the model's positions end")
        torch.manual_seed(args.seed)
        with autocast_for(device):  # bf16 on CUDA, as CORE and the in-run sampler run
            new = model.stream(ids, max_tokens, args.temperature, args.top_k)
            try:
                for text in stream_text(new, tokenizer.decode):
                    print(text, end="", flush=True)
                print(flush=True)
            except BrokenPipeError:  # the reader left (`| head`): stop quietly, as Unix tools do
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # exiting flushes nothing more
                raise SystemExit(141) from None  # 128 + SIGPIPE, as a shell reports it
    finally:
        distributed.cleanup()


if __name__ == "__main__":
    run_cli(main)
