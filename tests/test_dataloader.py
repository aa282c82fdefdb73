"""train.dataloader: BOS-aligned best-fit rows of real document tokens, rank sharding, exact resume, val."""
import json
import random
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from train import dataloader as dl
from train.dataloader import DataLoader
from train.errors import UserError
from train.tokenizer import train_tokenizer

B, T = 3, 32  # rows of 33 tokens: the toy documents run from 2 to a few hundred tokens
TRAIN_LAYOUT = [5, 3]  # row groups per training shard
VAL_LAYOUT = [2]
DOCS_PER_GROUP = 6


def toy_text(rng, split, s, g, i):
    u = rng.random()
    words = rng.randint(0, 3) if u < 0.4 else rng.randint(4, 40) if u < 0.8 else rng.randint(60, 300)
    body = " ".join(rng.choice(["alpha", "beta", "gamma", "x=1;", "über", "(42)", "\n", "δ"]) for _ in range(words))
    return f"{split}{s}.{g}.{i} {body}"


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A dataset 'toy' (two training shards with 5 and 3 row groups, one validation shard with 2) and a
    300-token tokenizer trained on it; truth maps (split, shard, row group, index) -> the document's tokens."""
    base = tmp_path_factory.mktemp("nanochat")
    folder = base / "data" / "toy"
    folder.mkdir(parents=True)
    rng, texts = random.Random(0), {}
    for split, layout, first in (("train", TRAIN_LAYOUT, 0), ("val", VAL_LAYOUT, len(TRAIN_LAYOUT))):
        for s, groups in enumerate(layout):
            docs = []
            for g in range(groups):
                for i in range(DOCS_PER_GROUP):
                    texts[split, s, g, i] = toy_text(rng, split, s, g, i)
                    docs.append(texts[split, s, g, i])
            pq.write_table(pa.table({"text": docs}), folder / f"shard_{first + s:05d}.parquet",
                           row_group_size=DOCS_PER_GROUP)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NANOCHAT_BASE_DIR", str(base))
        tok = train_tokenizer("toy", vocab_size=300)
    truth = {ref: tok.encode(text) for ref, text in texts.items()}
    return tok, base, truth


@pytest.fixture(autouse=True)
def base_dir(toy, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(toy[1]))


def loader(toy, **kw):
    """A small buffer, so that refills happen between rows as they do on real data."""
    kw = {"buffer_size": 16, "dataset": "toy"} | kw
    return DataLoader(toy[0], kw.pop("batch_size", B), kw.pop("seq_len", T), **kw)


def take(it, n):
    return [tuple(t.clone() for t in next(it)) for _ in range(n)]


def row_documents(row, bos, truth, split="train"):
    """The documents a row is packed from, checked on the way: it starts with BOS, every BOS starts a
    document, every segment but the last is a whole document, the last is a whole one or its start."""
    assert row[0] == bos, "a row must start with BOS"
    starts = [i for i, t in enumerate(row) if t == bos] + [len(row)]
    refs = []
    for k, (a, b) in enumerate(zip(starts, starts[1:])):
        seg, last = row[a + 1:b], b == len(row)
        match = [ref for ref, ids in truth.items() if ref[0] == split and
                 (ids == seg or (last and ids[:len(seg)] == seg))]
        assert match, f"segment {k} of the row is not {'the start of ' if last else ''}a {split} document: {seg}"
        refs.append(match[0][1:] if len(match) == 1 else None)  # (shard, row group, index), if unambiguous
    return refs


def test_rows_start_with_bos_and_hold_only_real_document_tokens(toy):
    tok, _, truth = toy
    it = loader(toy)
    most = 0
    for x, y in take(it, 40):  # several epochs of the toy data
        assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1]), "targets are the inputs shifted by one"
        for r in range(B):
            row = x[r].tolist() + [y[r, -1].item()]  # the row of T + 1 tokens
            most = max(most, len(row_documents(row, tok.bos_id, truth)))
    assert most >= 3  # short documents really are packed several to a row
    assert it.epoch >= 2


