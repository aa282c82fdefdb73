"""train.core_eval: the bundle download, prompt rendering, scoring against models whose answers we know,
the CORE arithmetic, 2 gloo ranks, a tiny real GPT, the CLI and train.pretrain with --core-metric-every."""
import datetime
import io
import json
import os
import random
import re
import socket
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp

from model.config import GPTConfig
from model.gpt import GPT
from train import checkpoint, core_eval, paths
from train.core_eval import (continuation_spans, crop_left, evaluate_core, fewshot_examples, load_tasks,
                             render_prompts)
from train.errors import UserError
from train.fsdp import shard_model
from train.tokenizer import make_tokenizer

REPO = Path(__file__).resolve().parents[1]


def make_test_tokenizer():
    """Bytes plus a few merges, so that " cat" and " dog" are single tokens (a continuation that is not
    one token per character); <|bos|> is 262."""
    ranks = {bytes([i]): i for i in range(256)}
    for merge in (b" c", b"at", b" cat", b" d", b"og", b" dog"):
        ranks[merge] = len(ranks)
    return make_tokenizer(ranks)


TOK = make_test_tokenizer()

# Three tasks, one of each kind; sizes 4, 4 and 5 (5 does not split evenly over 2 ranks).
MC = [{"query": f"Which animal {verb}?", "choices": ["cat", "dog", "cow", "duck"], "gold": gold}
      for gold, verb in enumerate(["purrs", "barks", "moos", "quacks"])]
SCHEMA = [{"context_options": ["The cat", "The dog"], "continuation": "purrs.", "gold": 0},
          {"context_options": ["My cat", "My dog"], "continuation": "barks.", "gold": 1},
          {"context_options": ["A cat", "A dog"], "continuation": "meows.", "gold": 0},
          {"context_options": ["Her cat", "Her dog"], "continuation": "fetches.", "gold": 1}]
LM = [{"context": "One plus one is", "continuation": "two"}, {"context": "Two plus two is ", "continuation": "four"},
      {"context": "The sky is", "continuation": "blue"}, {"context": "Grass is", "continuation": "green"},
      {"context": "Snow\u2028is", "continuation": "white"}]  # a raw U+2028 in a JSONL line is no line break
BASELINES = {"mc": 25.0, "schema": 50.0, "lm": 0.0}  # percent, as in eval_meta_data.csv


def make_bundle(folder: Path, fewshot=(0, 0, 0), lm=LM) -> Path:
    (folder / "eval_data" / "sub").mkdir(parents=True)
    tasks = [("mc", "multiple_choice", "sub/mc.jsonl", MC), ("schema", "schema", "schema.jsonl", SCHEMA),
             ("lm", "language_modeling", "lm.jsonl", lm)]
    yaml_lines = ["icl_tasks:"]
    for (label, kind, uri, rows), k in zip(tasks, fewshot):
        yaml_lines += [f"- label: {label}", f"  dataset_uri: {uri}", f"  num_fewshot: [{k}]",
                       f"  icl_task_type: {kind}"]
        jsonl = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        (folder / "eval_data" / uri).write_text(jsonl, encoding="utf-8")
    yaml_lines.append('  continuation_delimiter: " "')  # the LM task says it explicitly, the others default
    (folder / "core.yaml").write_text("\n".join(yaml_lines) + "\n")
    (folder / "eval_meta_data.csv").write_text("Eval Task,Task Category,Random baseline,Description\n" + "".join(
        f"{label},cat,{b},\"a, description\"\n" for label, b in BASELINES.items()))
    return folder


def zip_bundle(bundle: Path, path: Path, top="eval_bundle/") -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for f in sorted(bundle.rglob("*")):
            if f.is_file():
                z.write(f, top + f.relative_to(bundle).as_posix())
    return path


