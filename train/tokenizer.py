"""Byte-level BPE tokenizer: trained with rustbpe on a dataset's training shards, served with tiktoken.

    python -m train.tokenizer train [--dataset NAME] [--vocab-size 32768] [--max-chars N] [--doc-cap N]

Files in $NANOCHAT_BASE_DIR/tokenizer/ (plain text and a weights-only tensor; nothing is pickled):
    tokenizer.tiktoken   one token per line: base64(token bytes) and its id (tiktoken's own format)
    tokenizer.json       the split pattern, the special tokens and their ids, the vocab size
    token_bytes.pt       int32 tensor [vocab_size]: UTF-8 bytes of every token, 0 for special tokens (for bpb)
"""
import base64
import functools
import hashlib
import json
import time
from pathlib import Path

import tiktoken
import torch
from tqdm import tqdm

from model.config import VOCAB_SIZE
from train.dataset import DEFAULT_DATASET, ensure_dataset, open_shard, read_texts, split_shards
from train.errors import Parser, UserError, first_line, run_cli
from train.paths import atomic_write, tokenizer_dir

# GPT-4's split pattern, with numbers split into groups of 1-2 digits (not 1-3): fewer merges
# are spent on number tokens, which a small vocabulary cannot afford.
SPLIT_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|"""
                 r"""\s*[\r\n]|\s+(?!\S)|\s+""")
SPECIAL_TOKENS = ["<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>",
                  "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>"]
BOS = SPECIAL_TOKENS[0]
MIN_VOCAB = 256 + len(SPECIAL_TOKENS)  # every byte, plus the special tokens
FILES = ("tokenizer.tiktoken", "tokenizer.json", "token_bytes.pt")


class Tokenizer:
    """tiktoken underneath; plain text never produces special tokens (encode_ordinary)."""

    def __init__(self, enc: tiktoken.Encoding, token_bytes: torch.Tensor, pattern: str):
        self.enc = enc
        self.pattern = pattern
        self.token_bytes = token_bytes
        self.vocab_size = enc.n_vocab
        self.bos_id = enc.encode_single_token(BOS)
        self.special_ids = {name: enc.encode_single_token(name) for name in SPECIAL_TOKENS}

    @functools.cached_property
    def fingerprint(self) -> str:
        """sha256 of what decides every token id: the split pattern, the merges in rank order, the specials."""
        h = hashlib.sha256(self.pattern.encode())
        for i in range(self.vocab_size - len(SPECIAL_TOKENS)):
            h.update(len(token := self.enc.decode_single_token_bytes(i)).to_bytes(2, "little") + token)
        h.update(json.dumps(self.special_ids, sort_keys=True).encode())
        return h.hexdigest()

    def get_bos_token_id(self) -> int:
        return self.bos_id

    def encode(self, text: str | list[str], prepend_bos: bool = False, num_threads: int = 8):
        """Token ids of one text (a list) or of several (a list of lists, encoded in parallel threads)."""
        if isinstance(text, str):
            ids = self.enc.encode_ordinary(text)
            return [self.bos_id] + ids if prepend_bos else ids
        batch = self.enc.encode_ordinary_batch(list(text), num_threads=num_threads)
        if prepend_bos:
            batch = [[self.bos_id] + ids for ids in batch]
        return batch

    def decode(self, ids) -> str:
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        return self.enc.decode(ids)

    def save(self, folder: Path) -> None:
        """Write the three files, each to a temporary name then renamed (the json, read first, goes last)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        n_ranks = self.vocab_size - len(SPECIAL_TOKENS)
        lines = [base64.b64encode(self.enc.decode_single_token_bytes(i)).decode() + f" {i}\n" for i in range(n_ranks)]
        meta = {"pattern": self.pattern, "special_tokens": self.special_ids, "vocab_size": self.vocab_size}

        with atomic_write(folder / "tokenizer.tiktoken", "w") as f:
            f.write("".join(lines))
        with atomic_write(folder / "token_bytes.pt") as f:
            torch.save(self.token_bytes, f)
        with atomic_write(folder / "tokenizer.json", "w") as f:  # read first on load: written last
            json.dump(meta, f, indent=1)


