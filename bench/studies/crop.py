"""How much document text the best-fit packing crops away: `python -m bench.studies.crop [--batches 200]`.

Runs the train loader at B x T on a dataset (default: the stdlib corpus, built and tokenized in the base dir if
missing) and counts, over the documents the batches took, the tokens they had against the tokens the rows
used. Also the loader's speed. Prints one JSON line.
"""
import json
import time

from train.errors import Parser, run_cli


def main(argv=None) -> None:
    p = Parser(prog="bench.studies.crop", description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="pystdlib")
    p.add_argument("--batches", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=2048)
    args = p.parse_args(argv)
    from train.dataloader import DataLoader
    from train.dataset import build, list_shards, open_shard, read_texts
    from train.tokenizer import load_tokenizer, tokenizer_dir, train_tokenizer
    if args.dataset == "pystdlib" and not list_shards("pystdlib"):
        build()
    tok = load_tokenizer() if tokenizer_dir().exists() else train_tokenizer(args.dataset)
    loader = DataLoader(tok, args.batch_size, args.seq_len, dataset=args.dataset)
    taken, counting = [], {"on": True}

    class Recording(list):  # the documents that leave the buffer for a row
        def pop(self, i):
            entry = super().pop(i)
            if counting["on"]:
                taken.append(entry[2:5])  # shard, row group, index
            return entry
    loader.buffer = Recording(loader.buffer)
    reorder = loader._shortest_first

    def shortest_first():  # moves entries within the buffer: not taken
        counting["on"] = False
        reorder()
        counting["on"] = True
    loader._shortest_first = shortest_first
    t0 = time.perf_counter()
    for _ in range(args.batches):
        next(loader)
    seconds = time.perf_counter() - t0
    used = args.batches * args.batch_size * (args.seq_len + 1)
    texts = {}
    for shard, row_group, _ in set(taken):
        if (shard, row_group) not in texts:
            texts[shard, row_group] = read_texts(open_shard(loader.paths[shard]), row_group, loader.paths[shard])
    had = sum(1 + len(tok.encode(texts[s, g][i])) for s, g, i in taken)
    print(json.dumps({"dataset": args.dataset, "batches": args.batches, "batch_size": args.batch_size,
                      "seq_len": args.seq_len, "documents": len(taken), "document_tokens": had, "used_tokens": used,
                      "cropped_fraction": 1 - used / had, "tokens_per_s": used / seconds}))


if __name__ == "__main__":
    run_cli(main)
