"""train.dataset: download against a local HTTP server (failing, truncating), local build, bad input."""
import json
import os
import socket
import statistics
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings, strategies as st

from train import dataset
from train.errors import UserError

REPO = Path(__file__).resolve().parents[1]
VAL = dataset.DATASETS["climbmix"].num_shards - 1  # the hub's last shard: always fetched, always validation


def write_parquet(path, docs, row_group=2):
    pq.write_table(pa.table({"text": docs}), path, row_group_size=row_group)


def shard_texts(path):
    return pq.read_table(path).column("text").to_pylist()


@pytest.fixture
def base(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    monkeypatch.delenv("NANOCHAT_DATA_URL", raising=False)
    return tmp_path / "base"


@pytest.fixture
def server(tmp_path, serve_folder):
    """An HTTP server on 127.0.0.1 with shards 0..2 and the validation shard of climbmix."""
    root = tmp_path / "served"
    root.mkdir()
    for i in (0, 1, 2, VAL):
        write_parquet(root / dataset.shard_name(i), [f"shard {i} doc {j} " * (j + 1) for j in range(40)], row_group=8)
    return serve_folder(root)


def download(srv, num_shards=2, **kw):
    kw = {"base_url": srv.url, "workers": 3, "retries": 3, "backoff": 0.0, "timeout": 5.0} | kw
    return dataset.download("climbmix", num_shards, **kw)


def leftovers(folder):
    """Anything in the shard folder that is not a complete shard or the shards' digests."""
    return sorted(p.name for p in folder.iterdir() if p.name != dataset.DIGESTS and
                  not (p.suffix == ".parquet" and dataset.is_complete_parquet(p)))


def test_download_fetches_train_shards_plus_the_validation_shard_and_resumes(base, server):
    shards = download(server)
    assert [p.name for p in shards] == [dataset.shard_name(i) for i in (0, 1, VAL)]
    assert dataset.val_shards("climbmix") == [shards[-1]] and dataset.train_shards("climbmix") == shards[:2]
    for p in shards:
        assert p.read_bytes() == (server.root / p.name).read_bytes()
    assert shards[0].parent == base / "data" / "climbmix"
    stored = json.loads((shards[0].parent / dataset.DIGESTS).read_text())  # taken once, as they arrive
    assert {n: d["sha256"] for n, d in stored.items()} == {p.name: dataset.file_sha256(p) for p in shards}
    # Resumable: complete shards are skipped; a damaged one (not from us) is fetched again.
    server.requests.clear()
    shards[1].write_bytes(b"PAR1 not really")
    folder = base / "data" / "climbmix"
    assert download(server, num_shards=3) == [folder / dataset.shard_name(i) for i in (0, 1, 2, VAL)]
    assert sorted(server.requests) == [dataset.shard_name(1), dataset.shard_name(2)]
    assert leftovers(shards[0].parent) == []


def test_download_retries_server_errors(base, server):
    server.fail = {dataset.shard_name(0): 2, dataset.shard_name(VAL): 1}
    download(server, retries=3)
    assert server.requests.count(dataset.shard_name(0)) == 3 and server.requests.count(dataset.shard_name(VAL)) == 2
    assert len(dataset.list_shards("climbmix")) == 3


def test_a_failing_server_leaves_no_half_shard_and_one_line_error(base, server):
    server.fail = {dataset.shard_name(1): 99}
    with pytest.raises(UserError, match="HTTP 500") as e:
        download(server, retries=2)
    assert "\n" not in str(e.value) and "rerun" in str(e.value)
    assert server.requests.count(dataset.shard_name(1)) == 2
    folder = base / "data" / "climbmix"
    assert not (folder / dataset.shard_name(1)).exists() and leftovers(folder) == []


def test_a_truncated_transfer_is_retried_and_never_leaves_a_half_shard(base, server):
    name = dataset.shard_name(0)
    server.truncate = {name: 1}  # cut short once, then served whole
    download(server, retries=2)
    assert (base / "data" / "climbmix" / name).read_bytes() == (server.root / name).read_bytes()

    server.truncate = {dataset.shard_name(2): 99}  # cut short every time
    with pytest.raises(UserError, match="shard_00002"):
        download(server, num_shards=3, retries=2)
    folder = base / "data" / "climbmix"
    assert not (folder / dataset.shard_name(2)).exists() and leftovers(folder) == []


def test_a_page_that_is_not_parquet_is_rejected(base, server):
    (server.root / dataset.shard_name(1)).write_bytes(b"<html>try again later</html>")
    with pytest.raises(UserError, match="not a complete parquet file"):
        download(server, retries=2)
    folder = base / "data" / "climbmix"
    assert not (folder / dataset.shard_name(1)).exists() and leftovers(folder) == []


def test_missing_file_fails_at_once_and_env_var_sets_the_url(base, server, monkeypatch):
    (server.root / dataset.shard_name(1)).unlink()
    monkeypatch.setenv("NANOCHAT_DATA_URL", server.url)
    with pytest.raises(UserError, match="404"):
        dataset.download("climbmix", 2, retries=5, backoff=0.0)
    assert server.requests.count(dataset.shard_name(1)) == 1  # a 404 is not retried


def test_ensure_dataset_downloads_hub_shards_and_explains_local_ones(base, server, monkeypatch):
    monkeypatch.setenv("NANOCHAT_DATA_URL", server.url)
    assert len(dataset.ensure_dataset("climbmix", num_shards=1)) == 2
    assert dataset.ensure_dataset("climbmix") == dataset.list_shards("climbmix")  # already there: no download
    with pytest.raises(UserError, match=r"python -m train\.dataset build`"):
        dataset.ensure_dataset("pystdlib")
    with pytest.raises(UserError, match="--from PATH --name mine"):
        dataset.ensure_dataset("mine")


def cli(args, base):
    env = {k: v for k, v in os.environ.items() if k != "NANOCHAT_DATA_URL"}
    env |= {"NANOCHAT_BASE_DIR": str(base), "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "train.dataset", *map(str, args)], env=env, capture_output=True,
                          text=True, cwd=REPO, timeout=120)


@pytest.mark.slow
def test_offline_download_is_one_clear_line(tmp_path):
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = cli(["download", "--num-shards", "2", "--base-url", f"http://127.0.0.1:{port}", "--retries", "2",
                "--backoff", "0"], tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot connect" in lines[0] and "Traceback" not in proc.stderr, proc.stderr
    assert not any((tmp_path / "data" / "climbmix").iterdir())


def make_corpus(root):
    """A folder with every supported kind of file, nested, plus files and folders that must be ignored."""
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / ".git").mkdir()
    (root / "a.txt").write_text("alpha document\nwith two lines")
    (root / "sub" / "b.md").write_text("# beta\n\nmarkdown ü")
    (root / "sub" / "deeper" / "c.py").write_text("def gamma():\n    return 3\n")
    lines = [json.dumps({"text": "delta"}), "", json.dumps({"text": "epsilon é"})]
    (root / "sub" / "docs.jsonl").write_text("\n".join(lines) + "\n")
    write_parquet(root / "sub" / "deeper" / "rows.parquet", ["zeta", "eta", "theta"])
    (root / "notes.csv").write_text("not,a,document")
    (root / ".git" / "HEAD.txt").write_text("hidden")
    (root / "empty.txt").write_text("  \n")
    return {"alpha document\nwith two lines", "# beta\n\nmarkdown ü", "def gamma():\n    return 3\n", "delta",
            "epsilon é", "zeta", "eta", "theta"}


def test_build_from_a_folder_is_deterministic_with_a_held_out_validation_shard(base, tmp_path):
    expected = make_corpus(tmp_path / "corpus")
    shards = dataset.build([tmp_path / "corpus"], "mine", docs_per_row_group=2, docs_per_shard=3, val_fraction=0.25)
    texts = [shard_texts(p) for p in shards]
    assert sorted(sum(texts, [])) == sorted(expected)
    assert [len(t) for t in texts] == [3, 3, 2]  # 6 training documents in shards of 3, then 2 held out
    assert dataset.val_shards("mine") == [shards[-1]]
    assert all(pq.ParquetFile(p).metadata.row_group(0).num_rows == 2 for p in shards)
    again = dataset.build([tmp_path / "corpus"], "mine", docs_per_row_group=2, docs_per_shard=3, val_fraction=0.25)
    assert [shard_texts(p) for p in again] == texts
    reshuffled = dataset.build([tmp_path / "corpus"], "mine", docs_per_row_group=2, docs_per_shard=3,
                               val_fraction=0.25, seed=7)
    assert [shard_texts(p) for p in reshuffled] != texts
    assert sorted(p.name for p in (base / "data").iterdir()) == ["mine"]  # no staging folders left behind


@pytest.mark.slow
def test_build_without_sources_is_the_standard_library(base):
    proc = cli(["build"], base)
    assert proc.returncode == 0, proc.stderr
    shards = dataset.list_shards("pystdlib")
    assert len(shards) >= 2
    docs = shard_texts(shards[0])
    assert len(docs) > 500 and any("def " in d for d in docs)
    assert all(pq.ParquetFile(p).metadata.num_row_groups >= 2 for p in shards)


@pytest.mark.slow
@pytest.mark.parametrize("case, message", [
    ("missing", "no such file"),
    ("empty", "no .txt"),
    ("blank", "need at least 2"),
    ("corrupt", "not a readable parquet"),
    ("no-text-column", "no 'text' column"),
    ("bad-jsonl", "bad.jsonl:2"),
    ("int-text-column", "numbers.parquet: the 'text' column holds int64, not strings"),
    ("lone-surrogate", "odd.jsonl:2: the 'text' field is not valid Unicode"),
    ("unsupported", "unsupported file type"),
])
def test_bad_corpus_is_one_line_and_exit_2(tmp_path, case, message):
    src = tmp_path / "src"
    src.mkdir()
    if case == "missing":
        src = tmp_path / "nowhere"
    elif case == "blank":
        (src / "only.txt").write_text("a single document")
    elif case == "corrupt":
        (src / "broken.parquet").write_bytes(b"PAR1" + os.urandom(100))
    elif case == "no-text-column":
        pq.write_table(pa.table({"body": ["x", "y"]}), src / "other.parquet")
    elif case == "bad-jsonl":
        (src / "bad.jsonl").write_text(json.dumps({"text": "fine"}) + "\n{not json\n")
    elif case == "int-text-column":
        pq.write_table(pa.table({"text": [1, 2]}), src / "numbers.parquet")
    elif case == "lone-surrogate":  # valid JSON, but no UTF-8 can hold it
        (src / "odd.jsonl").write_text(json.dumps({"text": "fine"}) + '\n{"text": "half \\ud800 a pair"}\n')
    elif case == "unsupported":
        src = src / "table.csv"
        src.write_text("a,b")
    proc = cli(["build", "--from", src, "--name", "bad"], tmp_path / "base")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "base" / "data" / "bad").exists()