def test_best_fit_takes_the_largest_document_that_fits_and_crops_the_shortest(toy):
    it = loader(toy, batch_size=2, buffer_size=1)  # refills only when the buffer is empty
    bos = toy[0].bos_id
    it.buffer = sorted((n, 1, 0, 0, i, [bos] + [i] * (n - 1), None) for i, n in enumerate([20, 13, 10, 5, 40, 12]))
    x, y = next(it)
    rows = torch.cat([x, y[:, -1:]], dim=1).tolist()
    # row 1: 20 fits, then 13 (the largest of 13/12/10/5 that fits the 13 left): full without a crop
    assert rows[0] == [bos] + [0] * 19 + [bos] + [1] * 12
    # row 2: 12, 10 and 5 fit one after the other (27 tokens); the 6 left take a crop of 40, the only one left
    assert rows[1] == [bos] + [5] * 11 + [bos] + [2] * 9 + [bos] + [3] * 4 + [bos] + [4] * 5
    assert it.buffer == []


def test_two_ranks_read_disjoint_row_groups_covering_the_data(toy, monkeypatch):
    tok, _, truth = toy
    for world in (2, 3):
        seen = []
        for rank in range(world):
            it = loader(toy, rank=rank, world_size=world)
            read = []
            texts = it._texts
            it._texts = lambda s, g, read=read, texts=texts: read.append((s, g)) or texts(s, g)
            for x, y in take(it, 12):
                for r in range(B):
                    refs = row_documents(x[r].tolist() + [y[r, -1].item()], tok.bos_id, truth)
                    assert all(ref is None or ref[1] % world == rank for ref in refs)
            assert read and all(g % world == rank for _, g in read)
            seen.append(set(read))
        assert all(a.isdisjoint(b) for i, a in enumerate(seen) for b in seen[i + 1:])
        assert set().union(*seen) == {(s, g) for s, n in enumerate(TRAIN_LAYOUT) for g in range(n)}


def test_epochs_are_counted_and_every_row_group_is_read_once_per_epoch(toy):
    it = loader(toy, buffer_size=1)
    read = []
    texts = it._texts
    it._texts = lambda s, g: read.append((s, g)) or texts(s, g)
    assert it.state_dict()["epoch"] == 1
    while it.state_dict()["epoch"] < 3:
        next(it)
    order = [(s, g) for s, n in enumerate(TRAIN_LAYOUT) for g in range(n)]
    assert read[:2 * len(order)] == order + order


@pytest.mark.parametrize("rank, world", [(0, 1), (1, 2)])
def test_a_resumed_loader_continues_exactly_where_the_state_says(toy, rank, world):
    for skip in (0, 1, 4, 9):  # 9 batches cross into the second epoch
        it = loader(toy, rank=rank, world_size=world)
        take(it, skip)
        state = json.loads(json.dumps(it.state_dict()))  # it goes into a JSON checkpoint
        expected = take(it, 6)
        resumed = loader(toy, rank=rank, world_size=world, state=state)
        assert resumed.state_dict() == state
        for (x, y), (rx, ry) in zip(expected, take(resumed, 6)):
            assert torch.equal(x, rx) and torch.equal(y, ry)


def test_a_state_without_buffer_starts_at_its_row_group_and_epoch(toy):
    tok, _, truth = toy
    for world, rank, start in ((1, 0, (1, 1)), (2, 0, (1, 2)), (2, 1, (1, 1))):
        it = loader(toy, rank=rank, world_size=world, buffer_size=1,
                    state={"epoch": 4, "shard": 1, "row_group": 1})
        assert (it.epoch, it.shard, it.row_group) == (4, *start)
        x, y = next(it)
        first = row_documents(x[0].tolist() + [y[0, -1].item()], tok.bos_id, truth)[0]
        assert first[:2] == start  # the first document comes from the row group the state names
        assert it.state_dict()["epoch"] >= 4