class Oracle(torch.nn.Module):
    """A fake model that knows some texts: wherever a row has followed one of them token for token so far,
    it predicts that text's next token with near certainty; elsewhere all tokens are equally likely."""

    def __init__(self, texts, sequence_len=512):
        super().__init__()
        self.config = SimpleNamespace(sequence_len=sequence_len)
        self.next = {}
        for text in texts:
            ids = TOK.encode(text, prepend_bos=True)
            for t in range(len(ids) - 1):
                self.next[tuple(ids[:t + 1])] = ids[t + 1]

    def forward(self, idx):
        B, T = idx.shape
        logits = torch.zeros(B, T, TOK.vocab_size)
        for b in range(B):
            row = idx[b].tolist()
            for t in range(T):
                if (nxt := self.next.get(tuple(row[:t + 1]))) is not None:
                    logits[b, t, nxt] = 30.0
        return logits


def answer_texts(right_mc, right_schema, right_lm):
    """The full zero-shot prompt of each example: the right answer's for the indices given, a wrong one's else."""
    texts = [f"{ex['query']} {ex['choices'][ex['gold'] if i in right_mc else (ex['gold'] + 1) % 4]}"
             for i, ex in enumerate(MC)]
    texts += [f"{ex['context_options'][ex['gold'] if i in right_schema else 1 - ex['gold']]} {ex['continuation']}"
              for i, ex in enumerate(SCHEMA)]
    texts += [f"{ex['context'].strip()} {ex['continuation'] if i in right_lm else 'nothing'}"
              for i, ex in enumerate(LM)]
    return texts


@pytest.fixture
def bundle(tmp_path):
    return make_bundle(tmp_path / "bundle")


# -----------------------------------------------------------------------------
# Prompts and spans


def spans(kind, prompts):
    rows, starts, ends = continuation_spans(kind, TOK.encode(prompts, prepend_bos=True))
    return [TOK.decode(r[s:e]) for r, s, e in zip(rows, starts, ends)]


def test_multiple_choice_prompts_and_spans():
    shot = {"query": "A pet that purrs:", "choices": ["cat", "dog"], "gold": 0}
    item = {"query": "A pet that barks:", "choices": ["cat", "dog"], "gold": 1}
    prompts = render_prompts("multiple_choice", item, " ", [shot])
    assert prompts == ["A pet that purrs: cat\n\nA pet that barks: cat",
                       "A pet that purrs: cat\n\nA pet that barks: dog"]
    assert spans("multiple_choice", prompts) == [" cat", " dog"]  # the delimiter merged into the answer token
    prompts = render_prompts("multiple_choice", {"query": "2+2=", "choices": ["4", "22"], "gold": 0}, "", [])
    assert prompts == ["2+2=4", "2+2=22"] and spans("multiple_choice", prompts) == ["4", "22"]


def test_schema_prompts_and_spans():
    shot = {"context_options": ["The cat", "The dog"], "continuation": "barks.", "gold": 1}
    item = {"context_options": ["My cat", "My dog"], "continuation": "purrs.", "gold": 0}
    prompts = render_prompts("schema", item, " ", [shot])
    assert prompts == ["The dog barks.\n\nMy cat purrs.", "The dog barks.\n\nMy dog purrs."]
    assert spans("schema", prompts) == [" purrs.", " purrs."]


def test_language_modeling_prompts_and_spans():
    """Contexts are trimmed, and the prompt without the continuation loses the trailing delimiter."""
    shots = [{"context": " Roses are ", "continuation": "red"}, {"context": "Violets are", "continuation": "blue"}]
    item = {"context": "The sky is  ", "continuation": "grey"}
    without, with_ = render_prompts("language_modeling", item, " ", shots)
    assert without == "Roses are red\n\nViolets are blue\n\nThe sky is"
    assert with_ == "Roses are red\n\nViolets are blue\n\nThe sky is grey"
    assert spans("language_modeling", [without, with_]) == [" grey"]