@pytest.mark.slow
@pytest.mark.parametrize("args, message", [
    (["download", "--num-shards", "0"], "--num-shards"),
    (["download", "--name", "nope"], "invalid choice"),
    (["build", "--from", ".", "--name", "../escape"], "bad dataset name"),
])
def test_bad_flags_are_one_line_and_exit_2(tmp_path, args, message):
    proc = cli(args, tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr


# -----------------------------------------------------------------------------
# Python files cut into documents at top-level definitions

HUGE = "def huge():\n    a = 1\n    if a:\n        b = 2\n\n        c = 3\n\n    d = 4\n\n    return d\n"


@pytest.mark.parametrize("text, target, docs", [
    # a decorated definition is one piece, with the comments right above it; nested defs never start one
    ("import x\n\n\n@dec\n@dec2(\n    a,\n)\ndef f():\n    pass\n\n\n# about C\n# more\nclass C:\n    def m(self):\n"
     "        def inner():\n            pass\n\nasync def g():\n    pass\n", 1,
     ["import x\n\n\n", "@dec\n@dec2(\n    a,\n)\ndef f():\n    pass\n\n\n",
      "# about C\n# more\nclass C:\n    def m(self):\n        def inner():\n            pass\n\n",
      "async def g():\n    pass\n"]),
    # pieces are joined while they fit in target
    ("def a():\n    pass\n\ndef b():\n    pass\n\ndef c():\n    pass\n", 40,
     ["def a():\n    pass\n\ndef b():\n    pass\n\n", "def c():\n    pass\n"]),
    # over 2 x target: cut after blank lines before its shallowest lines only (not inside the `if`)
    (HUGE, 30, ["def huge():\n    a = 1\n    if a:\n        b = 2\n\n        c = 3\n\n",
                "    d = 4\n\n    return d\n"]),
    (HUGE, 60, [HUGE]),  # not huge: whole
    ("x = 1\n\ny = 2\n", 20, ["x = 1\n\ny = 2\n"]),  # no definition
    ("x = 1\n\ny = 2\n    z\n", 1, ["x = 1\n\n", "y = 2\n    z\n"]),  # ... over 2 x target: at blank lines
    ("\n\n  \n", 1, ["\n\n  \n"]),  # blank lines only
    ("\n\ndef f():\n    pass\n", 1, ["\n\ndef f():\n    pass\n"]),  # a blank start is never a document alone
    ("def f():\n    pass\n", 1, ["def f():\n    pass\n"]),  # a definition on the first line
    ("import os\r\n\r\ndef f():\r\n    pass\r\n\r\ndef g():\r\n    return 1", 1,  # CRLF, no final newline
     ["import os\r\n\r\n", "def f():\r\n    pass\r\n\r\n", "def g():\r\n    return 1"]),
    ("a = 1\rdef f(): pass\x0cdef g(): pass\n", 1, ["a = 1\r", "def f(): pass\x0cdef g(): pass\n"]),  # \r ends a line
    ("", 1, [""]),
])
def test_split_python_cuts_at_top_level_definitions(text, target, docs):
    assert dataset.split_python(text, target) == docs


LINES = ["def f():", "async def g(x):", "class C(B):", "@dec", "@dec(", ")", "# note", "import os", "    return 1",
         "    def m(self):", "        pass", "", "   ", 'x = """', "def in_a_string", "\x0c"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(LINES), st.sampled_from(["\n", "\r\n", "\r", ""]))), st.integers(1, 80))
