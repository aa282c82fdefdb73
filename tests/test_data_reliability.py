"""The dataset's fingerprint (each shard's sha256, stored beside the shards when they are made) and the resume
check on it: a rebuilt dataset (same shard names, other documents) is refused unless --allow-data-change."""
import hashlib
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from model.config import GPTConfig
from train import dataset, resume
from train.errors import UserError

CONFIG = GPTConfig(n_layer=2, n_head=2, n_kv_head=2, n_embd=64)


@pytest.fixture
def src(tmp_path, monkeypatch):
    """A corpus of 12 small text files, in a temporary base dir."""
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    folder = tmp_path / "src"
    folder.mkdir()
    for i in range(12):
        (folder / f"doc{i:02d}.txt").write_text(f"document {i} " * (i + 1))
    return folder


def build(src, seed=42):
    """shard_00000 and shard_00001 (training, 4 and 5 documents), shard_00002 (validation, 3)."""
    return dataset.build([src], "mine", docs_per_row_group=2, docs_per_shard=5, val_fraction=0.25, seed=seed)


def saved_meta(digests):
    """A checkpoint's meta as train.pretrain's save() writes it (digests=None: written before they were)."""
    data = {"name": "mine", "train_shards": [p.name for p in dataset.train_shards("mine")]}
    if digests is not None:
        data["digests"] = digests
    return {"step": 5, "model_config": CONFIG.to_dict(), "user_config": {}, "world_size": 1, "dataloader": [],
            "loop_state": {}, "tokenizer": "tok", "dataset": data}


def check(meta, allow=False):
    """resume.check_meta against the dataset as it is now, the way train.pretrain calls it."""
    args = SimpleNamespace(dataset="mine", allow_data_change=allow)
    shards = [p.name for p in dataset.split_shards("mine", "train")]
    return resume.check_meta(meta, args, SimpleNamespace(config=CONFIG),
                             SimpleNamespace(fingerprint="tok", vocab_size=CONFIG.vocab_size), shards,
                             Path("ckpt"))


def test_a_dataset_rebuilt_with_another_seed_is_refused_on_resume(src):
    shards = build(src)
    recorded = dataset.dataset_fingerprint("mine")
    assert recorded == {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in shards}
    meta = saved_meta(recorded)
    assert check(meta) is False  # the same data
    names = [p.name for p in shards]
    assert [p.name for p in build(src, seed=7)] == names  # the same shard names, other documents in each
    with pytest.raises(UserError, match=r"data differs from checkpoint step 5's.*shard_00000\.parquet.*"
                                        r"rebuilt.*--allow-data-change") as e:
        check(meta)
    assert "\n" not in str(e.value)
    assert check(meta, allow=True) is True
    assert check(saved_meta(None)) is False  # a checkpoint from before the digests resumes as before


def test_a_training_shard_after_the_old_validation_shard_is_refused(src):
    """The old validation shard would become training data, and the new val split other documents."""
    shards = build(src)
    meta = saved_meta(dataset.dataset_fingerprint("mine"))
    shutil.copy(shards[0], shards[0].with_name(dataset.shard_name(3)))  # by hand: shard_00002 is no longer val
    with pytest.raises(UserError, match=r"validation shard shard_00003\.parquet.*rebuilt"):
        check(meta)


def test_the_digests_are_taken_once_and_a_folder_without_them_gets_them(src, monkeypatch):
    shards = build(src)
    store = shards[0].parent / dataset.DIGESTS
    assert set(json.loads(store.read_text())) == {p.name for p in shards}  # stored by the build
    hashed = []
    sha256 = dataset.file_sha256
    monkeypatch.setattr(dataset, "file_sha256", lambda path: hashed.append(path.name) or sha256(path))
    first = dataset.dataset_fingerprint("mine")
    assert hashed == []  # read from the store, nothing hashed
    store.unlink()  # shards made before the digests were stored: hashed once, then stored
    assert dataset.dataset_fingerprint("mine") == first and len(hashed) == 3
    assert dataset.dataset_fingerprint("mine") == first and len(hashed) == 3 and store.is_file()
    shards[1].write_bytes(shards[0].read_bytes())  # replaced by hand: its size or mtime tell
    assert dataset.dataset_fingerprint("mine")[shards[1].name] == first[shards[0].name]
    assert hashed[3:] == [shards[1].name]