def test_fewshot_examples_exclude_the_example_and_are_fixed_per_example():
    examples = list(range(10))
    for idx in range(10):
        shots = fewshot_examples(examples, idx, 3)
        assert len(set(shots)) == 3 and idx not in shots and shots == fewshot_examples(examples, idx, 3)
    assert sorted(fewshot_examples(examples[:3], 0, 5)) == [1, 2]  # at most the other examples
    assert len({tuple(fewshot_examples(examples, i, 3)) for i in range(10)}) > 1  # not the same shots for all


def test_crop_left_keeps_the_end_and_moves_the_spans():
    tokens, starts, ends = crop_left([list(range(10)), list(range(4))], [8, 1], [10, 4], max_len=5)
    assert tokens == [[5, 6, 7, 8, 9], [0, 1, 2, 3]] and starts == [3, 1] and ends == [5, 4]
    # a continuation longer than the context keeps all but its first token (token 0 has no prediction)
    assert crop_left([list(range(10))], [2], [10], max_len=4) == ([[6, 7, 8, 9]], [1], [4])


# -----------------------------------------------------------------------------
# Scoring and the CORE arithmetic


def test_load_tasks_reads_the_bundle_and_caps_a_fixed_shuffle(bundle):
    tasks = load_tasks(bundle)
    assert [(t.label, t.kind, t.num_fewshot, t.delimiter, t.baseline) for t in tasks] == [
        ("mc", "multiple_choice", 0, " ", 0.25), ("schema", "schema", 0, " ", 0.5),
        ("lm", "language_modeling", 0, " ", 0.0)]
    assert sorted(tasks[2].examples, key=LM.index) == LM
    capped = load_tasks(bundle, max_per_task=3)[2].examples
    shuffled = list(LM)
    random.Random(1337).shuffle(shuffled)
    assert capped == shuffled[:3] and capped != LM[:3]


def test_an_oracle_scores_one_and_a_wrong_model_scores_zero(bundle):
    oracle = evaluate_core(Oracle(answer_texts(range(4), range(4), range(5))), TOK, "cpu", bundle_dir=bundle)
    assert oracle["results"] == {"mc": 1.0, "schema": 1.0, "lm": 1.0}
    assert oracle["core_metric"] == pytest.approx(1.0)
    wrong = evaluate_core(Oracle(answer_texts([], [], [])), TOK, "cpu", bundle_dir=bundle)
    assert wrong["results"] == {"mc": 0.0, "schema": 0.0, "lm": 0.0}
    # below chance is negative: (0 - 0.25) / 0.75, (0 - 0.5) / 0.5, 0
    assert wrong["centered_results"] == pytest.approx({"mc": -1 / 3, "schema": -1.0, "lm": 0.0})
    assert wrong["core_metric"] == pytest.approx((-1 / 3 - 1.0 + 0.0) / 3)


MIXED = ([0, 1, 2], [1, 3], [0, 4])  # right on 3/4, 2/4 and 2/5 examples
MIXED_RESULTS = {"mc": 0.75, "schema": 0.5, "lm": 0.4}
MIXED_CENTERED = {"mc": (0.75 - 0.25) / 0.75, "schema": 0.0, "lm": 0.4}
MIXED_CORE = (2 / 3 + 0.0 + 0.4) / 3  # = 16/45