def test_split_python_loses_no_character(lines, target):
    text = "".join(line + end for line, end in lines)
    docs = dataset.split_python(text, target)
    assert "".join(docs) == text
    assert all(doc.strip() for doc in docs) or len(docs) == 1  # no blank document beside others


def test_the_standard_library_build_makes_page_sized_documents_and_loses_no_character(base):
    """The default build on the real standard library: every file's documents give the file back, and the shards
    hold exactly those documents."""
    files = dataset.find_files(dataset.stdlib_sources(), (".py",))
    chars, docs, file_of = 0, [], {}
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        pieces = list(dataset.read_documents(path, split_py=True))
        assert "".join(pieces) == (text if text.strip() else ""), path
        chars += len(text) if text.strip() else 0
        docs += pieces
        for piece in pieces:
            file_of.setdefault(piece, []).append(path)
    shards = dataset.build()
    built = [t for p in shards for t in shard_texts(p)]
    assert sorted(built) == sorted(docs) and sum(map(len, built)) == chars
    # val holds whole files: no file has a piece on both sides (pieces that occur more than once tell nothing)
    val_files = {file_of[t][0] for t in shard_texts(shards[-1]) if len(file_of[t]) == 1}
    train_files = {file_of[t][0] for p in shards[:-1] for t in shard_texts(p) if len(file_of[t]) == 1}
    assert val_files and not val_files & train_files
    sizes = sorted(map(len, built))
    assert len(built) > 5 * len(files)  # whole files made 1 document each
    assert 1200 <= statistics.median(sizes) <= 2200, statistics.median(sizes)  # 1,698 characters on Python 3.11
    assert sizes[int(0.9 * len(sizes))] <= 4000  # 3,198 on 3.11