def make_tokenizer(ranks: dict[bytes, int], pattern: str = SPLIT_PATTERN) -> Tokenizer:
    """A Tokenizer from merge ranks 0..n-1; the special tokens take ids n, n+1, ... (<|bos|> first)."""
    n = len(ranks)
    if sorted(ranks.values()) != list(range(n)):
        raise UserError("the token ranks are not 0..n-1 without gaps")
    specials = {name: n + i for i, name in enumerate(SPECIAL_TOKENS)}
    enc = tiktoken.Encoding(name="nanopretrain", pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials)
    by_id = sorted(ranks, key=ranks.get)
    token_bytes = torch.tensor([len(b) for b in by_id] + [0] * len(specials), dtype=torch.int32)
    return Tokenizer(enc, token_bytes, pattern)


def load_tokenizer(dir: Path | str | None = None) -> Tokenizer:
    """The tokenizer saved in dir (default $NANOCHAT_BASE_DIR/tokenizer), or a one-line error."""
    folder = Path(dir) if dir is not None else tokenizer_dir()
    if not folder.is_dir():
        raise UserError(f"no tokenizer in {folder}: train one with `python -m train.tokenizer train`")
    for name in FILES:
        if not (folder / name).is_file():
            raise UserError(f"the tokenizer in {folder} is incomplete ({name} is missing): "
                            "train it again with `python -m train.tokenizer train`")
    try:
        meta = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
        pattern, specials, vocab_size = meta["pattern"], meta["special_tokens"], int(meta["vocab_size"])
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{folder / 'tokenizer.json'}: not a valid tokenizer description") from None
    if not isinstance(pattern, str):
        raise UserError(f"{folder / 'tokenizer.json'}: not a valid tokenizer description")
    ranks = {}
    path = folder / "tokenizer.tiktoken"
    for lineno, line in enumerate(path.read_text(encoding="ascii", errors="replace").splitlines(), 1):
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError:
            raise UserError(f"{path}:{lineno}: expected 'base64-token rank'") from None
    if not ranks:
        raise UserError(f"{path}: holds no tokens: train the tokenizer again")
    if specials != {name: len(ranks) + i for i, name in enumerate(SPECIAL_TOKENS)}:
        raise UserError(f"{folder / 'tokenizer.json'}: the special tokens do not follow the {len(ranks)} merges")
    try:
        tokenizer = make_tokenizer(ranks, pattern)
    except ValueError as e:  # with ranks checked, tiktoken's only complaint: the split pattern does not parse
        raise UserError(f"{folder / 'tokenizer.json'}: the split pattern does not compile ({first_line(e)})") from None
    try:
        token_bytes = torch.load(folder / "token_bytes.pt", weights_only=True)
    except Exception as e:  # torch raises many kinds for a damaged file
        raise UserError(f"{folder / 'token_bytes.pt'}: cannot load ({type(e).__name__})") from None
    if tokenizer.vocab_size != vocab_size or not torch.equal(token_bytes, tokenizer.token_bytes):
        raise UserError(f"the tokenizer files in {folder} do not agree with each other: train it again")
    return tokenizer


# -----------------------------------------------------------------------------
# Training


def training_texts(dataset: str, max_chars: int, doc_cap: int):
    """Documents of the training shards in order, each cut to doc_cap characters, max_chars in all."""
    chars = 0
    for path in split_shards(dataset, "train"):
        pf = open_shard(path)
        for i in range(pf.num_row_groups):
            for text in read_texts(pf, i, path):
                text = text[:doc_cap]
                chars += len(text)
                yield text
                if chars >= max_chars:
                    return


