"""train.sample: a checkpoint saved by the project's own save code, talked to through main(argv) in-process (one
subprocess run for the exit status and the one stderr line)."""
import io
import re
import shutil
import subprocess
import sys

import pytest
import torch

from helpers import REPO, cli_env, data_file, one_line_error, run
from model.config import GPTConfig
from model.gpt import GPT
from train import checkpoint, paths, sample
from train.builder import model_from_checkpoint
from train.errors import run_cli
from train.evaluate import sample as in_run_sample
from train.tokenizer import make_tokenizer

PROMPT = "def f(x):"


def make_tokenizer_with_merges():
    """Bytes plus a few merges: tokens of several bytes next to lone bytes that end inside a character."""
    ranks = {bytes([i]): i for i in range(256)}
    for merge in (b"de", b"def", b"f(", b"x)", b"):"):
        ranks[merge] = len(ranks)
    return make_tokenizer(ranks)


TOK = make_tokenizer_with_merges()
CONFIG = GPTConfig(sequence_len=32, vocab_size=TOK.vocab_size, n_layer=2, n_head=2, n_kv_head=2, n_embd=32,
                   window_pattern="SL")


def tiny_model(seed: int) -> GPT:
    """A GPT whose every weight matters (at init the zero projections make the blocks the identity)."""
    torch.manual_seed(seed)
    model = GPT(CONFIG)
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model.eval()


def save(step: int, model: GPT) -> None:
    checkpoint.save_checkpoint(paths.checkpoint_dir("t"), step, {"model": model.state_dict()},
                               {"step": step, "model_config": CONFIG.to_dict(), "tokenizer": TOK.fingerprint})


@pytest.fixture
def base(tmp_path, monkeypatch):
    """A base dir with the tokenizer and checkpoints of two different models, steps 5 and 10 of tag t."""
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    TOK.save(tmp_path / "tokenizer")
    save(5, tiny_model(5))
    save(10, tiny_model(10))
    return tmp_path


@pytest.fixture
def cli(capsys, monkeypatch):
    """cli(*flags, stdin=None) -> (exit status, stdout, stderr) of train.sample run as its __main__ runs it."""
    def call(*flags, stdin=None):
        if stdin is not None:
            monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        try:
            run_cli(sample.main, ["--model-tag", "t", "--device-type", "cpu", *map(str, flags)])
            status = 0
        except SystemExit as e:
            status = e.code
        out, err = capsys.readouterr()
        return status, out, err
    return call


def greedy(step: int, prompt: str = PROMPT, max_tokens: int = 24) -> str:
    """The in-run sampler's continuation (train.evaluate.sample) of the model saved at step, and a newline."""
    model, _ = model_from_checkpoint(paths.checkpoint_dir("t"), step, "cpu")
    return in_run_sample(model, TOK, [prompt], max_tokens)[0][len(prompt):] + "\n"


def test_greedy_is_deterministic_and_the_in_run_samplers_text(base, cli):
    first = cli("--prompt", PROMPT, "--temperature", 0, "--max-tokens", 24)
    assert first == (0, greedy(10), "")  # the newest step; nothing but the continuation on stdout
    assert cli("--prompt", PROMPT, "--temperature", 0, "--max-tokens", 24) == first
    assert len(set(first[1])) > 3  # a varied continuation, not one token over and over


def test_the_prompt_from_stdin_is_the_prompt_from_the_flag(base, cli):
    assert cli("--temperature", 0, "--max-tokens", 24, stdin=PROMPT) == (0, greedy(10), "")
    assert cli("--temperature", 0, "--max-tokens", 24, stdin="") == (0, greedy(10, prompt=""), "")  # BOS alone


def test_a_seed_gives_the_same_text_and_another_seed_another(base, cli):
    flags = ("--prompt", PROMPT, "--temperature", 1.0, "--max-tokens", 32)
    one = cli(*flags, "--seed", 1)
    assert one[0] == 0 and cli(*flags, "--seed", 1) == one
    assert cli(*flags, "--seed", 2)[1] != one[1]
    assert one[1] != greedy(10, max_tokens=32)  # drawn, not the most likely
    assert cli(*flags, "--seed", 2, "--top-k", 1)[1] == greedy(10, max_tokens=32)  # top-1: the most likely


def test_an_explicit_step_and_one_that_is_not_there(base, cli):
    assert cli("--prompt", PROMPT, "--temperature", 0, "--max-tokens", 24, "--step", 5) == (0, greedy(5), "")
    assert greedy(5) != greedy(10)  # two models: the step decides which one speaks
    status, out, err = cli("--prompt", PROMPT, "--step", 7)
    assert status == 2 and out == "" and err == f"error: no checkpoint at step 7 in {paths.checkpoint_dir('t')} " \
                                                "(saved steps: 5, 10)\n"


def flip_a_byte(step: int) -> None:
    path = data_file(paths.checkpoint_dir("t"), step)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(data)


