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
(restoring re-reads and re-tokenizes the row groups those documents came from). If the world size
or rank changed, the buffer is dropped and the new loader starts at the next row group of its own
rank: row-group precision, never a repeated row group.

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
                 rank: int = 0, world_size: int = 1, device="cpu", state: dict | None = None,
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
        self.batch_epoch = 1  # the latest epoch a document of a batch came from (a split read again: > 1)
        self._empty = 0  # row groups read in a row without a single document
        self.epoch, self.shard, self.row_group = self._seek(1, 0, 0)
        if state is not None:
            self._restore(state)

    # -- position --------------------------------------------------------------

    def _seek(self, epoch: int, shard: int, row_group: int) -> tuple[int, int, int]:
        """The first row group of this rank at or after (shard, row_group), wrapping into the next epoch."""
        r, w = self.rank, self.world_size
        row_group += (r - row_group) % w  # the next index that belongs to rank r
        while True:
            if shard >= len(self.paths):
                epoch, shard, row_group = epoch + 1, 0, r
            if row_group < self.num_row_groups[shard]:
                return epoch, shard, row_group
            shard, row_group = shard + 1, r

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

    def _refill(self) -> None:
        """Tokenize the next row group of this rank into the buffer and move on."""
        epoch, shard, row_group = self.epoch, self.shard, self.row_group
        texts = self._texts(shard, row_group)
        indices = [i for i, t in enumerate(texts) if t]  # an empty document would be a lone BOS
        self._add(epoch, shard, row_group, indices, [texts[i] for i in indices])
        self.epoch, self.shard, self.row_group = self._seek(epoch, shard, row_group + self.world_size)
        self._empty = 0 if indices else self._empty + 1
        if self._empty > sum(len(range(self.rank, n, self.world_size)) for n in self.num_row_groups):
            raise UserError(f"the {self.split} split of {self.dataset!r} has no non-empty document for rank "
                            f"{self.rank} of {self.world_size}")

    # -- state -----------------------------------------------------------------

    def state_dict(self) -> dict:
        """Where the next batch comes from: next row group, epoch, and the buffered documents (JSON-able)."""
        return self._resume_point().to_dict()

    def _resume_point(self) -> "ResumePoint":
        return ResumePoint(self.epoch, self.shard, self.row_group, self.rank, self.world_size, list(self.buffer))

    def _restore(self, state: dict) -> None:
        try:
            epoch, shard, row_group = int(state["epoch"]), int(state["shard"]), int(state["row_group"])
            same_layout = (state.get("rank", self.rank), state.get("world_size", self.world_size)) == \
                (self.rank, self.world_size)
            buffered = [(int(e), int(s), int(g), [int(i) for i in idx]) for e, s, g, idx in state.get("buffer", [])]
        except (KeyError, TypeError, ValueError):
            raise UserError(f"bad dataloader state {str(state)[:200]}") from None
        if epoch < 1 or shard < 0 or row_group < 0:
            raise UserError(f"bad dataloader state: epoch {epoch}, shard {shard}, row group {row_group}")
        if not (shard < len(self.paths) and row_group < self.num_row_groups[shard]):  # saved ones are (_seek's)
            raise UserError(f"the dataloader state resumes at shard {shard} row group {row_group}, which the "
                            f"{self.split} split of {self.dataset!r} does not have: was the dataset rebuilt?")
        if same_layout:  # otherwise the documents belong to another rank's share: start clean
            for e, s, g, indices in buffered:
                if not (s < len(self.paths) and g < self.num_row_groups[s]):
                    raise UserError(f"the dataloader state refers to shard {s} row group {g}, which the {self.split} "
                                    f"split of {self.dataset!r} does not have: was the dataset rebuilt?")
                texts = self._texts(s, g)
                if indices and max(indices) >= len(texts):
                    raise UserError(f"the dataloader state refers to document {max(indices)} of shard {s} row group "
                                    f"{g}, which has {len(texts)}: was the dataset rebuilt?")
                self._add(e, s, g, indices, [texts[i] for i in indices])
        self.epoch, self.shard, self.row_group = self._seek(epoch, shard, row_group)

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


class ResumePoint:
    """A loader's position before a batch, kept cheaply (the buffer's entries are immutable tuples: a shallow
    copy of the list is a snapshot); to_dict() is the form saved in checkpoints."""

    def __init__(self, epoch: int, shard: int, row_group: int, rank: int, world_size: int, buffer: list):
        self.epoch, self.shard, self.row_group, self.rank, self.world_size = epoch, shard, row_group, rank, world_size
        self.buffer = buffer

    def to_dict(self) -> dict:
        groups = {}
        for _, epoch, shard, row_group, index, *_ in self.buffer:
            groups.setdefault((epoch, shard, row_group), []).append(index)
        return {"epoch": self.epoch, "shard": self.shard, "row_group": self.row_group, "rank": self.rank,
                "world_size": self.world_size,
                "buffer": [[e, s, g, sorted(idx)] for (e, s, g), idx in sorted(groups.items())]}


class Batch(NamedTuple):
    """One micro-step's rows: inputs, targets, and where the loader stood before them (None: not from a loader)."""
    inputs: torch.Tensor
    targets: torch.Tensor
    resume_point: ResumePoint | None = None
