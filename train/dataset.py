"""Pretraining data: folders of parquet shards with a `text` column, one folder per dataset.

    $NANOCHAT_BASE_DIR/data/NAME/shard_00000.parquet ... shard_NNNNN.parquet   (sorted; the last is validation)

Two ways to get shards:
    python -m train.dataset download --num-shards 8 [--name climbmix|fineweb-edu]   pre-shuffled shards from the hub
    python -m train.dataset build [--from PATH ...] [--name NAME]                     the same format from local text

Without --from, build makes `pystdlib` from the standard library's .py files, cut at top-level definitions into
documents of about DOC_CHARS characters (split_python; --whole-files: a document per file, as --from does).

A shard only ever appears under its final name once it is complete: downloads and builds write to a
temporary name and rename, so an interrupted or failed transfer never leaves a half shard behind.
Beside the shards, digests.json holds each one's sha256 (taken once, when it is made or downloaded): what a
checkpoint records of its data (dataset_fingerprint), so that a rebuilt dataset is told from the one it trained on.
"""
import hashlib
import io
import json
import os
import random
import re
import shutil
import sysconfig
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import NamedTuple
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from train.download import DownloadError, fetch_with_retries
from train.errors import Parser, UserError, run_cli
from train.paths import atomic_write, data_dir


class HubDataset(NamedTuple):
    repo: str  # Hugging Face dataset repository
    num_shards: int  # shard_00000 ... shard_{num_shards-1}; the last one is the validation shard
    url_pattern: str  # where shard {index} lives; {base} is the repository's file root


HUB_URL = "https://huggingface.co/datasets/{repo}/resolve/main"
DATASETS = {
    "climbmix": HubDataset("karpathy/climbmix-400b-shuffle", 6543, "{base}/shard_{index:05d}.parquet"),
    "fineweb-edu": HubDataset("karpathy/fineweb-edu-100b-shuffle", 1823, "{base}/shard_{index:05d}.parquet"),
}
DEFAULT_DATASET = "climbmix"  # what pretraining, the tokenizer and a download read when not told otherwise
DEFAULT_DOWNLOAD_SHARDS = 8  # training shards fetched when a run finds none (~2B characters: enough for a tokenizer)
LOCAL_EXTENSIONS = (".txt", ".md", ".py", ".jsonl", ".parquet")
DIGESTS = "digests.json"  # beside the shards: {shard name: {"bytes", "mtime_ns", "sha256"}}
DOC_CHARS = 2000  # the size, in characters, that split_python joins pieces of a .py file up to: a web page's size


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.parquet"


def list_shards(name: str) -> list[Path]:
    """The dataset's complete shards, sorted; the last one is the validation split."""
    folder = data_dir(name)
    return sorted(folder.glob("*.parquet")) if folder.is_dir() else []


def train_shards(name: str) -> list[Path]:
    return list_shards(name)[:-1]


def val_shards(name: str) -> list[Path]:
    return list_shards(name)[-1:]


def split_shards(name: str, split: str) -> list[Path]:
    """train or val shards, or a one-line error saying how to get them."""
    if split not in ("train", "val"):
        raise UserError(f"split must be 'train' or 'val', got {split!r}")
    shards = list_shards(name)
    if len(shards) < 2:
        raise UserError(missing_message(name, len(shards)))
    return shards[:-1] if split == "train" else shards[-1:]


def missing_message(name: str, found: int = 0) -> str:
    where = data_dir(name)
    have = "no shards" if found == 0 else "only one shard (it would be the validation split)"
    if name in DATASETS:
        how = f"`python -m train.dataset download --name {name} --num-shards N`"
    elif name == "pystdlib":
        how = "`python -m train.dataset build`"
    else:
        how = f"`python -m train.dataset build --from PATH --name {name}`"
    return f"dataset {name!r} has {have} in {where}: get them with {how}"


def ensure_dataset(name: str, num_shards: int | None = None) -> list[Path]:
    """The dataset's shards, downloading hub shards that are missing (num_shards training shards, default 8).

    Local datasets cannot be fetched: a UserError says how to build them.
    """
    shards = list_shards(name)
    if name in DATASETS and (len(shards) < 2 or num_shards is not None):
        shards = download(name, num_shards or DEFAULT_DOWNLOAD_SHARDS)  # complete shards are skipped
    if len(shards) < 2:
        raise UserError(missing_message(name, len(shards)))
    return shards


