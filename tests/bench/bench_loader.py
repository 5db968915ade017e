"""
bench_loader.py: tokens per second of pretrain.py's loader in one process (a benchmark, not a test).

The loader reads parquet row groups, encodes them with bpe.py and packs rows best-fit. This times
it end to end, batches of device_batch_size x max_seq_len tokens as the training loop asks for
them, with 0 (in-process), 1, 2... tokenizer worker processes. The per-process number to beat is
what one GPU consumes: about 1M tok/s for a d20 run on 8xH100 (REFERENCE §5: 11.2B tokens in
about 3 h) is ~130K tok/s per process, and since best-fit cropping discards about a third of the
encoded tokens at T=2048, the encoder must produce ~200K tok/s.

The corpus is parquet shards (`--data=DIR`, with `--tokenizer=PATH`) if given, otherwise
bench_bpe.py's synthetic Zipf text written to shards of 1,024-document row groups like the real
ones, with a tokenizer trained on a slice of it.

  python tests/bench/bench_loader.py --mb=24 --vocab_size=8192 --workers=0,1,2 --seconds=15
"""
import os
import sys
import tempfile
import time

import pyarrow as pa
import pyarrow.parquet as pq

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
sys.path.insert(0, HERE)
import bpe
import pretrain
from bench_bpe import synthetic_docs


def write_shards(out_dir, mb, docs_per_group=1024, groups_per_shard=2):
    """Synthetic text as shard_*.parquet files of 1,024-doc row groups; returns their paths."""
    docs = list(synthetic_docs(mb * 1_000_000, doc_chars=4_000))
    per_shard = docs_per_group * groups_per_shard
    paths = []
    for i in range(0, len(docs), per_shard):
        path = os.path.join(out_dir, pretrain.shard_name(len(paths)))
        pq.write_table(pa.table({"text": docs[i:i + per_shard]}), path, row_group_size=docs_per_group,
                       compression="zstd")
        paths.append(path)
    return paths


def measure(paths, tok, workers, B, T, seconds):
    """Tokens of packed rows per wall second and per CPU second of this (the training) process,
    and the seconds to the first batch, with `workers` tokenizer processes."""
    counts = pretrain.check_shards(paths, refetch=False)
    t0 = time.time()
    loader = pretrain.packed_batches(paths, counts, tok, B, T, workers=workers)
    next(loader)
    first = time.time() - t0
    t0, cpu0, batches = time.time(), time.process_time(), 0
    while time.time() - t0 < seconds:
        next(loader)
        batches += 1
    tokens = batches * B * T
    wall, cpu = time.time() - t0, time.process_time() - cpu0
    loader.close()
    return tokens / wall, tokens / cpu, first


def main(argv):
    args = {"data": "", "tokenizer": "", "mb": 24, "vocab_size": 8192, "train_mb": 4,
            "workers": "0,1,2", "seconds": 15.0, "device_batch_size": 8, "max_seq_len": 2048}
    for arg in argv:
        name, _, text = arg[2:].partition("=")
        if name not in args:
            sys.exit(f"unknown option {arg!r}; options: {', '.join(args)}")
        args[name] = type(args[name])(text)
    with tempfile.TemporaryDirectory() as tmp:
        if args["data"]:
            paths = bpe.shard_paths(args["data"])
            tok = bpe.Tokenizer.load(args["tokenizer"])
        else:
            paths = write_shards(tmp, args["mb"])
            t0 = time.time()
            tok = bpe.Tokenizer.train(synthetic_docs(args["train_mb"] * 1_000_000, seed=1), args["vocab_size"])
            print(f"corpus: {args['mb']} MB synthetic text in {len(paths)} shards; tokenizer vocab "
                  f"{tok.vocab_size} trained on {args['train_mb']} MB in {time.time() - t0:.1f}s")
        B, T = args["device_batch_size"], args["max_seq_len"]
        print(f"batches of {B} x {T} tokens, {args['seconds']:.0f}s per setting, {os.cpu_count()} cpus")
        for workers in [int(w) for w in args["workers"].split(",")]:
            wall, cpu, first = measure(paths, tok, workers, B, T, args["seconds"])
            print(f"workers {workers}: {wall:>10,.0f} tok/s per process, {cpu:>10,.0f} tok per CPU-second "
                  f"of the training process (first batch after {first:.1f}s)", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
