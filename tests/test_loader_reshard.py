"""train.dataloader resharding: a run saved on W ranks resumes on W' ranks, over all of them together reading every
document before the checkpoint never again and every one after it once (issue #27)."""
import json
import re
import sysconfig
from collections import Counter
from pathlib import Path

import pytest
import torch

from train.dataloader import DataLoader, SavedState, reshard
from train.dataset import build, open_shard, read_texts, train_shards
from train.errors import UserError
from train.tokenizer import train_tokenizer

T = 384  # a few of the documents fit a row whole, most are cropped
LAYOUT = [8, 8, 3]  # training row groups per shard: what the build below makes


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A dataset 'reshard' built from two stdlib packages, 2 documents a row group, and a 300-token tokenizer;
    epoch_docs(e) is every (epoch, shard, row group, index) of a non-empty training document."""
    base = tmp_path_factory.mktemp("nanochat")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NANOCHAT_BASE_DIR", str(base))
        build([stdlib / "json", stdlib / "html"], "reshard", docs_per_row_group=2, docs_per_shard=16, split_py=True,
              seed=41)  # a seed whose validation files leave this layout
        tok = train_tokenizer("reshard", vocab_size=300)
        docs = [(s, g, i) for s, path in enumerate(train_shards("reshard"))
                for g in range(open_shard(path).metadata.num_row_groups)
                for i, text in enumerate(read_texts(open_shard(path), g, path)) if text]
    return tok, base, lambda e: {(e, *doc) for doc in docs}


@pytest.fixture(autouse=True)
def base_dir(data, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(data[1]))


class Consumed(list):
    """A loader's buffer that counts the documents taken out of it for good, whole or cropped: popped and not put
    back (counting on a long document pops it and puts it back)."""

    def __init__(self, entries, counter):
        super().__init__(entries)
        self.counter = counter

    def pop(self, i=-1):
        entry = super().pop(i)
        self.counter[entry[1:5]] += 1
        return entry

    def insert(self, i, entry):
        self.counter[entry[1:5]] -= 1
        super().insert(i, entry)


def world(data, size, counter, state=None):
    """Every rank's loader of a run on `size` ranks, counting what they consume into counter."""
    loaders = [DataLoader(data[0], 1, T, dataset="reshard", rank=r, world_size=size, buffer_size=4, state=state)
               for r in range(size)]
    for it in loaders:
        it.buffer = Consumed(it.buffer, counter)
    assert [it.num_row_groups for it in loaders[:1]] == [LAYOUT]
    return loaders


def lockstep(loaders, n):
    """n batches on every rank, as a run's steps take them."""
    return [[next(it) for it in loaders] for _ in range(n)]


def save(loaders):
    """What a checkpoint holds: every rank's state, through JSON."""
    return json.loads(json.dumps([it.state_dict() for it in loaders]))


def finish(loaders, epoch):
    """In lockstep until no rank still has a row group of `epoch` (or before) to read."""
    for _ in range(200):
        if all(it.epoch > epoch and all(h[0] > epoch for h in it.holes) for it in loaders):
            return
        lockstep(loaders, 1)
    raise AssertionError("the epoch never ends")


def assert_each_once(data, counter, loaders, epochs):
    """Every document of these epochs consumed exactly once, or still waiting in one final buffer (a long one
    can wait for good: it is cropped only once it is the shortest)."""
    seen = Counter({doc: n for doc, n in counter.items() if doc[0] in epochs and n})
    seen.update(entry[1:5] for it in loaders for entry in it.buffer if entry[1] in epochs)
    expected = set().union(*map(data[2], epochs))
    assert set(seen) <= expected
    assert not [doc for doc, n in seen.items() if n > 1], "documents read twice"
    assert not expected - set(seen), "documents skipped"
    assert sum(seen.values()) == len(expected)


@pytest.mark.parametrize("sizes, steps", [
    ((2, 1), 3), ((1, 2), 3), ((2, 3), 2), ((3, 2), 2), ((2, 1, 2), 2), ((3, 1, 3), 1), ((1, 3, 2), 2)])
def test_resharded_runs_read_every_document_of_the_epoch_once(data, sizes, steps):
    counter = Counter()
    loaders = world(data, sizes[0], counter)
    for size in sizes[1:]:
        lockstep(loaders, steps)
        states = save(loaders)
        loaders = world(data, size, counter, state=states)
        assert save(loaders) == [it.state_dict() for it in loaders]  # what it resumes from is JSON-able
    finish(loaders, 1)
    assert_each_once(data, counter, loaders, {1})


@pytest.mark.parametrize("old, new", [(2, 3), (3, 2), (2, 1)])
def test_a_rank_already_in_the_next_epoch_is_further_on(data, old, new):
    """Saved where one old rank has wrapped into epoch 2 and another still reads epoch 1."""
    counter = Counter()
    loaders = world(data, old, counter)
    while len({it.epoch for it in loaders}) == 1:
        lockstep(loaders, 1)
    loaders = world(data, new, counter, state=save(loaders))
    assert any(h[0] == 1 for it in loaders for h in it.holes)  # an epoch-1 row group left behind, owed
    finish(loaders, 2)
    assert_each_once(data, counter, loaders, {1, 2})


