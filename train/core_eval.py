"""The DCLM CORE metric (https://arxiv.org/abs/2406.11794), computed the way nanochat's core_eval does.

    python -m train.core_eval --model-tag d20 [--step N] [--max-per-task N]
    torchrun --nproc_per_node=8 -m train.core_eval --model-tag d20

22 in-context tasks of three kinds; every example is one forward pass over all of its options:
    multiple_choice    one context, several continuations: the continuation with the lowest mean loss wins
    schema             several contexts, one continuation: the context under which it has the lowest mean loss wins
    language_modeling  one context, one continuation: right iff greedy decoding reproduces every continuation token
Each task's accuracy is centred on its random baseline b, (acc - b) / (1 - b), so that chance scores 0
and perfect scores 1; CORE is the mean over the tasks (GPT-2: 0.2565).

The eval bundle (core.yaml, eval_meta_data.csv, eval_data/*.jsonl) is downloaded once, from
EVAL_BUNDLE_URL or $NANOCHAT_EVAL_BUNDLE_URL, to $NANOCHAT_BASE_DIR/eval_bundle/.
"""
import csv
import json
import os
import random
import tempfile
import zipfile
from contextlib import nullcontext
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.fsdp import FSDPModule
from tqdm import tqdm

from train.download import DownloadError, fetch_with_retries
from train.errors import Parser, UserError, run_cli
from train.paths import eval_bundle_dir

EVAL_BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
TASK_TYPES = ("multiple_choice", "schema", "language_modeling")

# -----------------------------------------------------------------------------
# The eval bundle


def bundle_url() -> str:
    return os.environ.get("NANOCHAT_EVAL_BUNDLE_URL") or EVAL_BUNDLE_URL


def is_bundle(folder: Path) -> bool:
    return (folder / "core.yaml").is_file() and (folder / "eval_meta_data.csv").is_file()