def test_accuracy_centering_and_core_on_a_partly_right_model(bundle):
    out = evaluate_core(Oracle(answer_texts(*MIXED)), TOK, "cpu", bundle_dir=bundle)
    assert out["results"] == pytest.approx(MIXED_RESULTS)
    assert out["centered_results"] == pytest.approx(MIXED_CENTERED)
    assert out["core_metric"] == pytest.approx(16 / 45)
    # a cap: only the first 2 of the shuffled examples count
    capped = evaluate_core(Oracle(answer_texts(*MIXED)), TOK, "cpu", max_per_task=2, bundle_dir=bundle)
    expected = {}
    for label, rows, right in (("mc", MC, MIXED[0]), ("schema", SCHEMA, MIXED[1]), ("lm", LM, MIXED[2])):
        order = list(range(len(rows)))
        random.Random(1337).shuffle(order)
        expected[label] = sum(i in right for i in order[:2]) / 2
    assert capped["results"] == pytest.approx(expected)


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_is_a_bar_on_a_terminal_stderr_from_rank_0_only(bundle, monkeypatch, capsys):
    model = Oracle(answer_texts(*MIXED))
    evaluate_core(model, TOK, "cpu", bundle_dir=bundle)
    assert capsys.readouterr() == ("", "")  # not a terminal (a log file, a test): no bar anywhere
    monkeypatch.setattr(sys, "stderr", terminal := Terminal())
    assert evaluate_core(model, TOK, "cpu", bundle_dir=bundle)["core_metric"] == pytest.approx(MIXED_CORE)
    assert "CORE" in terminal.getvalue() and "example" in terminal.getvalue() and capsys.readouterr().out == ""
    # rank 1 of 2 (the collective faked): quiet even on a terminal
    for name, value in (("is_initialized", True), ("get_rank", 1), ("get_world_size", 2), ("all_reduce", None)):
        monkeypatch.setattr(torch.distributed, name, lambda *args, value=value, **kwargs: value)
    monkeypatch.setattr(sys, "stderr", terminal := Terminal())
    evaluate_core(model, TOK, "cpu", bundle_dir=bundle)
    assert terminal.getvalue() == "" and capsys.readouterr() == ("", "")


def test_prompts_longer_than_the_training_context_are_scored_whole(tmp_path):
    """As nanochat: a row longer than the training context (24 here) reaches the model whole. A model that
    knows the right prompts only from their first token gets every answer right only then."""
    bundle = make_bundle(tmp_path / "fewshot", fewshot=(3, 3, 3))
    tasks = load_tasks(bundle)
    right = []
    for t in tasks:
        for i, ex in enumerate(t.examples):
            prompts = render_prompts(t.kind, ex, t.delimiter, fewshot_examples(t.examples, i, t.num_fewshot))
            right.append(prompts[1] if t.kind == "language_modeling" else prompts[ex["gold"]])
    model = Oracle(right, sequence_len=24)
    model.rotary_seq_len = 240  # what the model can take: 10x its training context, as our GPT
    seen = []
    forward = model.forward
    model.forward = lambda idx: seen.append(idx.size(1)) or forward(idx)
    out = evaluate_core(model, TOK, "cpu", bundle_dir=bundle)
    assert max(seen) > 24 and out["cropped"] == 0
    assert out["results"] == {"mc": 1.0, "schema": 1.0, "lm": 1.0}


def test_truncation_to_what_the_model_can_take_keeps_the_answers_scorable(tmp_path):
    """Rows longer than the model can take at all (24 positions here) lose their start; the answers stay."""
    bundle = make_bundle(tmp_path / "fewshot", fewshot=(3, 3, 3))
    tasks = load_tasks(bundle)
    longest = max(len(TOK.encode(p, prepend_bos=True)) for t in tasks for i, ex in enumerate(t.examples)
                  for p in render_prompts(t.kind, ex, t.delimiter, fewshot_examples(t.examples, i, t.num_fewshot)))
    assert longest > 24

    class LocalOracle(torch.nn.Module):
        """Knows the zero-shot answer texts by their last (up to) 12 tokens, wherever in the row they are."""
        config = SimpleNamespace(sequence_len=24)
        rotary_seq_len = 24  # positions it can take

        def __init__(self, texts):
            super().__init__()
            self.next = {}
            for ids in map(TOK.encode, texts):
                for t in range(len(ids) - 1):
                    self.next[tuple(ids[max(0, t - 11):t + 1])] = ids[t + 1]

        def forward(self, idx):
            B, T = idx.shape
            assert T <= 24, f"a row of {T} tokens reached a model with a 24-token context"
            logits = torch.zeros(B, T, TOK.vocab_size)
            for b in range(B):
                row = idx[b].tolist()
                for t in range(T):
                    for n in range(min(12, t + 1), 0, -1):  # the longest match decides
                        if (nxt := self.next.get(tuple(row[t + 1 - n:t + 1]))) is not None:
                            logits[b, t, nxt] = 30.0
                            break
            return logits

    model = LocalOracle(answer_texts(range(4), range(4), range(5)))
    out = evaluate_core(model, TOK, "cpu", bundle_dir=bundle)
    assert out["results"] == {"mc": 1.0, "schema": 1.0, "lm": 1.0}
    assert out["cropped"] > 0  # and said so


