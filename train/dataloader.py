"""Token rows for pretraining: BOS-aligned best-fit packing, rank sharding, exact resume.

Every row holds max_seq_len + 1 tokens and starts with BOS at the start of a document. Documents
(each with its BOS) wait in a buffer; to fill a row we repeatedly take the largest buffered
document that fits the space left, and when none fits we crop the shortest one (by its real length in
tokens, ties to the oldest) to fill the row exactly. So no padding is ever trained on and every token is
document text; the price is the cropped tails.

A document longer than a row is tokenized only as far as a row needs (cut before tokenizing, at a point where
the tokens before the cut are those of the whole text). Its real length matters only when every buffered
document is such a long one and the shortest is to be cropped; then the long ones are counted on, piece by
safe piece, only until the shortest is certain.

Sharding: row groups are the unit. Rank r of W reads row groups r, r+W, r+2W, ... of every shard of
its split, shard after shard, and starts over forever, counting epochs (from 1).

Resume is exact: state_dict() names the next row group to read plus the documents waiting in the
buffer (by epoch, shard, row group and index), and the buffer is kept in a canonical order, so a
loader built with state=that dict yields exactly the batches this one would have yielded next
(restoring re-reads and re-tokenizes the row groups those documents came from). The state, JSON-able:

    {"epoch": e, "shard": s, "row_group": g,   the next row group this rank reads with its stride
     "rank": r, "world_size": W,               who saved it
     "holes": [[e, s, g], ...],                row groups before that which no rank has read yet: this rank
                                               reads them first, in this order (absent in old states: none)
     "buffer": [[e, s, g, [index, ...]], ...]} the documents waiting in the buffer, by where they come from

Resharding: a checkpoint holds every rank's state (the list, index = rank), and state=that list resumes on
any number of ranks (one rank's dict of another layout stands for its whole world: only a 1-rank run's can
be resharded that way). With the same layout each rank takes its own state (exact, as above); otherwise each
new rank works out its share of the old ranks' position from the list alone (reshard(): the same on every
rank, no communication), so that over all new ranks no document before the checkpoint is read again and
none after it is skipped:
  - the old buffers' documents, sorted, are dealt in turn: document j to new rank j % W' (re-read from
    their row groups);
  - the frontier is the furthest old position: no rank has read any row group at or after it, and each new
    rank goes on from there with its own stride;
  - below it, the row groups an old rank had not reached yet, with the holes the old ranks still owed, are
    the new holes: sorted and dealt in turn, each read before anything past the frontier.
Holes mean the same in any world: row groups nobody has read, owed by whoever holds the state. So the unread
row groups of a list of states are its holes plus every rank's own row groups from its position on, and
a resharded run can be saved and resharded again. Positions compare as (epoch, shard, row group), so a rank
that has wrapped into the next epoch is simply further on.

The validation split ("val") always starts from its beginning, so every val loader yields the same
tokens; when it has too few row groups to give every rank one, every rank reads all of it.
"""
import bisect
import os
import re
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import torch

from train.dataset import DEFAULT_DATASET, open_shard, read_texts, split_shards
from train.errors import UserError

# Where a long text may be cut before tokenizing without changing its first tokens: right after an ASCII
# letter that is followed by an ASCII non-letter. The split pattern never puts a letter and the
# character after its run of letters in one piece, so the pieces (and tokens) before the cut are
# exactly those of the whole text.
SAFE_CUT = re.compile(r"[A-Za-z](?=[\x00-\x40\x5b-\x60\x7b-\x7f])")
CHARS_PER_TOKEN = 8  # a cut this many characters per needed token in rarely leaves too few tokens


def cut_text(text: str, min_chars: int, search: int = 256) -> str:
    """text cut at the first safe point after min_chars characters (text itself if there is none nearby)."""
    if len(text) <= min_chars:
        return text
    m = SAFE_CUT.search(text, min_chars - 1, min_chars + search)
    return text[:m.end()] if m else text