def test_a_damaged_checkpoint_is_passed_over_by_default_and_refused_by_step(base, cli):
    flip_a_byte(10)
    status, out, err = cli("--prompt", PROMPT, "--temperature", 0, "--max-tokens", 24)
    assert (status, out) == (0, greedy(5))  # as --resume-from-step latest: the newest that verifies
    assert err.startswith("skipped step 10 of ") and "is damaged" in err and len(err.splitlines()) == 1
    status, out, err = cli("--prompt", PROMPT, "--step", 10)
    assert status == 2 and out == "" and len(err.splitlines()) == 1
    assert "step_000010/model/__0_0.distcp is damaged" in err
    flip_a_byte(5)
    status, out, err = cli("--prompt", PROMPT)
    assert status == 2 and out == "" and len(err.splitlines()) == 1
    assert err.startswith("error: no checkpoint in ") and "verifies (step 10: " in err


def test_a_suspect_checkpoint_is_passed_over(base, cli):
    checkpoint.mark_suspect(paths.checkpoint_dir("t"), 10, "loss nan at step 11")
    status, out, err = cli("--prompt", PROMPT, "--temperature", 0, "--max-tokens", 24)
    assert (status, out) == (0, greedy(5)) and "skipped step 10" in err and "marked suspect" in err


@pytest.mark.parametrize("tag, message", [("nothing-here", "no checkpoints in .*nothing-here$"),
                                          ("../t", "bad --model-tag '../t'")])
def test_a_missing_or_bad_tag_is_one_line(base, cli, tag, message):
    status, out, err = cli("--prompt", PROMPT, "--model-tag", tag)
    assert status == 2 and out == "" and len(err.splitlines()) == 1 and re.search(message, err.strip()), err


def test_no_checkpoint_in_the_folder_is_one_line(base, cli):
    for p in paths.checkpoint_dir("t").iterdir():
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    status, out, err = cli("--prompt", PROMPT)
    assert status == 2 and err == f"error: no checkpoints in {paths.checkpoint_dir('t')}\n"


@pytest.mark.parametrize("flags, message", [
    (("--max-tokens", 0), "--max-tokens must be at least 1"),
    (("--temperature", -0.5), "--temperature must be a finite number >= 0"),
    (("--temperature", "nan"), "--temperature must be a finite number >= 0"),
    (("--temperature", "inf"), "--temperature must be a finite number >= 0"),
    (("--top-k", 0), "--top-k must be at least 1"),
    (("--step", -1), "--step must be a step"),
    (("--seed", -1), "--seed must be an integer in"),
    (("--max-tokens", "many"), "argument --max-tokens: invalid int value"),
])
def test_bad_flags_are_one_line(base, cli, flags, message):
    status, out, err = cli("--prompt", PROMPT, *flags)
    assert status == 2 and out == "" and len(err.splitlines()) == 1 and message in err, err


def test_a_prompt_longer_than_the_context_is_one_line(base, cli):
    status, out, err = cli("--prompt", "x" * CONFIG.sequence_len)  # with BOS, one token too many
    assert status == 2 and out == "" and err == (f"error: the prompt is {CONFIG.sequence_len + 1} tokens (BOS "
                                                 f"included), longer than the model's context of "
                                                 f"{CONFIG.sequence_len}\n")
    assert cli("--prompt", "x" * (CONFIG.sequence_len - 1), "--max-tokens", 1)[0] == 0  # exactly the context


def test_the_continuation_stops_where_the_positions_end(base, cli):
    limit = 10 * CONFIG.sequence_len  # the rotary table's length
    status, out, err = cli("--prompt", PROMPT, "--temperature", 0, "--max-tokens", limit)
    prompt_ids = len(TOK.encode(PROMPT, prepend_bos=True))
    assert status == 0 and out == greedy(10, max_tokens=limit - prompt_ids)
    assert err == f"--max-tokens {limit}: stopping after {limit - prompt_ids}, where the model's positions end\n"


def test_a_character_split_over_tokens_is_printed_whole():
    ids = TOK.encode("é€ ok")  # no merges inside: lone bytes, each but the last of a character undecodable alone
    assert "".join(sample.stream_text(ids, TOK.decode)) == "é€ ok"
    assert list(sample.stream_text(ids, TOK.decode))[:2] == ["é", "€"]
    assert "".join(sample.stream_text(TOK.encode("é")[:1], TOK.decode)) == "\ufffd"  # a half character at the end


def test_the_command_line_exits_2_with_one_line(base):
    flip_a_byte(10)
    proc = run(["--model-tag", "t", "--step", "10", "--prompt", PROMPT, "--device-type", "cpu"], base,
               check=False, module="train.sample")
    one_line_error(proc, r"^error: checkpoint step 10: .*step_000010/model/__0_0\.distcp is damaged")


def test_a_reader_that_leaves_ends_the_stream_quietly(base):
    """`python -m train.sample ... | head -c 1`: no BrokenPipeError traceback once the reader has gone."""
    proc = subprocess.Popen([sys.executable, "-m", "train.sample", "--model-tag", "t", "--prompt", PROMPT,
                             "--max-tokens", "300", "--device-type", "cpu"], env=cli_env(base), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.read(1)
    proc.stdout.close()
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and "Traceback" not in stderr, stderr