def open_shard(path: Path) -> pq.ParquetFile:
    """A shard opened for reading, or a one-line error if it is not a parquet file with a text column."""
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"{path}: not a readable parquet file ({str(e).splitlines()[0]})") from None
    if "text" not in pf.schema_arrow.names:
        raise UserError(f"{path}: parquet file has no 'text' column (columns: {pf.schema_arrow.names})")
    kind = pf.schema_arrow.field("text").type
    if not is_text_type(kind.value_type if pa.types.is_dictionary(kind) else kind):
        raise UserError(f"{path}: the 'text' column holds {kind}, not strings")
    return pf


def is_text_type(kind: pa.DataType) -> bool:
    """Strings, or nulls only (a column of None: empty documents)."""
    string_view = getattr(pa.types, "is_string_view", lambda kind: False)  # pyarrow >= 16
    return pa.types.is_string(kind) or pa.types.is_large_string(kind) or string_view(kind) or pa.types.is_null(kind)


def read_texts(pf: pq.ParquetFile, row_group: int, path: Path) -> list[str]:
    """The text column of one row group of the shard at path (None entries become empty strings)."""
    try:
        texts = pf.read_row_group(row_group, columns=["text"]).column("text").to_pylist()
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"{path}: corrupt parquet row group {row_group} ({str(e).splitlines()[0]})") from None
    return [t or "" for t in texts]


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 23):
                h.update(chunk)
        return h.hexdigest()
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e})") from None


_HASHED: dict[tuple, str] = {}  # (path, size, mtime_ns) -> sha256, for this process
_UNSTORABLE: set[Path] = set()  # digest files this process could not write (said once)