def train_tokenizer(dataset: str, vocab_size: int = VOCAB_SIZE, max_chars: int = 2_000_000_000, doc_cap: int = 10_000,
                    out_dir: Path | None = None) -> Tokenizer:
    import rustbpe

    if vocab_size < MIN_VOCAB:
        raise UserError(f"--vocab-size must be at least {MIN_VOCAB} (256 bytes + {len(SPECIAL_TOKENS)} special "
                        f"tokens), got {vocab_size}")
    if max_chars < 1 or doc_cap < 1:
        raise UserError("--max-chars and --doc-cap must be positive")
    ensure_dataset(dataset)
    t0 = time.time()
    seen = {"chars": 0, "docs": 0}

    def texts():
        # a bar on stderr, shown only on a terminal (disable=None); the texts are read and counted as they come
        with tqdm(total=max_chars, desc="reading", unit="char", unit_scale=True, disable=None) as bar:
            for text in training_texts(dataset, max_chars, doc_cap):
                seen["chars"] += len(text)
                seen["docs"] += 1
                bar.update(len(text))
                yield text
        # rustbpe computes the merges once it has read everything, and cannot report its progress: say so
        seen["read_at"] = time.time()
        print(f"read {seen['docs']:,} documents ({seen['chars'] / 1e6:.1f}M characters) in {time.time() - t0:.1f}s; "
              f"computing {vocab_size - MIN_VOCAB:,} merges (no progress shown)...", flush=True)

    bpe = rustbpe.Tokenizer()
    bpe.train_from_iterator(texts(), vocab_size - len(SPECIAL_TOKENS), pattern=SPLIT_PATTERN)
    print(f"merges computed in {time.time() - seen['read_at']:.1f}s")
    tokenizer = make_tokenizer({bytes(token): rank for token, rank in bpe.get_mergeable_ranks()})
    out_dir = Path(out_dir) if out_dir is not None else tokenizer_dir()
    try:
        tokenizer.save(out_dir)
    except OSError as e:
        raise UserError(f"cannot write the tokenizer to {out_dir}: {e.strerror or e}") from None
    print(f"trained on {seen['docs']:,} documents ({seen['chars'] / 1e6:.1f}M characters) of {dataset!r} "
          f"in {time.time() - t0:.1f}s: vocab {tokenizer.vocab_size:,}, saved to {out_dir}")
    if tokenizer.vocab_size < vocab_size:
        print(f"note: the corpus only supported {tokenizer.vocab_size - MIN_VOCAB:,} merges, "
              f"so the vocab is {tokenizer.vocab_size:,} rather than {vocab_size:,}")
    # How well it compresses held-out text (and that held-out text survives the round trip).
    val = split_shards(dataset, "val")[0]
    sample = "".join(read_texts(open_shard(val), 0, val))[:1_000_000]
    ids = tokenizer.encode(sample)
    assert tokenizer.decode(ids) == sample, "the tokenizer does not round-trip the validation text"
    print(f"validation text: {len(sample.encode()) / max(1, len(ids)):.2f} bytes per token")
    return tokenizer


def main(argv=None) -> None:
    parser = Parser(prog="python -m train.tokenizer", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    t = sub.add_parser("train", help="train the BPE tokenizer on a dataset's training shards")
    t.add_argument("--dataset", default=DEFAULT_DATASET, help="folder of shards under $NANOCHAT_BASE_DIR/data/")
    t.add_argument("--vocab-size", type=int, default=VOCAB_SIZE, help="including the special tokens")
    t.add_argument("--max-chars", type=int, default=2_000_000_000, help="characters of training text to use")
    t.add_argument("--doc-cap", type=int, default=10_000, help="characters kept from each document")
    t.add_argument("--out", type=Path, default=None, help="output folder (default $NANOCHAT_BASE_DIR/tokenizer)")
    i = sub.add_parser("info", help="show a saved tokenizer")
    i.add_argument("--dir", type=Path, default=None, help="tokenizer folder (default $NANOCHAT_BASE_DIR/tokenizer)")
    i.add_argument("text", nargs="?", default="Hello world! 12345", help="text to show encoded")
    args = parser.parse_args(argv)
    if args.command == "train":
        train_tokenizer(args.dataset, args.vocab_size, args.max_chars, args.doc_cap, args.out)
    else:
        tok = load_tokenizer(args.dir)
        ids = tok.encode(args.text)
        print(f"vocab {tok.vocab_size:,}, <|bos|> = {tok.bos_id}, {len(SPECIAL_TOKENS)} special tokens")
        print(f"{args.text!r} -> {ids} -> {[tok.decode([i]) for i in ids]}")


if __name__ == "__main__":
    run_cli(main)