def tiny_gpt() -> GPT:
    """A tiny GPT with non-trivial logits (lm_head starts near zero), the same on every call."""
    config = GPTConfig(sequence_len=32, vocab_size=TOK.vocab_size, n_layer=2, n_head=2, n_kv_head=2, n_embd=32,
                       window_pattern="SL")
    torch.manual_seed(0)
    model = GPT(config)
    model.init_weights()
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.5)
    return model.eval()


def _dist_worker(rank, world, init_file, bundle, queue):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                                         timeout=datetime.timedelta(seconds=60))  # a mismatched forward: fails
    try:
        out = evaluate_core(Oracle(answer_texts(*MIXED)), TOK, "cpu", bundle_dir=Path(bundle))
        sharded = shard_model(tiny_gpt(), torch.device("cpu"))  # FSDP2: every forward a collective
        queue.put((rank, out, evaluate_core(sharded, TOK, "cpu", bundle_dir=Path(bundle))))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_split_the_examples_and_sum_the_counts(bundle):
    """Also with an FSDP2 model, whose ranks run as many forwards each (the bundle's 13 examples split 7 / 6)."""
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_dist_worker, args=(2, os.path.join(tmp, "store"), str(bundle), queue), nprocs=2, join=True)
    outs = {rank: (out, sharded) for rank, out, sharded in (queue.get() for _ in range(2))}
    alone = evaluate_core(tiny_gpt(), TOK, "cpu", bundle_dir=bundle)
    for out, sharded in outs.values():
        assert out["results"] == pytest.approx(MIXED_RESULTS) and out["core_metric"] == pytest.approx(MIXED_CORE)
        assert sharded == alone


def test_a_tiny_gpt_runs_end_to_end_with_fewshot_and_truncation(tmp_path):
    bundle = make_bundle(tmp_path / "fewshot", fewshot=(1, 2, 3))
    model = tiny_gpt()
    out = evaluate_core(model, TOK, "cpu", bundle_dir=bundle)
    assert set(out["results"]) == {"mc", "schema", "lm"}
    assert all(0 <= a <= 1 for a in out["results"].values())
    assert all(torch.isfinite(torch.tensor(c)) for c in out["centered_results"].values())
    assert -1 <= out["core_metric"] <= 1
    assert evaluate_core(model, TOK, "cpu", bundle_dir=bundle) == out  # deterministic


def test_a_broken_bundle_is_one_clear_error(tmp_path):
    bundle = make_bundle(tmp_path / "broken")
    (bundle / "eval_meta_data.csv").write_text("Eval Task,Random baseline\nmc,25\n")
    with pytest.raises(UserError, match="no random baseline for task schema"):
        load_tasks(bundle)
    (bundle / "core.yaml").write_text("icl_tasks: [{label: mc, dataset_uri: x.jsonl, icl_task_type: qa}]\n")
    with pytest.raises(UserError, match="icl_task_type"):
        load_tasks(bundle)


# -----------------------------------------------------------------------------
# Download