def shard_digests(folder: Path) -> dict[str, str]:
    """{shard name: sha256 of its bytes} of every shard in folder, read from its digests.json. A shard the file
    does not know at its size and mtime (a folder made before the digests were kept, a shard put there by hand)
    is hashed, and the file rewritten: each shard is hashed once, not at every start."""
    store = folder / DIGESTS
    try:
        stored = json.loads(store.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        stored = {}
    stored = stored if isinstance(stored, dict) else {}
    known = {}
    for path in sorted(folder.glob("*.parquet")):
        stat = path.stat()
        entry = {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        old = stored.get(path.name)
        same = isinstance(old, dict) and isinstance(old.get("sha256"), str) and old.items() >= entry.items()
        key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)  # hashed once per process, stored or not
        if not same and key not in _HASHED:
            _HASHED[key] = file_sha256(path)
        known[path.name] = old if same else entry | {"sha256": _HASHED[key]}
    if known != stored:
        try:
            with atomic_write(store, "w") as f:
                json.dump(known, f, indent=1)
        except OSError as e:  # a read-only folder: correct all the same, hashed again by each new process
            if store not in _UNSTORABLE:
                _UNSTORABLE.add(store)
                print(f"note: cannot store the shard digests in {store} ({e.strerror or e}): each run hashes the "
                      "shards once")
    return {name: entry["sha256"] for name, entry in known.items()}


def dataset_fingerprint(name: str) -> dict[str, str]:
    """What a checkpoint records of its data: {shard name: sha256} of every shard of the dataset, sorted, the last
    being the validation split ({} without shards). Cheap: the digests were taken when the shards were made."""
    folder = data_dir(name)
    return shard_digests(folder) if folder.is_dir() else {}


# -----------------------------------------------------------------------------
# Download from the hub


def is_complete_parquet(path: Path) -> bool:
    """A parquet file starts and ends with the magic bytes PAR1 and has a readable footer."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
            f.seek(-4, os.SEEK_END)
            tail = f.read(4)
        if head != b"PAR1" or tail != b"PAR1":
            return False
        pq.read_metadata(path)
        return True
    except (OSError, pa.ArrowException):
        return False


def download(name: str, num_shards: int, base_url: str | None = None, workers: int = 8, retries: int = 5,
             backoff: float = 2.0, timeout: float = 30.0) -> list[Path]:
    """Fetch the first num_shards training shards of a hub dataset plus its validation shard (the hub's last).

    Shards already complete on disk are skipped. Each shard gets `retries` attempts, waiting
    backoff * 2^k seconds between them. Once one shard has failed for good the remaining ones are
    not started (the network is most likely down); rerunning the command resumes.
    """
    import requests  # noqa: F401  (fail early and clearly if it is missing)
    from tqdm import tqdm

    if name not in DATASETS:
        raise UserError(f"{name!r} is not a hub dataset (known: {', '.join(DATASETS)}); "
                        f"make local shards with `python -m train.dataset build --from PATH --name {name}`")
    hub = DATASETS[name]
    if num_shards == -1 or num_shards > hub.num_shards - 1:
        num_shards = hub.num_shards - 1
    if num_shards < 1:
        raise UserError(f"--num-shards must be at least 1 (or -1 for all), got {num_shards}")
    if retries < 1:
        raise UserError(f"--retries must be at least 1, got {retries}")
    base = (base_url or os.environ.get("NANOCHAT_DATA_URL") or HUB_URL.format(repo=hub.repo)).rstrip("/")
    folder = data_dir(name)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {folder}: {e.strerror or e}") from None
    indices = list(range(num_shards)) + [hub.num_shards - 1]
    todo = [i for i in indices if not is_complete_parquet(folder / shard_name(i))]
    print(f"{name}: {len(indices) - len(todo)} of {len(indices)} shards already in {folder}, "
          f"downloading {len(todo)} from {base}")
    stop = threading.Event()

    def one(index: int) -> None:
        path, url = folder / shard_name(index), hub.url_pattern.format(base=base, index=index)
        try:
            fetch_with_retries(url, path, is_complete_parquet, "parquet file", retries, backoff, timeout, stop=stop)
        except DownloadError:
            stop.set()  # the network is most likely down: start no more shards
            raise

    failures = []
    with ThreadPoolExecutor(max(1, workers)) as pool, tqdm(total=len(todo), unit="shard", disable=None) as bar:
        futures = [pool.submit(one, i) for i in todo]
        for future in as_completed(futures):
            try:
                future.result()
            except DownloadError as e:
                failures.append(str(e))
            bar.update(1)
    if failures:
        missing = sum(not (folder / shard_name(i)).exists() for i in indices)
        raise UserError(f"download failed: {failures[0]}; {missing} of {len(indices)} shards are missing, "
                        "rerun the command to resume")
    shard_digests(folder)  # while the new shards are likely still in the page cache
    return list_shards(name)


# -----------------------------------------------------------------------------
# Build from local text


def stdlib_sources() -> list[Path]:
    return [Path(sysconfig.get_paths()["stdlib"])]


def find_files(sources: list[Path], extensions: tuple[str, ...] = LOCAL_EXTENSIONS) -> list[Path]:
    """Every usable file under the sources, in a stable order; folders are walked recursively."""
    files = []
    for src in sources:
        src = Path(src)
        if src.is_file():
            if src.suffix not in LOCAL_EXTENSIONS:
                raise UserError(f"{src}: unsupported file type (use {', '.join(LOCAL_EXTENSIONS)})")
            files.append(src)
        elif src.is_dir():
            for root, dirs, names in os.walk(src):
                # hidden folders (.git, ...) and installed packages are not part of a corpus
                dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in ("site-packages", "__pycache__"))
                files += [Path(root) / n for n in sorted(names) if n.endswith(extensions) and not n.startswith(".")]
        else:
            raise UserError(f"{src}: no such file or folder")
    return files


DEFINITION = re.compile(r"@|def\s|class\s|async\s+def\s")  # at column 0: a top-level definition starts


def split_python(text: str, target: int = DOC_CHARS) -> list[str]:
    """A Python source cut at top-level definitions into documents of about `target` characters; joined, they give
    the text back exactly.

    Why: whole files make poor documents. The standard library's files average 18K characters, a row of a few
    hundred tokens keeps only a file's start (the packing crops the rest), so a short run reads every file's start
    and then reads them again. Web text, what pretraining expects, comes in pages of a few thousand characters.

    A piece starts at each line at column 0 that opens a `def`, `class`, `async def` or decorator (a decorated
    definition is one piece, the column-0 comments right above it included); what comes before the first (the
    module's docstring and imports) is a piece too. A piece over 2 x target (a big class, a long table) is cut again
    where a blank line is followed by a line at its shallowest indentation (a class's methods). Consecutive pieces
    are then joined while they fit in target. Lines are told by their endings only, no parsing (files that do not
    compile split the same way), so a column-0 `def` inside a string is a boundary too: harmless, nothing is lost.
    """
    lines = io.StringIO(text, newline="").readlines()  # "\n", "\r\n" and "\r" endings, kept as they are
    depth = [len(line) - len(line.lstrip()) for line in lines]
    starts, decorated = [0], False
    for i, line in enumerate(lines):
        if DEFINITION.match(line):
            if not decorated and i > starts[-1]:
                j = i
                while j - 1 > starts[-1] and lines[j - 1].startswith("#"):  # its comments come with it
                    j -= 1
                starts.append(j)
            decorated = line.startswith("@")
    bounds, pieces = starts + [len(lines)], []
    for a, b in zip(bounds, bounds[1:]):
        cuts = [a]
        if sum(map(len, lines[a:b])) > 2 * target:
            level = min((depth[i] for i in range(a + 1, b) if lines[i].strip()), default=0)
            cuts += [i for i in range(a + 2, b) if not lines[i - 1].strip() and lines[i].strip() and depth[i] <= level]
        pieces += ["".join(lines[c:d]) for c, d in zip(cuts, cuts[1:] + [b])]
    docs = []
    for piece in pieces:
        if docs and (len(docs[-1]) + len(piece) <= target or not docs[-1].strip()):
            docs[-1] += piece  # (a blank start, never a document alone, goes with what follows)
        else:
            docs.append(piece)
    return docs


def read_documents(path: Path, split_py: bool = False) -> Iterator[str]:
    """The documents in one file: the whole file (.txt/.md/.py; with split_py a .py file cut by split_python), one
    per line (.jsonl), one per row (.parquet)."""
    try:
        if path.suffix == ".parquet":
            pf = open_shard(path)
            for i in range(pf.num_row_groups):
                yield from (t for t in read_texts(pf, i, path) if t)
        elif path.suffix == ".jsonl":
            with open(path, encoding="utf-8", errors="replace") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        text = json.loads(line)["text"]
                    except (ValueError, KeyError, TypeError):
                        raise UserError(f"{path}:{lineno}: expected a JSON object with a 'text' field") from None
                    if not isinstance(text, str):
                        raise UserError(f"{path}:{lineno}: the 'text' field is not a string")
                    try:  # JSON can spell a lone surrogate ("\ud800"), which no UTF-8 shard can hold
                        text.encode("utf-8")
                    except UnicodeEncodeError as e:
                        raise UserError(f"{path}:{lineno}: the 'text' field is not valid Unicode (a lone surrogate "
                                        f"{text[e.start]!r} at character {e.start})") from None
                    if text:
                        yield text
        else:
            text = path.read_text(encoding="utf-8", errors="replace")
            if text.strip():
                yield from split_python(text) if split_py and path.suffix == ".py" else [text]
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e})") from None


def write_shard(path: Path, docs: list[str], docs_per_row_group: int) -> None:
    """One parquet shard, row groups of docs_per_row_group documents, written atomically."""
    schema = pa.schema([("text", pa.string())])
    # the hub shards' settings: zstd, no dictionary (documents rarely repeat), no statistics (unused for text)
    with atomic_write(path) as f, pq.ParquetWriter(f, schema, compression="zstd", use_dictionary=False,
                                                   write_statistics=False) as writer:
        for i in range(0, len(docs), docs_per_row_group):
            writer.write_table(pa.table({"text": docs[i:i + docs_per_row_group]}, schema=schema),
                               row_group_size=docs_per_row_group)


def split_off(groups: list[list[str]], n_val: int) -> tuple[list[str], list[str]]:
    """(train, val) documents: whole groups (a split .py file's pieces; any other document alone) from the end held
    out until val has n_val documents or more (so at most one file's pieces more); when that would leave no
    training document (one file), the documents themselves are split."""
    val, cut = [], len(groups)
    while len(val) < n_val and cut > 1:
        cut -= 1
        val = groups[cut] + val
    train = [doc for group in groups[:cut] for doc in group]
    if len(val) < n_val:  # whole files cannot make up val and leave one for train
        docs = train + val
        train, val = docs[:len(docs) - n_val], docs[len(docs) - n_val:]
    return train, val


def build(sources: list[Path] | None = None, name: str | None = None, docs_per_row_group: int = 128,
          docs_per_shard: int = 50_000, val_fraction: float = 0.1, seed: int = 42,
          split_py: bool | None = None) -> list[Path]:
    """Make shards from local text: shuffled deterministically, the last shard holding the validation documents.

    With no sources the corpus is the Python standard library's source and the name is `pystdlib`.
    split_py: .py files cut into documents by split_python (default: for the standard library, not with sources).
    The whole corpus is read into memory (it is shuffled as a whole); the old folder is replaced at the end.
    """
    from tqdm import tqdm

    extensions = LOCAL_EXTENSIONS
    if split_py is None:
        split_py = sources is None
    if sources is None:  # the standard library's own .py files: a corpus every machine has
        sources, name, extensions = stdlib_sources(), name or "pystdlib", (".py",)
    if not name:
        raise UserError("--name is required with --from")
    if docs_per_row_group < 1 or docs_per_shard < 1:
        raise UserError("--docs-per-row-group and --docs-per-shard must be positive")
    if not 0 < val_fraction < 1:
        raise UserError(f"--val-fraction must lie strictly between 0 and 1, got {val_fraction}")
    out = data_dir(name)
    files = find_files(sources, extensions)
    if not files:
        raise UserError(f"no {'/'.join(extensions)} files in {', '.join(map(str, sources))}")
    groups = []  # the pieces of one split file stay together: val holds whole files, never a piece of train's
    for path in tqdm(files, desc="reading", unit="file", disable=None):
        found = list(read_documents(path, split_py))
        groups += [found] if split_py and path.suffix == ".py" and found else [[doc] for doc in found]
    docs = [doc for group in groups for doc in group]
    if len(docs) < 2:
        raise UserError(f"the corpus in {', '.join(map(str, sources))} has {len(docs)} non-empty document(s); "
                        "need at least 2 (one is held out for validation)")
    rng = random.Random(seed)
    rng.shuffle(groups)
    n_val = min(max(1, round(val_fraction * len(docs))), docs_per_shard, len(docs) - 1)
    train, val = split_off(groups, n_val)
    if split_py:
        rng.shuffle(train)  # a file's pieces spread over the run like any other documents
    chunks = [train[i:i + docs_per_shard] for i in range(0, len(train), docs_per_shard)] + [val]

    staging = out.parent / f".{name}.building-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir(parents=True)
        for index, chunk in enumerate(tqdm(chunks, desc="writing", unit="shard", disable=None)):
            write_shard(staging / shard_name(index), chunk, docs_per_row_group)
        shard_digests(staging)  # the folder comes into place with its digests
        old = out.parent / f".{name}.old-{os.getpid()}"
        if out.exists():
            os.replace(out, old)
        os.replace(staging, out)
        shutil.rmtree(old, ignore_errors=True)
    except OSError as e:  # read-only or full base dir: nothing half-written stays
        raise UserError(f"cannot write the dataset to {out.parent}: {e.strerror or e}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    chars = sum(map(len, docs))
    print(f"{name}: {len(docs):,} documents ({chars / 1e6:.1f}M characters) from {len(files):,} files -> "
          f"{len(chunks) - 1} training shard(s) + 1 validation shard ({len(val):,} documents) in {out}")
    return list_shards(name)


# -----------------------------------------------------------------------------
# Command line


def main(argv=None) -> None:
    parser = Parser(prog="python -m train.dataset", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    d = sub.add_parser("download", help="fetch pre-shuffled shards from the Hugging Face hub")
    d.add_argument("--num-shards", type=int, default=DEFAULT_DOWNLOAD_SHARDS,
                   help="training shards to fetch (-1 = all); the validation shard always comes too")
    d.add_argument("--name", default=DEFAULT_DATASET, choices=sorted(DATASETS))
    d.add_argument("--base-url", default=None,
                   help="where the shard files live (default: $NANOCHAT_DATA_URL, else the hub)")
    d.add_argument("--workers", type=int, default=8, help="parallel downloads")
    d.add_argument("--retries", type=int, default=5, help="attempts per shard")
    d.add_argument("--backoff", type=float, default=2.0, help="seconds before the first retry, doubling after")
    d.add_argument("--timeout", type=float, default=30.0, help="seconds without data before an attempt fails")
    b = sub.add_parser("build", help="make shards from local text files (default: the Python standard library)")
    b.add_argument("--from", dest="sources", type=Path, nargs="+", action="extend", default=None,
                   help="files or folders (.txt/.md/.py: one document each, .py split with --split-py; .jsonl: a "
                        "'text' field per line; .parquet: a 'text' column)")
    b.add_argument("--name", default=None, help="dataset name (default: pystdlib without --from)")
    b.add_argument("--docs-per-row-group", type=int, default=128, help="row group size (the unit of rank sharding)")
    b.add_argument("--docs-per-shard", type=int, default=50_000)
    b.add_argument("--val-fraction", type=float, default=0.1, help="documents held out in the validation shard")
    b.add_argument("--seed", type=int, default=42, help="seed of the shuffle")
    split = b.add_mutually_exclusive_group()
    split.add_argument("--split-py", dest="split_py", action="store_const", const=True, default=None,
                       help=".py files cut at top-level definitions into documents of about "
                            f"{DOC_CHARS:,} characters (the default without --from)")
    split.add_argument("--whole-files", dest="split_py", action="store_const", const=False,
                       help="every .py file one document (the default with --from)")
    args = parser.parse_args(argv)
    if args.command == "download":
        download(args.name, args.num_shards, base_url=args.base_url, workers=args.workers, retries=args.retries,
                 backoff=args.backoff, timeout=args.timeout)
    else:
        build(args.sources, args.name, docs_per_row_group=args.docs_per_row_group,
              docs_per_shard=args.docs_per_shard, val_fraction=args.val_fraction, seed=args.seed,
              split_py=args.split_py)


if __name__ == "__main__":
    run_cli(main)