def test_a_one_rank_state_resumed_on_two_ranks_deals_its_buffer_and_aligns_to_the_rank(toy):
    it = loader(toy)
    take(it, 3)
    state = it.state_dict()
    docs = [(e, s, g, i) for e, s, g, idx in state["buffer"] for i in idx]
    assert len(docs) > 1
    other = loader(toy, rank=1, world_size=2, state=state)  # a lone state of a 1-rank run is its whole list
    here = (state["epoch"], state["shard"], state["row_group"])
    mine = [(e, s, g) for e in (here[0], here[0] + 1) for s, n in enumerate(TRAIN_LAYOUT) for g in range(1, n, 2)]
    assert (other.epoch, other.shard, other.row_group) == min(p for p in mine if p >= here)
    assert sorted(entry[1:5] for entry in other.buffer) == docs[1::2] and other.holes == ()


def test_validation_yields_the_same_tokens_every_time(toy):
    tok, _, truth = toy
    first = take(loader(toy, split="val"), 8)  # loops over the small val shard
    again = take(loader(toy, split="val"), 8)
    assert all(torch.equal(a, b) for pa_, pb in zip(first, again) for a, b in zip(pa_, pb))
    for x, y in first:
        for r in range(B):
            row_documents(x[r].tolist() + [y[r, -1].item()], tok.bos_id, truth, split="val")
    # 4 ranks but 2 row groups: every rank evaluates on all of it
    wide = take(loader(toy, split="val", rank=3, world_size=4), 8)
    assert all(torch.equal(a, b) for pa_, pb in zip(first, wide) for a, b in zip(pa_, pb))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(alphabet=st.sampled_from(list("alphbetgmxüδZé数 \n\t019.,;:()'_-=")), max_size=300),
       st.integers(1, 8))
def test_cutting_long_texts_keeps_their_first_tokens(toy, text, per_token):
    """The loader cuts long texts before tokenizing: the tokens it keeps must be those of the whole text."""
    tok = toy[0]
    full = tok.encode(text)
    for m in dl.SAFE_CUT.finditer(text):
        part = tok.encode(text[:m.end()])
        assert full[:len(part)] == part
    it = loader(toy, seq_len=7)
    dl_chars, dl.CHARS_PER_TOKEN = dl.CHARS_PER_TOKEN, per_token  # 1: cuts too short, tokenized again whole
    try:
        made = it._tokenize([text, text[::-1]])
        assert [t for t, _, _ in made] == [[tok.bos_id] + ids[:8] for ids in tok.encode([text, text[::-1]])]
        for t, (_, count, end) in zip([text, text[::-1]], made):  # what was counted is exact, up to `end`
            assert count == 1 + len(tok.encode(t[:end])) and (end == len(t) or count >= 9)
    finally:
        dl.CHARS_PER_TOKEN = dl_chars


def test_counting_on_a_long_document_ends_at_its_real_length(toy):
    tok, _, truth = toy
    it = loader(toy, seq_len=7, buffer_size=1)
    dl_chars, dl.CHARS_PER_TOKEN = dl.CHARS_PER_TOKEN, 4  # small pieces: many steps of counting on
    try:
        for text in [t for t in (f"{w} " * 400 for w in ("alpha", "x=1;", "über δ")) if len(tok.encode(t)) > 20]:
            it.buffer = []
            it._add(1, 0, 0, [0], [text])
            assert it.buffer[0][6] is not None  # not known yet
            it._shortest_first()
            assert it.buffer[0][6] is None and it.buffer[0][0] == 1 + len(tok.encode(text))
    finally:
        dl.CHARS_PER_TOKEN = dl_chars