@pytest.fixture
def server(tmp_path, monkeypatch, serve_folder):
    """A local HTTP server with eval_bundle.zip (top folder eval_bundle/, as the official one),
    flat.zip (the files at the top) and junk.zip (not a zip); NANOCHAT_BASE_DIR and the bundle URL point at tmp."""
    bundle = make_bundle(tmp_path / "src")
    served = tmp_path / "served"
    served.mkdir()
    zip_bundle(bundle, served / "eval_bundle.zip")
    zip_bundle(bundle, served / "flat.zip", top="")
    (served / "junk.zip").write_bytes(b"this is not a zip file" * 100)
    srv = serve_folder(served)
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    monkeypatch.setenv("NANOCHAT_EVAL_BUNDLE_URL", f"{srv.url}/eval_bundle.zip")
    return srv


def leftovers(base: Path):
    return sorted(p.name for p in base.iterdir()) if base.exists() else []


@pytest.mark.parametrize("name", ["eval_bundle.zip", "flat.zip"])
def test_the_bundle_is_downloaded_once_then_read_from_the_cache(server, tmp_path, monkeypatch, name):
    monkeypatch.setenv("NANOCHAT_EVAL_BUNDLE_URL", f"{server.url}/{name}")
    folder = core_eval.ensure_eval_bundle(backoff=0)
    assert folder == tmp_path / "base" / "eval_bundle" and server.requests == [name]
    served = tmp_path / "src" / "eval_data" / "sub" / "mc.jsonl"
    assert (folder / "eval_data" / "sub" / "mc.jsonl").read_text() == served.read_text()
    assert leftovers(tmp_path / "base") == ["eval_bundle"]  # no temporary file or folder left behind
    assert core_eval.ensure_eval_bundle(backoff=0) == folder and server.requests == [name]
    out = evaluate_core(Oracle(answer_texts(*MIXED)), TOK, "cpu")  # bundle_dir defaults to the cached one
    assert out["core_metric"] == pytest.approx(MIXED_CORE)


def test_server_errors_are_retried(server, tmp_path):
    server.fail = {"eval_bundle.zip": 2}
    core_eval.ensure_eval_bundle(retries=3, backoff=0)
    assert server.requests == ["eval_bundle.zip"] * 3 and core_eval.is_bundle(tmp_path / "base" / "eval_bundle")


@pytest.mark.parametrize("name, fail, message", [
    ("missing.zip", 0, "HTTP 404"),
    ("eval_bundle.zip", 99, "HTTP 500"),
    ("junk.zip", 0, "not a complete zip"),
])
def test_a_failed_download_is_one_line_and_leaves_no_half_bundle(server, tmp_path, monkeypatch, name, fail, message):
    monkeypatch.setenv("NANOCHAT_EVAL_BUNDLE_URL", f"{server.url}/{name}")
    server.fail = {name: fail}
    with pytest.raises(UserError) as e:
        core_eval.ensure_eval_bundle(retries=2, backoff=0)
    text = str(e.value)
    assert "\n" not in text and message in text and "NANOCHAT_EVAL_BUNDLE_URL" in text
    assert str(tmp_path / "base" / "eval_bundle") in text
    assert server.requests == [name] * (1 if fail == 0 and name == "missing.zip" else 2)  # a 404 is not retried
    assert leftovers(tmp_path / "base") == []


def test_offline_is_one_line(tmp_path, monkeypatch):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # a port nobody listens on
    port = sock.getsockname()[1]
    sock.close()
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    monkeypatch.setenv("NANOCHAT_EVAL_BUNDLE_URL", f"http://127.0.0.1:{port}/eval_bundle.zip")
    with pytest.raises(UserError, match="cannot connect"):
        core_eval.ensure_eval_bundle(retries=1)
    assert not (tmp_path / "eval_bundle").exists()


