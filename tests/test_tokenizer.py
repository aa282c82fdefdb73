"""train.tokenizer: rustbpe training, tiktoken serving, the plain-text format, token bytes, bad input."""
import base64
import io
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import given, settings, strategies as st

from train.errors import UserError, run_cli
from train.tokenizer import SPECIAL_TOKENS, load_tokenizer, main, train_tokenizer

REPO = Path(__file__).resolve().parents[1]
WORDS = ["the", "model", "token", "über", "naïve", "数据", "日本語", "привет", "🙂", "def", "return", "x = 1",
         "  ", "\n", "\t", "42", "3.14159", "don't", "we'll", "<|bos|>", "(", ")", ":"]


def corpus(n, seed):
    """Mixed scripts, code, numbers, and made-up words (so there are plenty of pairs to merge)."""
    rng = random.Random(seed)

    def word():
        return rng.choice(WORDS) if rng.random() < 0.5 else "".join(rng.choices("aeioubdklmnrst", k=rng.randint(2, 7)))

    return [" ".join(word() for _ in range(rng.randint(5, 60))) for _ in range(n)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 400-token tokenizer trained on a small mixed-script dataset, in a temporary base dir."""
    base = tmp_path_factory.mktemp("nanochat")
    folder = base / "data" / "mixed"
    folder.mkdir(parents=True)
    pq.write_table(pa.table({"text": corpus(300, 0)}), folder / "shard_00000.parquet", row_group_size=50)
    pq.write_table(pa.table({"text": corpus(20, 1)}), folder / "shard_00001.parquet")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NANOCHAT_BASE_DIR", str(base))
        tok = train_tokenizer("mixed", vocab_size=400)
    return tok, base


def test_training_reaches_the_vocab_and_saves_plain_text(trained):
    tok, base = trained
    folder = base / "tokenizer"
    assert tok.vocab_size == 400
    assert sorted(p.name for p in folder.iterdir()) == ["token_bytes.pt", "tokenizer.json", "tokenizer.tiktoken"]
    lines = (folder / "tokenizer.tiktoken").read_text(encoding="ascii").splitlines()
    assert len(lines) == 400 - len(SPECIAL_TOKENS)
    for i, line in enumerate(lines):
        token, rank = line.split()
        assert int(rank) == i and tok.enc.decode_single_token_bytes(i) == base64.b64decode(token)
    meta = json.loads((folder / "tokenizer.json").read_text())
    assert meta["vocab_size"] == 400 and r"\p{N}{1,2}" in meta["pattern"]
    # Loading (a weights-only tensor, no pickle anywhere) gives the same tokenizer.
    again = load_tokenizer(folder)
    text = " ".join(corpus(5, 9))
    assert again.encode(text) == tok.encode(text) and again.vocab_size == tok.vocab_size


def test_special_tokens_come_last_with_bos_first(trained):
    tok, _ = trained
    first = tok.vocab_size - len(SPECIAL_TOKENS)
    assert tok.bos_id == tok.get_bos_token_id() == first
    assert [tok.enc.encode_single_token(s) for s in SPECIAL_TOKENS] == list(range(first, tok.vocab_size))


def test_token_bytes_table(trained):
    tok, _ = trained
    first = tok.vocab_size - len(SPECIAL_TOKENS)
    assert tok.token_bytes.dtype in (torch.int32, torch.int64) and tok.token_bytes.shape == (tok.vocab_size,)
    assert tok.token_bytes[:first].tolist() == [len(tok.enc.decode_single_token_bytes(i)) for i in range(first)]
    assert tok.token_bytes[first:].tolist() == [0] * len(SPECIAL_TOKENS)
    assert tok.token_bytes[:256].tolist() == [1] * 256  # the 256 single bytes come first
    assert (tok.token_bytes[256:first] >= 2).all()  # every merge is longer than a byte
    text = "Ünïcödé 🙂 and 1234 tokens"
    assert int(tok.token_bytes[tok.encode(text, prepend_bos=True)].sum()) == len(text.encode())


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_round_trip_of_arbitrary_unicode(trained, text):
    tok, _ = trained
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    batch = tok.encode([text, text + "!"], prepend_bos=True)
    assert batch == [[tok.bos_id] + ids, [tok.bos_id] + tok.encode(text + "!")]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from(SPECIAL_TOKENS + ["<|", "|>", "bos", " ", "a"]), max_size=20).map("".join))
def test_special_tokens_never_come_from_plain_text(trained, text):
    tok, _ = trained
    first = tok.vocab_size - len(SPECIAL_TOKENS)
    for ids in (tok.encode(text), *tok.encode([text, "x" + text])):
        assert all(i < first for i in ids)
    assert tok.decode(tok.encode(text)) == text


def test_numbers_split_in_groups_of_at_most_two_digits(trained):
    tok, _ = trained
    pieces = [tok.decode([i]) for i in tok.encode("1234567 and 99")]
    assert all(len(p.strip()) <= 2 for p in pieces if p.strip().isdigit())
    assert "".join(pieces) == "1234567 and 99"


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_is_a_bar_on_a_terminal_stderr_only(trained, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(trained[1]))
    train_tokenizer("mixed", vocab_size=300, out_dir=tmp_path / "quiet")
    out, err = capsys.readouterr()
    assert err == "" and "\r" not in out  # not a terminal (a log file, a test): no bar anywhere
    assert re.search(r"^read 300 documents .* computing 35 merges .*\nmerges computed in [0-9.]+s$", out, re.M), out
    monkeypatch.setattr(sys, "stderr", terminal := Terminal())
    train_tokenizer("mixed", vocab_size=300, out_dir=tmp_path / "tty")
    out = capsys.readouterr().out
    assert "reading:" in terminal.getvalue() and "char" in terminal.getvalue()
    assert "reading:" not in out and "\r" not in out


def cli(args, base):
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base), PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "train.tokenizer", *map(str, args)], env=env, capture_output=True,
                          text=True, cwd=REPO, timeout=120)


@pytest.mark.slow
@pytest.mark.parametrize("args, message", [
    (["train", "--dataset", "mixed", "--vocab-size", "264"], "at least 265"),
    (["train", "--dataset", "absent"], "python -m train.dataset build --from PATH --name absent"),
    (["train", "--dataset", "mixed", "--max-chars", "0"], "positive"),
    (["info", "--dir", "/nonexistent/tokenizer"], "no tokenizer in /nonexistent/tokenizer"),
])
def test_bad_input_is_one_line_and_exit_2(trained, args, message, monkeypatch, capsys):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(trained[1]))
    with pytest.raises(SystemExit) as e:
        run_cli(main, args)  # what `python -m train.tokenizer` runs
    lines = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(lines) == 1 and message in lines[0], lines


def test_damaged_tokenizer_files_are_one_clear_error(trained, tmp_path):
    tok, _ = trained
    with pytest.raises(UserError, match="no tokenizer in"):
        load_tokenizer(tmp_path / "missing")
    tok.save(tmp_path / "tok")
    (tmp_path / "tok" / "token_bytes.pt").unlink()
    with pytest.raises(UserError, match="token_bytes.pt is missing"):
        load_tokenizer(tmp_path / "tok")
    tok.save(tmp_path / "tok")
    with open(tmp_path / "tok" / "tokenizer.tiktoken", "a") as f:
        f.write("not-base64!\n")
    with pytest.raises(UserError, match=r"tokenizer\.tiktoken:392"):
        load_tokenizer(tmp_path / "tok")
    tok.save(tmp_path / "tok")
    (tmp_path / "tok" / "token_bytes.pt").write_bytes(b"garbage")
    with pytest.raises(UserError, match="token_bytes.pt: cannot load"):
        load_tokenizer(tmp_path / "tok")
    tok.save(tmp_path / "tok")
    meta = json.loads((tmp_path / "tok" / "tokenizer.json").read_text())
    (tmp_path / "tok" / "tokenizer.json").write_text(json.dumps(meta | {"pattern": r"[\p{L}+"}))
    with pytest.raises(UserError, match=r"tokenizer\.json: the split pattern does not compile"):
        load_tokenizer(tmp_path / "tok")
    tok.save(tmp_path / "tok")
    assert load_tokenizer(tmp_path / "tok").encode("ok") == tok.encode("ok")


def test_training_on_a_text_column_of_ints_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    folder = tmp_path / "data" / "ints"
    folder.mkdir(parents=True)
    for i in range(2):
        pq.write_table(pa.table({"text": [1, 2, 3]}), folder / f"shard_{i:05d}.parquet")
    with pytest.raises(UserError, match=r"shard_00000\.parquet: the 'text' column holds int64, not strings"):
        train_tokenizer("ints", vocab_size=300, out_dir=tmp_path / "tok")


@pytest.mark.slow
def test_cli_in_a_fresh_process(trained):
    proc = cli(["info", "hello 123"], trained[1])
    assert proc.returncode == 0 and "vocab 400" in proc.stdout, proc.stderr
    proc = cli(["info", "--dir", "/nonexistent/tokenizer"], trained[1])
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "no tokenizer in" in proc.stderr
