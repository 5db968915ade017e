"""
How much the pretraining loader crops (issue 13 item 3): pretrain.packed_batches, unchanged, on
parquet shards of documents whose lengths follow a chosen distribution.

The tinyworld mirror's documents are short, so they say nothing about T=2048. Real FineWeb-Edu
documents are long-tailed; we draw their token lengths from a log-normal. Median 600 and sigma 1.08
give a mean of about 1,070 tokens (a curated FineWeb-Edu subset's dataset card counts 4.3B GPT-2
tokens in 3.66M documents, about 1,180 each) and put 22.9% of the tokens past T+1 = 2049, the "theoretical minimum crop" the reference measured
on the real data (REFERENCE §2.2): that case stands for FineWeb-Edu, the others show the spread.
Text is one repeated letter per document and the tokenizer is byte-level, so a document of n
letters is exactly n + 1 tokens with its <|bos|>.

crop = 1 - (tokens in the rows) / (tokens the loader took out of the shards), where the latter is
read from the loader's own resumable position (see taken_tokens), once the crop has settled.

python tests/bench/bench_packing.py [--tokens=30000000 --buffer=1000]
"""
import os
import sys
import tempfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
import bpe        # noqa: E402
import pretrain   # noqa: E402

ROW_GROUP = 1024   # documents per row group
DOCS_PER_SHARD = 8192


def write_shards(folder, lengths):
    """Shards of documents of the given lengths in letters; returns (paths, row-group counts)."""
    paths = []
    for start in range(0, len(lengths), DOCS_PER_SHARD):
        texts = [chr(97 + i % 26) * int(n) for i, n in enumerate(lengths[start:start + DOCS_PER_SHARD])]
        path = os.path.join(folder, pretrain.shard_name(len(paths)))
        pq.write_table(pa.table({"text": texts}), path, row_group_size=ROW_GROUP, use_dictionary=False,
                       write_statistics=False)
        paths.append(path)
    return paths, [pq.ParquetFile(p).metadata.num_row_groups for p in paths]


def taken_tokens(state, paths, tokens):
    """Tokens the loader has taken out of the shards at a saved position: every document of the
    row groups before it, less the documents still waiting in its buffer."""
    names = [os.path.basename(p) for p in paths]
    assert state["epoch"] == 0, "the shards ran out: generate more tokens"
    taken = tokens[:names.index(state["shard"]) * DOCS_PER_SHARD + state["group"] * ROW_GROUP].sum()
    for name, group, rows in state["buffer"]:
        first = names.index(name) * DOCS_PER_SHARD + group * ROW_GROUP
        taken -= tokens[[first + r for r in rows]].sum()
    return taken


def crop_fraction(lengths, T, buffer_size):
    """Fraction of the tokens taken from the shards that the rows leave out, in the steady state:
    long documents wait in the buffer (only the shortest one is ever cropped), so the first
    thousand-odd of them pile up before the crop settles. Measured over the second half of the
    batches the data gives before the loader starts reading it again."""
    tokens = np.asarray(lengths) + 1                    # each document's <|bos|>
    with tempfile.TemporaryDirectory() as folder:
        paths, counts = write_shards(folder, lengths)
        loader = pretrain.packed_batches(paths, counts, bpe.Tokenizer([]), 8, T, buffer_size=buffer_size)
        states = []
        for _, _, state in loader:                      # state: the position before that batch
            if state["epoch"] > 0:
                break
            states.append(state)
        loader.close()
    start, end = len(states) // 2, len(states) - 1
    taken = taken_tokens(states[end], paths, tokens) - taken_tokens(states[start], paths, tokens)
    return 1 - (end - start) * 8 * (T + 1) / taken


def beyond_row(lengths, T):
    """The least any packer into rows of T+1 must crop: the tokens of documents past T+1."""
    tokens = np.asarray(lengths) + 1
    return np.maximum(0, tokens - (T + 1)).sum() / tokens.sum()


def lognormal_lengths(median, sigma, tokens, seed=0):
    """Document lengths in letters (>= 1) until `tokens` tokens, log-normal around `median`."""
    rng = np.random.default_rng(seed)
    lengths = np.maximum(1, rng.lognormal(np.log(median), sigma, size=4 * tokens // median)).astype(np.int64)
    return lengths[:np.searchsorted(np.cumsum(lengths + 1), tokens) + 1]


if __name__ == "__main__":
    knobs = {"tokens": 30_000_000, "buffer": 1000}
    for arg in sys.argv[1:]:
        name, _, value = arg.lstrip("-").partition("=")
        if name not in knobs:
            sys.exit(f"unknown option {arg}; known: {', '.join(knobs)}")
        knobs[name] = int(value)
    cases = [(600, 1.08, 2048), (600, 1.08, 1024), (600, 1.08, 512), (600, 1.0, 2048), (600, 1.2, 2048)]
    print(f"buffer {knobs['buffer']} documents; {knobs['tokens']:,} tokens of documents per case\n")
    print("| doc length median | sigma | mean | T | past T+1 (least possible crop) | crop |\n|---|---|---|---|---|---|")
    for median, sigma, T in cases:
        lengths = lognormal_lengths(median, sigma, knobs["tokens"])
        crop = crop_fraction(lengths, T, knobs["buffer"])
        print(f"| {median} | {sigma} | {lengths.mean():.0f} | {T} | {beyond_row(lengths, T):.1%} | {crop:.1%} |", flush=True)