def test_a_half_placed_bundle_is_reported_not_overwritten(server, tmp_path):
    folder = tmp_path / "base" / "eval_bundle"
    folder.mkdir(parents=True)
    (folder / "core.yaml").write_text("icl_tasks: []\n")
    with pytest.raises(UserError, match="not a complete eval bundle"):
        core_eval.ensure_eval_bundle(backoff=0)
    assert server.requests == [] and sorted(p.name for p in folder.iterdir()) == ["core.yaml"]


# -----------------------------------------------------------------------------
# Command lines


def run(module, args, base, **env):
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base), PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES="", **env)
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], env=env, capture_output=True, text=True,
                          cwd=REPO, timeout=300)


@pytest.mark.slow
def test_cli_scores_a_checkpoint_and_a_bad_tag_is_one_line(tmp_path, monkeypatch):
    base = tmp_path / "base"
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    make_bundle(base / "eval_bundle", fewshot=(1, 0, 2))
    TOK.save(base / "tokenizer")
    config = GPTConfig(sequence_len=64, vocab_size=TOK.vocab_size, n_layer=1, n_head=2, n_kv_head=2, n_embd=32)
    torch.manual_seed(1)
    model = GPT(config)
    model.init_weights()
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.5)
    checkpoint.save_checkpoint(paths.checkpoint_dir("t"), 7, {"model": model.state_dict()},
                               {"step": 7, "model_config": config.to_dict()})
    proc = run("train.core_eval", ["--model-tag", "t", "--device-type", "cpu"], base)
    assert proc.returncode == 0, proc.stderr[-2000:]
    expected = evaluate_core(model.eval(), TOK, "cpu", max_per_task=-1)
    assert f"CORE {expected['core_metric']:.4f}" in proc.stdout
    assert re.search(r"^mc\s+accuracy [0-9.]+ \| centered [-+][0-9.]+$", proc.stdout, re.M), proc.stdout

    proc = run("train.core_eval", ["--model-tag", "nothing-here"], base)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1 and "no checkpoints" in err[0], proc.stderr


@pytest.mark.slow
def test_pretrain_reports_core_and_fails_early_without_a_bundle(tmp_path, server):
    from train import dataset
    base = tmp_path / "base"
    src = tmp_path / "corpus"
    src.mkdir()
    words = "the cat sat on the mat and the dog barks at the cow while the duck quacks".split()
    rng = random.Random(0)
    for i in range(40):
        (src / f"doc{i}.txt").write_text(" ".join(rng.choice(words) for _ in range(200)))
    dataset.build([src], "core", docs_per_row_group=4)
    TOK.save(base / "tokenizer")
    tiny = ["--dataset", "core", "--depth", "1", "--aspect-ratio", "32", "--head-dim", "32", "--max-seq-len", "64",
            "--device-batch-size", "2", "--total-batch-size", "128", "--eval-every", "-1", "--sample-every", "-1",
            "--device-type", "cpu", "--num-iterations", "3", "--core-metric-every", "2"]

    proc = run("train.pretrain", tiny, base, NANOCHAT_EVAL_BUNDLE_URL=f"{server.url}/missing.zip")
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1 and "eval bundle" in err[0] and "--core-metric-every -1" in err[0]
    assert "training" not in proc.stdout  # failed before the first step

    proc = run("train.pretrain", [*tiny, "--model-tag", "core"], base)  # the server's bundle, fetched at start-up
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"step 00002 \| CORE -?[0-9.]+", proc.stdout) and "step 00003 | CORE" in proc.stdout
    assert "step 00001 | CORE" not in proc.stdout
    lines = (base / "base_checkpoints" / "core" / "metrics.jsonl").read_text().splitlines()
    cores = [r for r in map(json.loads, lines) if "core_metric" in r]
    assert [r["step"] for r in cores] == [2, 3] and all(-1 <= r["core_metric"] <= 1 for r in cores)
    meta = checkpoint.load_meta(base / "base_checkpoints" / "core", 3)
    assert meta["loop_state"]["core_metric"] == cores[-1]["core_metric"]