def test_split_py_is_the_default_for_the_standard_library_only(base, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    code = "".join(f"def f{i}():\n    return {'1' * 1500}\n\n\n" for i in range(3))  # 3 x 1,524 characters
    (src / "big.py").write_text(code)
    (src / "notes.md").write_text(code)
    dataset.main(["build", "--from", str(src), "--name", "mine"])
    assert sorted(t for p in dataset.list_shards("mine") for t in shard_texts(p)) == [code, code]
    dataset.main(["build", "--from", str(src), "--name", "mine", "--split-py"])
    docs = [t for p in dataset.list_shards("mine") for t in shard_texts(p)]
    assert sorted(docs) == sorted([code] + [code[i * 1524:(i + 1) * 1524] for i in range(3)])
    with pytest.raises(SystemExit):
        dataset.main(["build", "--split-py", "--whole-files"])


def test_only_split_py_files_are_held_out_whole(base, tmp_path):
    """With --split-py a .py file's pieces stay on one side of the split; the lines of a .jsonl are documents each,
    held out one by one as without it (not a whole file in val)."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("a", "b"):
        (src / f"{name}.jsonl").write_text("".join(json.dumps({"text": f"{name} line {i}"}) + "\n" for i in range(100)))
    dataset.main(["build", "--from", str(src), "--name", "mixed", "--split-py", "--val-fraction", "0.1"])
    assert len(shard_texts(dataset.list_shards("mixed")[-1])) == 20