def test_holes_are_read_first_in_their_order(data):
    old = world(data, 3, Counter())
    lockstep(old, 2)
    for it in world(data, 2, Counter(), state=save(old)):
        holes, read, texts = list(it.holes), [], it._texts
        it._texts = lambda s, g, texts=texts, read=read: read.append((s, g)) or texts(s, g)
        while it.holes:
            next(it)
        assert len(holes) > 1 and read[:len(holes)] == [h[1:] for h in holes]


def test_holes_and_dealt_buffers_resume_exactly_on_the_same_layout(data):
    """A resharded run saved before it has read its holes: resumed on as many ranks (list or own state) it
    yields bit for bit the batches it would have yielded."""
    old = world(data, 3, Counter())
    lockstep(old, 2)
    new = world(data, 2, Counter(), state=save(old))
    lockstep(new, 1)
    states = save(new)
    assert any(s["holes"] for s in states) and all(s["buffer"] for s in states)
    expected = lockstep(new, 6)
    for state in (states, states[1]):  # the list, or one rank's own dict
        again = [DataLoader(data[0], 1, T, dataset="reshard", rank=r, world_size=2, buffer_size=4,
                            state=state if isinstance(state, list) else states[r]) for r in range(2)]
        for batches, more in zip(expected, lockstep(again, 6)):
            assert all(torch.equal(a, b) for (x, y), (rx, ry) in zip(batches, more) for a, b in ((x, rx), (y, ry)))


def test_the_frontier_holes_and_buffers_are_dealt_in_turn():
    """3 ranks on shards of 8, 8 and 3 row groups: rank 0 is furthest on, in epoch 2; rank 1 still owes a hole."""
    states = [SavedState((2, 0, 0), 0, 3, [], [(1, 2, 0, [1])]),
              SavedState((1, 1, 7), 1, 3, [(1, 0, 4)], [(1, 1, 4, [0, 1])]),
              SavedState((1, 2, 2), 2, 3, [], [])]
    # unread below (2, 0, 0): rank 1's (1, 1, 7), (1, 2, 1); rank 2's (1, 2, 2); and the hole (1, 0, 4)
    holes = [(1, 0, 4), (1, 1, 7), (1, 2, 1), (1, 2, 2)]
    docs = [(1, 1, 4, 0), (1, 1, 4, 1), (1, 2, 0, 1)]
    for rank, world_size, position in ((0, 2, (2, 0, 0)), (1, 2, (2, 0, 1)), (0, 1, (2, 0, 0)), (2, 5, (2, 0, 2))):
        mine = reshard(states, rank, world_size, LAYOUT)
        assert mine.position == position and mine.holes == holes[rank::world_size]
        assert [(*where, i) for *where, idx in mine.buffer for i in idx] == docs[rank::world_size]


def test_old_states_without_holes_still_load(data):
    loaders = world(data, 2, Counter())
    lockstep(loaders, 2)
    states = save(loaders)
    old = [{k: v for k, v in s.items() if k != "holes"} for s in states]  # saved before holes existed
    for rank, size in ((1, 2), (0, 1)):
        again = DataLoader(data[0], 1, T, dataset="reshard", rank=rank, world_size=size, state=old)
        assert again.state_dict() == DataLoader(data[0], 1, T, dataset="reshard", rank=rank, world_size=size,
                                                state=states).state_dict()


STATE = {"epoch": 1, "shard": 0, "row_group": 0, "buffer": []}


@pytest.mark.parametrize("state, message", [
    ([], "a state dict or a non-empty list"),
    ([STATE | {"rank": 0, "world_size": 2}, STATE | {"rank": 1, "world_size": 3}], "mix world sizes [2, 3]"),
    ([STATE | {"rank": 0, "world_size": 2}, STATE | {"rank": 0, "world_size": 2}], "ranks [0, 0] (missing [1])"),
    ([STATE | {"rank": 0, "world_size": 3}, STATE | {"rank": 2, "world_size": 3}], "ranks [0, 2] (missing [1])"),
    (STATE | {"rank": 1, "world_size": 2}, "a 2-rank run hold ranks [1] (missing [0])"),
    ([STATE, STATE | {"rank": 1, "holes": [[1, 4, 0]]}], "(epoch, shard, row group) (1, 4, 0), which the train"),
    ([STATE, STATE | {"rank": 1, "holes": [[1, 0]]}], "(epoch, shard, row group) (1, 0)"),
    ([STATE | {"rank": r, "world_size": 9} for r in range(9)], "from 9 ranks, but no train shard"),
])
def test_inconsistent_lists_are_one_clear_error(data, state, message):
    with pytest.raises(UserError, match=re.escape(message)) as e:
        DataLoader(data[0], 1, T, dataset="reshard", world_size=3, state=state)
    assert "\n" not in str(e.value)