def test_the_crop_takes_the_truly_shortest_long_document(toy):
    """Three documents longer than a row: the one with the fewest tokens is cropped, though it came last and
    its first characters hold the most tokens (the buffer counts only the first few hundred characters)."""
    tok = toy[0]
    texts = ["beta gamma " * 150, "alpha " * 400, "x=1; " * 60]  # sparse and long, sparse and longer, dense
    real = [1 + len(tok.encode(t)) for t in texts]
    it = loader(toy, batch_size=1, buffer_size=1)
    it.buffer = []
    it._add(1, 0, 0, [0, 1, 2], texts)
    assert all(entry[6] is not None for entry in it.buffer)  # no length known yet
    first_counts = {entry[4]: entry[0] for entry in it.buffer}
    shortest = min(range(3), key=lambda i: (real[i], i))
    assert shortest == 2 and first_counts[2] > min(first_counts.values()), (real, first_counts)
    x, y = next(it)
    row = x[0].tolist() + [y[0, -1].item()]
    assert row == [tok.bos_id] + tok.encode(texts[shortest])[:T]
    assert sorted(entry[4] for entry in it.buffer) == [0, 1]  # the other two wait


@pytest.mark.parametrize("kw, message", [
    ({"rank": 2, "world_size": 2}, "rank 2"),
    ({"world_size": 6}, "6 ranks need a shard with at least 6 row groups"),
    ({"dataset": "absent"}, "python -m train.dataset build --from PATH --name absent"),
    ({"split": "test"}, "split must be"),
    ({"state": {"shard": 0}}, "bad dataloader state"),
    ({"state": {"epoch": 1, "shard": 0, "row_group": 0, "buffer": [[1, 7, 0, [0]]]}}, "was the dataset rebuilt"),
    ({"state": {"epoch": 1, "shard": 2, "row_group": 0}}, "shard 2 row group 0, which the train split"),
    ({"state": {"epoch": 3, "shard": 1, "row_group": 3, "buffer": []}}, "shard 1 row group 3, which the train split"),
])
def test_bad_input_is_one_clear_error(toy, kw, message):
    with pytest.raises(UserError, match=re.escape(message)):
        DataLoader(toy[0], B, T, **({"dataset": "toy"} | kw))


def test_a_corrupt_shard_is_one_clear_error(toy, tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    folder = tmp_path / "data" / "broken"
    folder.mkdir(parents=True)
    pq.write_table(pa.table({"text": ["fine"] * 4}), folder / "shard_00000.parquet")
    (folder / "shard_00001.parquet").write_bytes(b"PAR1 truncated")
    with pytest.raises(UserError, match="shard_00001.parquet: not a readable parquet file"):
        DataLoader(toy[0], B, T, split="val", dataset="broken")


@pytest.mark.parametrize("column", [[1, 2, 3], [b"bytes", b"not", b"text"]])
def test_a_text_column_of_other_types_is_one_clear_error(toy, tmp_path, monkeypatch, column):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    folder = tmp_path / "data" / "odd"
    folder.mkdir(parents=True)
    pq.write_table(pa.table({"text": ["fine"] * 3}), folder / "shard_00000.parquet")
    pq.write_table(pa.table({"text": column}), folder / "shard_00001.parquet")
    with pytest.raises(UserError, match=r"shard_00001\.parquet: the 'text' column holds (int64|binary), not strings"):
        DataLoader(toy[0], B, T, split="val", dataset="odd")


def test_a_split_of_empty_documents_is_one_clear_error(toy, tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    folder = tmp_path / "data" / "hollow"
    folder.mkdir(parents=True)
    for i in range(2):
        pq.write_table(pa.table({"text": ["", None, ""]}), folder / f"shard_{i:05d}.parquet", row_group_size=1)
    with pytest.raises(UserError, match="no non-empty document"):
        next(DataLoader(toy[0], B, T, dataset="hollow"))


@pytest.mark.cuda
def test_cuda_batches_match_the_cpu_ones(toy):
    cpu = take(loader(toy), 5)
    it = loader(toy, device="cuda")
    for x, y in cpu:
        cx, cy = next(it)
        assert cx.is_cuda and cy.is_cuda and cx.is_contiguous() and cy.is_contiguous()
        assert torch.equal(cx.cpu(), x) and torch.equal(cy.cpu(), y)