class DataLoader:
    """Iterator of (inputs, targets), each int64 [batch_size, seq_len] on device; targets are inputs shifted by one.

    Buffer entries are tuples (length, epoch, shard, row_group, index, tokens, rest): sorted, they put
    documents in order of length and then of arrival, which is what makes best-fit choices reproducible on
    resume. A document's tokens are kept only up to seq_len + 2: any longer one can never fit a row and only
    ever gets cropped. For such a long one `length` may be a lower bound, the tokens counted so far, with
    rest = (text, characters counted) to count on when its real length decides the crop; else rest is None.
    """

    def __init__(self, tokenizer, batch_size: int, seq_len: int, split: str = "train", dataset: str = DEFAULT_DATASET,
                 rank: int = 0, world_size: int = 1, device="cpu", state: dict | list[dict] | None = None,
                 buffer_size: int = 1000, num_threads: int | None = None):
        if batch_size < 1 or seq_len < 1 or buffer_size < 1:
            raise UserError(f"batch size, sequence length and buffer size must be positive "
                            f"(got {batch_size}, {seq_len}, {buffer_size})")
        if not 0 <= rank < world_size:
            raise UserError(f"rank {rank} is not in a world of size {world_size}")
        self.tokenizer, self.bos = tokenizer, tokenizer.get_bos_token_id()
        self.batch_size, self.seq_len, self.capacity = batch_size, seq_len, seq_len + 1
        self.split, self.dataset = split, dataset
        self.device = torch.device(device)
        self.buffer_size = buffer_size
        self.num_threads = num_threads or min(8, os.cpu_count() or 1)
        self.paths = split_shards(dataset, split)
        self.num_row_groups = [open_shard(p).metadata.num_row_groups for p in self.paths]
        self._open = (None, None)  # (shard index, ParquetFile): the shard being read

        # Every rank gets a row group iff some shard has world_size of them; decided the same way on all ranks.
        self.rank, self.world_size = rank, world_size
        if max(self.num_row_groups) < world_size:
            if split != "val":
                raise UserError(f"{world_size} ranks need a shard with at least {world_size} row groups, but the "
                                f"{split} shards of {dataset!r} have at most {max(self.num_row_groups)}: use fewer "
                                "ranks, or rebuild the dataset with a smaller --docs-per-row-group")
            self.rank, self.world_size = 0, 1  # too small to split: every rank evaluates on all of it
        self.buffer = []
        self.holes = ()  # row groups to read before the next one of the stride: see "Resharding" above
        self.batch_epoch = 1  # the latest epoch a document of a batch came from (a split read again: > 1)
        self._empty = 0  # row groups read in a row without a single document
        self.epoch, self.shard, self.row_group = self._seek(1, 0, 0)
        if state is not None:
            self._restore(self._own_state(state))

    # -- position --------------------------------------------------------------

    def _seek(self, epoch: int, shard: int, row_group: int) -> tuple[int, int, int]:
        """The first row group of this rank at or after (shard, row_group), wrapping into the next epoch."""
        return seek(self.num_row_groups, self.rank, self.world_size, (epoch, shard, row_group))

    def _texts(self, shard: int, row_group: int) -> list[str]:
        if self._open[0] != shard:
            self._open = (shard, open_shard(self.paths[shard]))
        return read_texts(self._open[1], row_group, self.paths[shard])

    def _tokenize(self, texts: list[str]) -> list[tuple[list[int], int, int]]:
        """Per text: (BOS + its first tokens, at most capacity + 1 of them; the number of tokens, BOS included, of
        its first `end` characters; end). end < len(text): the text is longer than a row, its length not known yet.

        Long texts are cut (safely) before tokenizing: only the tokens a row can use are made here.
        A cut text that came out too short to tell is tokenized again whole.
        """
        keep = self.capacity + 1
        cuts = [cut_text(t, keep * CHARS_PER_TOKEN) for t in texts]
        tokens = self.tokenizer.encode(cuts, num_threads=self.num_threads)
        redo = [i for i, (cut, ids) in enumerate(zip(cuts, tokens)) if len(ids) < keep and len(cut) < len(texts[i])]
        for i, ids in zip(redo, self.tokenizer.encode([texts[i] for i in redo], num_threads=self.num_threads)):
            tokens[i], cuts[i] = ids, texts[i]
        return [([self.bos] + ids[:keep - 1], 1 + len(ids), len(cut)) for ids, cut in zip(tokens, cuts)]

    def _add(self, epoch: int, shard: int, row_group: int, indices, texts: list[str]) -> None:
        for i, text, (tokens, count, end) in zip(indices, texts, self._tokenize(texts)):
            rest = (text, end) if end < len(text) else None
            self.buffer.append((count, epoch, shard, row_group, i, tokens, rest))
        self.buffer.sort()

    def _shortest_first(self) -> None:
        """Until buffer[0] is the truly shortest document: while the first is one whose length is only known to be
        at least its count, count on through its next piece (at a safe cut, so counts add up exactly) and move it
        to its new place. Only as much of a long text is tokenized as it takes to tell it is not the shortest."""
        while self.buffer[0][6] is not None:
            count, epoch, shard, row_group, index, tokens, (text, end) = self.buffer.pop(0)
            piece = cut_text(text[end:], self.capacity * CHARS_PER_TOKEN)
            count += len(self.tokenizer.encode(piece))
            end += len(piece)
            bisect.insort(self.buffer, (count, epoch, shard, row_group, index, tokens,
                                        (text, end) if end < len(text) else None))

    def _read(self, epoch: int, shard: int, row_group: int) -> bool:
        """Tokenize a row group's documents into the buffer; False if it has none."""
        texts = self._texts(shard, row_group)
        indices = [i for i, t in enumerate(texts) if t]  # an empty document would be a lone BOS
        self._add(epoch, shard, row_group, indices, [texts[i] for i in indices])
        return bool(indices)

    def _refill(self) -> None:
        """Tokenize the next row group of this rank into the buffer and move on: its holes first."""
        if self.holes:  # unread when the run was resharded: before anything past the old ranks' frontier
            hole, self.holes = self.holes[0], self.holes[1:]
            self._read(*hole)
            return
        epoch, shard, row_group = self.epoch, self.shard, self.row_group
        found = self._read(epoch, shard, row_group)
        self.epoch, self.shard, self.row_group = self._seek(epoch, shard, row_group + self.world_size)
        self._empty = 0 if found else self._empty + 1
        if self._empty > sum(len(range(self.rank, n, self.world_size)) for n in self.num_row_groups):
            raise UserError(f"the {self.split} split of {self.dataset!r} has no non-empty document for rank "
                            f"{self.rank} of {self.world_size}")

    # -- state -----------------------------------------------------------------

    def state_dict(self) -> dict:
        """Where the next batch comes from: next row group, epoch, and the buffered documents (JSON-able)."""
        return self._resume_point().to_dict()

    def _resume_point(self) -> "ResumePoint":
        return ResumePoint(self.epoch, self.shard, self.row_group, self.rank, self.world_size, list(self.buffer),
                           self.holes)

    def _own_state(self, state: dict | list[dict]) -> "SavedState":
        """This rank's state, from its own state dict or from every old rank's (the list a checkpoint holds)."""
        if isinstance(state, dict):  # one rank's: without rank and world size it is taken to be this rank's
            mine = self._parse(state, self.rank, self.world_size)
            if (mine.rank, mine.world_size) == (self.rank, self.world_size):
                return mine
            states = [mine]  # another layout: it must be a whole world by itself
        elif isinstance(state, list) and state:
            states = [self._parse(s, i, len(state)) for i, s in enumerate(state)]
        else:
            raise UserError(f"bad dataloader state {str(state)[:200]}: a state dict or a non-empty list of them")
        world = states[0].world_size
        if any(s.world_size != world for s in states):
            raise UserError(f"the dataloader states mix world sizes {sorted({s.world_size for s in states})}: "
                            "they are not one checkpoint's")
        ranks = sorted(s.rank for s in states)
        if ranks != list(range(world)):
            missing = sorted(set(range(world)) - set(ranks))
            raise UserError(f"the dataloader states of a {world}-rank run hold ranks {ranks}"
                            f"{f' (missing {missing})' if missing else ''}: resuming on another number of ranks "
                            "needs every rank's state, each once")
        if world > max(self.num_row_groups):  # such a run could not have read this dataset
            raise UserError(f"the dataloader states come from {world} ranks, but no {self.split} shard of "
                            f"{self.dataset!r} has {world} row groups: was the dataset rebuilt?")
        if world == self.world_size:
            return next(s for s in states if s.rank == self.rank)
        return reshard(states, self.rank, self.world_size, self.num_row_groups)

    def _parse(self, state: dict, rank: int, world_size: int) -> "SavedState":
        """A state dict checked against the dataset; rank and world size default to the given ones (old states)."""
        try:
            position = (int(state["epoch"]), int(state["shard"]), int(state["row_group"]))
            rank, world_size = int(state.get("rank", rank)), int(state.get("world_size", world_size))
            holes = [tuple(int(x) for x in h) for h in state.get("holes", [])]
            buffer = [(int(e), int(s), int(g), [int(i) for i in idx]) for e, s, g, idx in state.get("buffer", [])]
        except (AttributeError, KeyError, TypeError, ValueError):
            raise UserError(f"bad dataloader state {str(state)[:200]}") from None
        if position[0] < 1 or position[1] < 0 or position[2] < 0 or not 0 <= rank < world_size:
            raise UserError(f"bad dataloader state: epoch, shard, row group {position}, rank {rank} of {world_size}")
        if not self._exists(position):  # saved positions are _seek's: real row groups
            raise UserError(f"the dataloader state resumes at shard {position[1]} row group {position[2]}, which the "
                            f"{self.split} split of {self.dataset!r} does not have: was the dataset rebuilt?")
        for where in holes + [b[:3] for b in buffer]:
            if len(where) != 3 or where[0] < 1 or not self._exists(where):
                raise UserError(f"the dataloader state refers to (epoch, shard, row group) {where}, which the "
                                f"{self.split} split of {self.dataset!r} does not have: was the dataset rebuilt?")
        return SavedState(position, rank, world_size, holes, buffer)

    def _exists(self, where: tuple) -> bool:
        return 0 <= where[1] < len(self.paths) and 0 <= where[2] < self.num_row_groups[where[1]]

    def _restore(self, state: "SavedState") -> None:
        for e, s, g, indices in state.buffer:
            texts = self._texts(s, g)
            if indices and max(indices) >= len(texts):
                raise UserError(f"the dataloader state refers to document {max(indices)} of shard {s} row group "
                                f"{g}, which has {len(texts)}: was the dataset rebuilt?")
            self._add(e, s, g, indices, [texts[i] for i in indices])
        self.holes = tuple(state.holes)
        self.epoch, self.shard, self.row_group = self._seek(*state.position)

    # -- batches ---------------------------------------------------------------

    def __iter__(self):
        return self

    @property
    def passes_done(self) -> int:
        """Passes over the split read before the latest document put in a batch (its epoch - 1): > 0 once a batch
        repeats data. Not "passes whose every document was used": a long document that is never the shortest can
        stay buffered for the whole run, and that count would never move."""
        return self.batch_epoch - 1

    def batches(self) -> Iterator["Batch"]:
        """next_batch(), endlessly."""
        while True:
            yield self.next_batch()

    def next_batch(self) -> "Batch":
        """The next batch and where it came from: a loader built with state=its resume_point.to_dict() yields it
        again."""
        point = self._resume_point()
        x, y = next(self)
        return Batch(x, y, point)

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        B, cap, buffer = self.batch_size, self.capacity, self.buffer
        rows = np.empty((B, cap), dtype=np.int64)
        for row in rows:
            pos = 0
            while pos < cap:
                while len(buffer) < self.buffer_size:
                    self._refill()
                space = cap - pos
                i = bisect.bisect_left(buffer, (space + 1,)) - 1  # the longest document that fits ...
                if i >= 0:
                    i = bisect.bisect_left(buffer, (buffer[i][0],))  # ... the oldest of that length
                    take = buffer[i][0]
                else:  # nothing fits: crop the shortest (and oldest) to fill the row
                    self._shortest_first()
                    i, take = 0, space
                _, epoch, _, _, _, tokens, _ = buffer.pop(i)
                self.batch_epoch = max(self.batch_epoch, epoch)
                row[pos:pos + take] = tokens if take == len(tokens) else tokens[:take]
                pos += take
        return self._to_device(rows)

    def _to_device(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """inputs and targets side by side in one fresh (pinned, on CUDA) tensor: a single non-blocking copy.

        A fresh pinned tensor per batch is safe with non-blocking copies: torch's pinned-memory cache only
        reuses it once the copy that reads it has finished. The host-side copies go through numpy
        (much faster than torch's strided copy for these small int64 blocks).
        """
        cuda = self.device.type == "cuda"
        both = torch.empty((2, self.batch_size, self.seq_len), dtype=torch.long, pin_memory=cuda)
        view = both.numpy()
        view[0] = rows[:, :-1]
        view[1] = rows[:, 1:]
        if self.device.type != "cpu":
            both = both.to(self.device, non_blocking=cuda)
        return both[0], both[1]


def seek(num_row_groups: list[int], rank: int, world_size: int, position: tuple) -> tuple[int, int, int]:
    """The first row group (epoch, shard, row group) of rank `rank` of `world_size` at or after `position`, in
    shards with num_row_groups row groups each, wrapping into the next epoch."""
    epoch, shard, row_group = position
    row_group += (rank - row_group) % world_size  # the next index that belongs to the rank
    while True:
        if shard >= len(num_row_groups):
            epoch, shard, row_group = epoch + 1, 0, rank
        if row_group < num_row_groups[shard]:
            return epoch, shard, row_group
        shard, row_group = shard + 1, rank


class SavedState(NamedTuple):
    """A state dict, parsed: position = (epoch, shard, row group); holes [(epoch, shard, row group)];
    buffer [(epoch, shard, row group, [index])]."""
    position: tuple
    rank: int
    world_size: int
    holes: list
    buffer: list


def reshard(states: list[SavedState], rank: int, world_size: int, num_row_groups: list[int]) -> SavedState:
    """Rank `rank` of `world_size`'s share of where a run on another number of ranks stood (states: every old
    rank's, one world), as the state it resumes from. The same on every rank: see "Resharding" above."""
    old = states[0].world_size
    positions = [seek(num_row_groups, s.rank, old, s.position) for s in states]
    frontier = max(positions)  # no rank has read a row group from here on
    holes = [h for s in states for h in s.holes]
    for s, pos in zip(states, positions):
        while pos < frontier:  # a row group of this old rank's that it had not reached
            holes.append(pos)
            pos = seek(num_row_groups, s.rank, old, (pos[0], pos[1], pos[2] + old))
    docs = sorted((e, s, g, i) for state in states for e, s, g, indices in state.buffer for i in indices)
    mine = {}
    for e, s, g, i in docs[rank::world_size]:
        mine.setdefault((e, s, g), []).append(i)
    return SavedState(seek(num_row_groups, rank, world_size, frontier), rank, world_size,
                      sorted(holes)[rank::world_size], [(*where, idx) for where, idx in sorted(mine.items())])


class ResumePoint:
    """A loader's position before a batch, kept cheaply (the buffer's entries are immutable tuples: a shallow
    copy of the list is a snapshot; holes are a tuple); to_dict() is the form saved in checkpoints."""

    def __init__(self, epoch: int, shard: int, row_group: int, rank: int, world_size: int, buffer: list,
                 holes: tuple = ()):
        self.epoch, self.shard, self.row_group, self.rank, self.world_size = epoch, shard, row_group, rank, world_size
        self.buffer, self.holes = buffer, holes

    def to_dict(self) -> dict:
        groups = {}
        for _, epoch, shard, row_group, index, *_ in self.buffer:
            groups.setdefault((epoch, shard, row_group), []).append(index)
        return {"epoch": self.epoch, "shard": self.shard, "row_group": self.row_group, "rank": self.rank,
                "world_size": self.world_size, "holes": [list(h) for h in self.holes],
                "buffer": [[e, s, g, sorted(idx)] for (e, s, g), idx in sorted(groups.items())]}


class Batch(NamedTuple):
    """One micro-step's rows: inputs, targets, and where the loader stood before them (None: not from a loader)."""
    inputs: torch.Tensor
    targets: torch.Tensor
    resume_point: ResumePoint | None = None