def download_bundle(url: str, folder: Path, retries: int = 3, backoff: float = 2.0, timeout: float = 30.0) -> None:
    """Fetch the zip to a temporary file, extract it to a temporary folder, then rename that folder into
    place: an interrupted download or extraction never leaves a half bundle at `folder`."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    how = (f"put the contents of eval_bundle.zip (core.yaml, eval_meta_data.csv, eval_data/) in {folder}, "
           "or set NANOCHAT_EVAL_BUNDLE_URL to a copy you can reach")
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=".eval_bundle-") as tmp:
        zip_path = Path(tmp) / "eval_bundle.zip"
        try:  # the zip's central directory sits at its end: a cut transfer fails the check
            fetch_with_retries(url, zip_path, zipfile.is_zipfile, "zip archive", retries, backoff, timeout)
        except DownloadError as e:
            raise UserError(f"cannot download the CORE eval bundle: {e}; {how}") from None
        extracted = Path(tmp) / "extracted"
        with zipfile.ZipFile(zip_path) as z:
            z.extractall(extracted)
        # the official zip holds one top-level folder eval_bundle/; accept the files at the top level too
        root = next((d for d in (extracted, extracted / "eval_bundle") if is_bundle(d)), None)
        if root is None:
            raise UserError(f"{url} is not a CORE eval bundle (no core.yaml and eval_meta_data.csv in it); {how}")
        if not folder.exists():  # another process may have finished first
            os.replace(root, folder)


def ensure_eval_bundle(retries: int = 3, backoff: float = 2.0) -> Path:
    """The bundle folder, downloaded on first use. Under torchrun rank 0 downloads while the others wait."""
    folder = eval_bundle_dir()
    if folder.exists() and not is_bundle(folder):  # placed by hand, or by someone else: never overwritten
        raise UserError(f"{folder} is not a complete eval bundle (it needs core.yaml, eval_meta_data.csv and "
                        "eval_data/): complete it, or remove it to download the bundle again")
    error = None
    if not is_bundle(folder) and (not dist.is_initialized() or dist.get_rank() == 0):
        try:
            download_bundle(bundle_url(), folder, retries=retries, backoff=backoff)
        except UserError as e:
            error = e
    if dist.is_initialized():
        dist.barrier()  # every rank raises below, none is left waiting for rank 0
    if not is_bundle(folder):
        raise error or UserError(f"no CORE eval bundle in {folder} (rank 0 could not download it)")
    return folder


# -----------------------------------------------------------------------------
# Tasks


class Task(NamedTuple):
    label: str
    kind: str  # one of TASK_TYPES
    num_fewshot: int
    delimiter: str  # between context and continuation
    baseline: float  # accuracy of random guessing, in [0, 1)
    examples: list  # dicts, fields per kind (see render_prompts)


@lru_cache(maxsize=4)  # training evaluates CORE many times: read and parse the files once
def load_tasks(bundle_dir: Path, max_per_task: int = -1) -> list[Task]:
    import yaml

    try:
        specs = yaml.safe_load((bundle_dir / "core.yaml").read_text(encoding="utf-8"))["icl_tasks"]
        with open(bundle_dir / "eval_meta_data.csv", encoding="utf-8", newline="") as f:
            baselines = {row["Eval Task"]: row["Random baseline"] for row in csv.DictReader(f)}  # percent
    except (OSError, ValueError, KeyError, TypeError, yaml.YAMLError) as e:
        raise UserError(f"the eval bundle in {bundle_dir} is unreadable ({type(e).__name__})") from None
    if not isinstance(specs, list) or not all(isinstance(spec, dict) for spec in specs) or not specs:
        raise UserError(f"{bundle_dir / 'core.yaml'}: icl_tasks is not a list of tasks")
    tasks = []
    for spec in specs:
        label, kind, uri = spec.get("label"), spec.get("icl_task_type"), spec.get("dataset_uri")
        if kind not in TASK_TYPES or not label or not uri:
            raise UserError(f"{bundle_dir / 'core.yaml'}: task {label!r} needs a label, a dataset_uri and an "
                            f"icl_task_type in {TASK_TYPES} (got {kind!r})")
        try:  # the CSV lists more tasks than core.yaml: only the baselines of the tasks we run must parse
            baseline = float(baselines[label]) / 100
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{bundle_dir / 'eval_meta_data.csv'}: no random baseline for task {label}") from None
        path = bundle_dir / "eval_data" / uri
        try:  # split on "\n" only: splitlines() would also cut at U+2028 and friends inside the JSON strings
            examples = [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]
        except (OSError, ValueError) as e:
            raise UserError(f"{path}: cannot read the task's examples ({type(e).__name__})") from None
        if not examples:
            raise UserError(f"{path}: the task has no examples")
        # the files are often ordered (by source, by answer): shuffle so that a capped run sees a fair sample
        random.Random(1337).shuffle(examples)
        if max_per_task > 0:
            examples = examples[:max_per_task]
        tasks.append(Task(label, kind, spec.get("num_fewshot", [0])[0], spec.get("continuation_delimiter", " "),
                          baseline, examples))
    return tasks


def fewshot_examples(examples: list, idx: int, k: int) -> list:
    """k examples other than examples[idx], the same ones every time for that example."""
    rng = random.Random(1234 + idx)
    others = [i for i in range(len(examples)) if i != idx]
    return [examples[i] for i in rng.sample(others, min(k, len(others)))]


def render_prompts(kind: str, item: dict, delimiter: str, fewshot: list) -> list[str]:
    """The texts the model reads, few-shot examples (with their right answers) first, blank-line separated.

    multiple_choice (query, choices, gold): one prompt per choice.
    schema (context_options, continuation, gold): one prompt per context.
    language_modeling (context, continuation): the prompt without and with the continuation.
    """
    if kind == "multiple_choice":
        shots = "".join(f"{ex['query']}{delimiter}{ex['choices'][ex['gold']]}\n\n" for ex in fewshot)
        return [f"{shots}{item['query']}{delimiter}{choice}" for choice in item["choices"]]
    if kind == "schema":
        shots = "".join(f"{ex['context_options'][ex['gold']]}{delimiter}{ex['continuation']}\n\n" for ex in fewshot)
        return [f"{shots}{context}{delimiter}{item['continuation']}" for context in item["context_options"]]
    # some contexts end in whitespace: trimmed, so that the prompt without the continuation tokenizes
    # as a clean prefix of the prompt with it (a trailing space would merge into the next token)
    shots = "".join(f"{ex['context'].strip()}{delimiter}{ex['continuation']}\n\n" for ex in fewshot)
    prefix = f"{shots}{item['context'].strip()}{delimiter}"
    return [prefix.strip(), prefix + item["continuation"]]


def common_length(seqs: list[list[int]], from_end: bool = False) -> int:
    """Length of the prefix (or suffix) that all the sequences share."""
    n = min(len(s) for s in seqs)
    for i in range(n):
        j = -1 - i if from_end else i
        if any(s[j] != seqs[0][j] for s in seqs):
            return i
    return n


def continuation_spans(kind: str, tokens: list[list[int]]) -> tuple[list[list[int]], list[int], list[int]]:
    """The rows to score and, per row, [start, end) of the continuation tokens whose loss decides."""
    shortest = min(len(t) for t in tokens)
    if kind == "multiple_choice":  # a shared context, then the choices: they start where the rows part
        start = min(common_length(tokens), shortest - 1)  # (every row keeps at least one token to score)
        return tokens, [start] * len(tokens), [len(t) for t in tokens]
    if kind == "schema":  # the contexts differ, the continuation is the shared suffix
        suffix = min(common_length(tokens, from_end=True), shortest - 1)
        return tokens, [len(t) - suffix for t in tokens], [len(t) for t in tokens]
    without, with_ = tokens  # only the prompt with the continuation is run; `without` marks where it starts
    return [with_], [min(common_length(tokens), len(with_) - 1)], [len(with_)]


def positions_limit(model) -> int:
    """The longest row the model can take: its rotary table's length (10x the training context for our GPT);
    rows longer than the training context are fed whole, as nanochat does."""
    return getattr(model, "rotary_seq_len", model.config.sequence_len)


def crop_left(tokens, starts, ends, max_len: int):
    """Rows longer than max_len lose tokens at the start (the oldest few-shot text goes first)."""
    cuts = [max(0, len(t) - max_len) for t in tokens]
    tokens = [t[cut:] for t, cut in zip(tokens, cuts)]
    starts = [max(1, s - cut) for s, cut in zip(starts, cuts)]  # token 0 is never predicted: it cannot be scored
    ends = [e - cut for e, cut in zip(ends, cuts)]
    return tokens, starts, ends


@torch.no_grad()
def score_example(model, tokenizer, task: Task, idx: int, device, autocast=None, crops: list | None = None) -> bool:
    """Whether the model gets example idx right; crops, when given, gets the example's index if a row had to be
    cropped (longer than positions_limit(model))."""
    autocast = nullcontext() if autocast is None else autocast
    item = task.examples[idx]
    prompts = render_prompts(task.kind, item, task.delimiter, fewshot_examples(task.examples, idx, task.num_fewshot))
    rows, starts, ends = continuation_spans(task.kind, tokenizer.encode(prompts, prepend_bos=True))
    limit = positions_limit(model)
    if crops is not None and max(map(len, rows)) > limit:
        crops.append(idx)
    rows, starts, ends = crop_left(rows, starts, ends, limit)
    ids = torch.full((len(rows), max(map(len, rows))), tokenizer.bos_id, dtype=torch.long)  # BOS pads (causal: unseen)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row)
    ids = ids.to(device)
    with autocast:
        logits = model(ids)
    # position t predicts token t + 1: the continuation [s, e) is predicted at [s - 1, e - 1)
    if task.kind == "language_modeling":
        s, e = starts[0], ends[0]
        return bool((logits[0, s - 1:e - 1].argmax(-1) == ids[0, s:e]).all())
    losses = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), ids[:, 1:], reduction="none")
    mean_losses = [losses[i, s - 1:e - 1].mean().item() for i, (s, e) in enumerate(zip(starts, ends))]
    return mean_losses.index(min(mean_losses)) == item["gold"]


def centered(accuracy: float, baseline: float) -> float:
    """0 at chance, 1 at perfect (baseline as a fraction)."""
    return (accuracy - baseline) / (1 - baseline)


@torch.no_grad()
def evaluate_core(model, tokenizer, device, max_per_task: int = 500, autocast=None,
                  bundle_dir: Path | None = None) -> dict:
    """Per-task accuracy and centred accuracy, and their mean: {"results", "centered_results", "core_metric",
    "cropped"}: cropped counts the examples with a row longer than the model can take (cut at its start).

    Under torchrun rank r scores examples r, r + W, ... of every task and the counts are summed. An FSDP2 model
    gathers its weights with every rank at every forward: there each rank runs as many as rank 0, which has the
    most (the extra ones score an example again, uncounted).
    """
    from train.distributed import all_reduce_sum

    tasks = load_tasks(Path(bundle_dir or ensure_eval_bundle()), max_per_task)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    mine = [(t, i) for t, task in enumerate(tasks) for i in range(rank, len(task.examples), world)]
    right, crops = [0] * len(tasks), []
    # a bar on stderr, from rank 0 and only on a terminal (disable=None); leave=False: the results take its place
    for t, i in tqdm(mine, desc="CORE", unit="example", leave=False, disable=None if rank == 0 else True):
        right[t] += score_example(model, tokenizer, tasks[t], i, device, autocast, crops)
    if isinstance(model, FSDPModule):
        most = sum(len(range(0, len(task.examples), world)) for task in tasks)
        t, i = mine[-1] if mine else (0, 0)
        for _ in range(most - len(mine)):
            score_example(model, tokenizer, tasks[t], i, device, autocast)
    correct = torch.tensor(right + [len(crops)], dtype=torch.long, device=device)  # the last: examples cropped
    all_reduce_sum(correct)
    results = {task.label: correct[t].item() / len(task.examples) for t, task in enumerate(tasks)}
    centered_results = {task.label: centered(results[task.label], task.baseline) for task in tasks}
    core = sum(centered_results.values()) / len(centered_results)
    return {"results": results, "centered_results": centered_results, "core_metric": core,
            "cropped": correct[-1].item()}


# -----------------------------------------------------------------------------
# Command line


def main(argv=None) -> None:
    from train import distributed
    from train.builder import find_checkpoint, model_from_checkpoint
    from train.step import autocast_for

    p = Parser(prog="train.core_eval", description="The DCLM CORE score of a pretrained checkpoint.")
    p.add_argument("--model-tag", required=True, help="checkpoint folder under $NANOCHAT_BASE_DIR/base_checkpoints/")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest that verifies)")
    p.add_argument("--max-per-task", type=int, default=-1, help="examples per task; -1 = all (the real CORE)")
    p.add_argument("--device-type", default="", help="cuda, cpu or mps; empty = autodetect")
    args = p.parse_args(argv)

    ckpt_dir, meta, tokenizer = find_checkpoint(args.model_tag, args.step, distributed.print0)
    dist_info = distributed.setup(args.device_type)
    try:
        device = dist_info.device
        bundle = ensure_eval_bundle()  # before the model: a missing bundle fails fast
        model, _ = model_from_checkpoint(ckpt_dir, meta["step"], device)
        out = evaluate_core(model, tokenizer, device, args.max_per_task, autocast_for(device), bundle)
        print0 = distributed.print0
        print0(f"{args.model_tag} step {meta['step']}, {args.max_per_task if args.max_per_task > 0 else 'all'} "
               "examples per task")
        for label, acc in out["results"].items():
            print0(f"{label:<40} accuracy {acc:.4f} | centered {out['centered_results'][label]:+.4f}")
        print0(f"CORE {out['core_metric']:.4f}")
        if out["cropped"]:
            print0(f"note: {out['cropped']} example(s) had a row longer than the model can take "
                   f"({positions_limit(model)} tokens): their oldest few-shot text was cut")
    finally:
        distributed.cleanup()


if __name__ == "__main__":
    run_cli(main)
