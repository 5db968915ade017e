"""
bench_bpe.py: speed of bpe.py (a benchmark, not a unit test).

Reports, for one corpus size and vocab: training wall time (chunk counting and merging) and peak
memory, then encode throughput in MB/s single-process and with worker processes, next to the
throughput of the regex split alone (the floor any encoder with this pattern pays).

The corpus is parquet text (`--data=DIR`, shard_*.parquet, `text` column) if given, otherwise
synthetic English-like text: words drawn from a Zipf distribution over a made-up lexicon, with
numbers, punctuation, code-like lines and some non-Latin text, generated deterministically.

  python tests/bench/bench_bpe.py --mb=20 --vocab_size=8192 --workers=2
"""
import multiprocessing
import os
import resource
import sys
import tempfile
import time

import numpy as np
import regex

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import bpe

SYLLABLES = ["th", "e", "an", "in", "er", "on", "re", "at", "st", "ou", "al", "ing", "ed", "is",
             "or", "ly", "ti", "ve", "co", "pr", "ma", "de", "li", "ra", "ne", "so", "ch", "ex", "qu"]
NON_LATIN = ["дом", "мир", "вода", "книга", "東京", "日本語", "学生", "학교", "사람", "مرحبا", "كتاب"]
EXTRAS = ["\n", "\n\n", ".", ",", ";", ":", "!", "?", " (", ")", " \"", "'s", " 2026", " 3.14",
          " $", "%", " --", "\n    ", " = ", "()", "[0]", " #", "\t"]


def synthetic_docs(n_chars, seed=0, lexicon=400_000, doc_chars=4_000):
    """Yield documents (str) until n_chars characters have been produced."""
    rng = np.random.default_rng(seed)
    lens = rng.integers(1, 6, size=lexicon)
    words = ["".join(rng.choice(SYLLABLES, size=k)) for k in lens]
    words[:len(NON_LATIN)] = NON_LATIN   # non-Latin words are also frequent enough to merge
    cdf = np.cumsum(1.0 / np.arange(1, lexicon + 1))   # Zipf, exponent 1
    cdf /= cdf[-1]
    made = 0
    while made < n_chars:
        picks = np.searchsorted(cdf, rng.random(doc_chars // 6))
        extra = rng.random(picks.size)
        parts = []
        for w, x in zip(picks, extra):
            if x < 0.05:
                parts.append(" " + str(int(x * 1e7)))
            elif x < 0.25:
                parts.append(EXTRAS[int(x * 1000) % len(EXTRAS)])
            parts.append((" " if x > 0.1 else "") + words[w])
        doc = "".join(parts)
        made += len(doc)
        yield doc


def parquet_docs(data_dir, n_chars):
    return bpe.iter_training_text(bpe.shard_paths(data_dir), n_chars)


def corpus(args):
    n = int(args["mb"] * 1e6)
    return parquet_docs(args["data"], n) if args["data"] else synthetic_docs(n)


def clocks():
    """(wall, CPU of this process + its reaped children) in seconds. On a shared machine the CPU
    time is the steadier figure; both are reported."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.time(), time.process_time() + children.ru_utime + children.ru_stime


def since(start):
    wall, cpu = clocks()
    return wall - start[0], cpu - start[1]


def train_job(args, out_path, queue):
    """Runs in a fresh child; the text is made first, so neither its making nor its memory is
    counted: peak memory is reported as the growth of ru_maxrss during training."""
    docs = list(corpus(args))
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = clocks()
    chunks = bpe.count_chunks(docs, args["workers"])
    count = since(start)
    start = clocks()
    merges = bpe.train_merges(chunks, args["vocab_size"] - 256 - len(bpe.SPECIAL_TOKENS))
    merge = since(start)
    bpe.Tokenizer(merges).save(out_path)
    queue.put({"unique_chunks": len(chunks), "count": count, "merge": merge,
               "rss_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024,
               "worker_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024})


def rate(fn, mb, cpu=True):
    """'X MB/s wall (Y MB per CPU-second)' for one call of fn(). Workers still alive are not in
    the CPU time, so cpu=False reports wall only."""
    start = clocks()
    fn()
    wall, cpu_s = since(start)
    return f"{mb / wall:.1f} MB/s wall" + (f" ({mb / cpu_s:.1f} MB per CPU-second)" if cpu else "")


def secs(pair):
    return f"{pair[0]:.1f} s wall ({pair[1]:.1f} s CPU)"


if __name__ == "__main__":
    args = bpe.parse_args(sys.argv[1:], {"mb": 20.0, "vocab_size": 8192, "workers": 2,
                                         "encode_mb": 10.0, "data": ""})
    print(f"bench_bpe: {args}  ({os.cpu_count()} cpus, load average {os.getloadavg()[0]:.1f})", flush=True)
    path = os.path.join(tempfile.mkdtemp(), "tokenizer.json")
    queue = multiprocessing.Queue()
    job = multiprocessing.Process(target=train_job, args=(args, path, queue))
    job.start()
    train = queue.get()
    job.join()
    tok = bpe.Tokenizer.load(path)

    docs = list(corpus(dict(args, mb=args["encode_mb"])))
    text = "\n".join(docs)
    mb = len(text.encode("utf-8")) / 1e6
    split_rate = rate(lambda: regex.findall(bpe.SPLIT_PATTERN, text), mb)
    cold = rate(lambda: tok.encode(text), mb)       # fills the chunk cache
    warm = rate(lambda: tok.encode(text), mb)       # every chunk a cache hit
    # the pool starts with the first call (cold worker caches) and is kept for the second (warm)
    batch_cold = rate(lambda: tok.encode_batch(docs, workers=args["workers"]), mb, cpu=False)
    batch_warm = rate(lambda: tok.encode_batch(docs, workers=args["workers"]), mb, cpu=False)
    tok.close()
    ids = tok.encode(text)
    assert tok.decode(ids) == text

    total = (train["count"][0] + train["merge"][0], train["count"][1] + train["merge"][1])
    rows = [("corpus", f"{args['mb']:g} MB {'parquet' if args['data'] else 'synthetic'}, "
                       f"{train['unique_chunks']:,} unique chunks"),
            ("vocab_size", f"{args['vocab_size']:,}"),
            (f"train: count chunks ({args['workers']} workers)", secs(train["count"])),
            ("train: merges", secs(train["merge"])),
            ("train: total", secs(total)),
            ("train: peak memory", f"{train['rss_mb']:.0f} MB main + {train['worker_rss_mb']:.0f} MB largest worker"),
            ("encode text", f"{mb:.1f} MB, {mb * 1e6 / len(ids):.2f} bytes/token"),
            ("regex split only", split_rate),
            ("encode, 1 process, cold cache", cold),
            ("encode, 1 process, warm cache", warm),
            (f"encode_batch, {args['workers']} workers, new pool (cold caches)", batch_cold),
            (f"encode_batch, {args['workers']} workers, same pool again (warm)", batch_warm)]
    print("\n| measure | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    print(f"(load average at the end {os.getloadavg()[0]:.1f})")
