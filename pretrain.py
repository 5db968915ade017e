"""
pretrain.py: stage 1, pretrain the base model on the FineWeb-Edu shards.

`--download=N` fetches N train shards plus the val shard (shard_01822) in parallel through gpt's
download helper (retries, resume of partial files, parquet validation) and exits; run it in the
background while bpe.py trains the tokenizer. Training (REFERENCE §5, the late-2025 recipe):
the depth dial sets the model and, through tokens = 20 x params, the horizon (or --num_steps /
--target_flops); constant LR, then a linear warmdown over the last 20%; Muon momentum 0.85 -> 0.95.

The loader (REFERENCE §2.2, the mid-2026 best-fit packing): rank r reads row groups r, r+W, ... of
every train shard, encodes each document as <|bos|> + bpe ids, and fills rows of T+1 tokens by
taking the largest buffered document that fits the space left; when none fits, the shortest one is
cropped to fill the row. Every row starts with <|bos|>, nothing is padded, and part of the tokens
are cropped away (at T=2048 the reference measured 35% on FineWeb-Edu; tests/bench/RESULTS.md).
The loader says when it has read every shard and starts again, and a run warns at start when it
will. The loader's position (the next row group, plus which documents sit in the buffer) goes into
the checkpoint, so `--resume=1` replays the exact same batches.
With loader_workers > 0, row groups are read and encoded ahead of time in worker processes.

reads:  $SLIMCHAT_HOME/data/shard_*.parquet, $SLIMCHAT_HOME/tokenizer/tokenizer.json
writes: $SLIMCHAT_HOME/checkpoints/base/d<depth>/ (model, meta with loop and loader state, per-rank
        optimizer shards), $SLIMCHAT_HOME/logs/base.jsonl (one JSON object per line)

cpu smoke: python pretrain.py --device=cpu --depth=2 --max_seq_len=128 --device_batch_size=4 --total_batch_size=512 --num_steps=20 --eval_tokens=2048
one gpu:   python pretrain.py --depth=12
torchrun:  torchrun --standalone --nproc_per_node=8 pretrain.py --depth=20
preflight: python pretrain.py --preflight=1 --depth=26   (any CPU, seconds: the plan at full size, README)
"""
import bisect
import collections
import dataclasses
import glob
import itertools
import math
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed as dist

import bpe
import evaluate
import gpt

# ---------------------------------------------------------------------------
# hyperparameters: edit here, or override any of them with --name=value
# data
download = -1               # >= 0: fetch this many train shards + the val shard, then exit
loader_workers = -1         # tokenizer processes per rank; 0 = in-process; -1 = auto (0 off cuda)
buffer_size = 1000          # documents per rank the best-fit packer chooses from
# runtime
device = ""                 # "" = autodetect (cuda > mps > cpu)
resume = 0                  # 1 = continue from the latest base checkpoint (model, optimizer, loader)
use_compile = 1             # torch.compile the model on cuda (ignored on other devices)
preflight = 0               # 1 = check this run at full size without allocating it (meta device), print its plan, exit
gpu_memory_gib = -1.0       # memory of one GPU, for the device batch and the preflight; -1 = the GPU's (80 without one)
seed = 42                   # torch seed for the initial weights
# model
depth = 20                  # the dial: n_layer; width 64*depth, heads of 128
n_embd = -1                 # width override for tiny models; -1 = 64*depth
n_head = -1                 # heads override; -1 = from the width (head_dim 128, at least 1 head)
max_seq_len = 2048          # tokens per row
# batch and horizon (precedence: num_steps > target_flops > target_param_data_ratio)
device_batch_size = -1      # rows per rank per micro-step; -1 = the largest power of two that fits the GPU
total_batch_size = 524288   # tokens per optimizer step across all ranks; grad accumulation is derived
num_steps = -1              # optimizer steps; -1 = derive from target_flops or the ratio
target_flops = -1.0         # total training FLOPs; -1 = unused
target_param_data_ratio = 20.0  # training tokens per parameter (Chinchilla's 20)
# optimizer and schedules (REFERENCE §4.1, §5 E)
embedding_lr = 0.2          # AdamW, token embedding
unembedding_lr = 0.004      # AdamW, lm_head
matrix_lr = 0.02            # Muon, transformer matrices
weight_decay = 0.0          # AdamW weight decay
warmup_steps = 0            # linear LR warmup steps
warmdown_frac = 0.2         # fraction of the steps at the end over which the LR decays linearly
final_lr_frac = 0.0         # LR multiplier reached at the last step
# evaluation, samples, checkpoints
eval_every = 250            # steps between val bpb evals; -1 = never (always at the last step)
eval_tokens = 20 * 524288   # val tokens per eval, across all ranks
sample_every = 2000         # steps between greedy samples from fixed prompts; -1 = never
save_every = -1             # steps between checkpoints; -1 = only at the end (and on Ctrl-C)
# ---------------------------------------------------------------------------

DATA_REPO = "karpathy/fineweb-edu-100b-shuffle"
VAL_SHARD = "shard_01822.parquet"    # the last shard is the val shard (REFERENCE §2.1)
MAX_TRAIN_SHARDS = 1822
SAMPLE_PROMPTS = ["The capital of France is", "The chemical symbol of gold is",
                  "If yesterday was Friday, then tomorrow will be", "The opposite of hot is",
                  "The planets of the solar system are:", "My favorite color is",
                  "If 5*x + 3 = 13, then x is"]
# Data arithmetic (tests/bench/RESULTS.md): the best-fit packer crops part of the tokens it reads at
# T=2048: 34.6% on real FineWeb-Edu in the reference's measurement, 15.5% in ours on synthetic
# documents of FineWeb-Edu-like lengths; we size the download by the larger crop until it is measured
# on real shards. A shard holds about 250M characters, at about 4.8 characters per token of our
# 65,536-token BPE; we fetch 10% more.
KEPT_FRAC = 0.65
SHARD_CHARS = 250e6
CHARS_PER_TOKEN = 4.8
SHARD_MARGIN = 1.1
SPEEDRUN_VOCAB = 65536      # the vocabulary the speedrun trains (run_all.sh); the preflight's when none is on disk
ASSUMED_MFU = 0.45          # for the preflight's wall-time estimate: an assumption, not a measurement

# ---------------------------------------------------------------------------
# shards: download, check, read


def shard_name(i):
    return f"shard_{i:05d}.parquet"


def download_shards(num_train, data_dir, workers=8):
    """Fetch train shards 0..num_train-1 and the val shard into data_dir, `workers` at a time."""
    if not 0 <= num_train <= MAX_TRAIN_SHARDS:
        raise SystemExit(f"--download={num_train}: the dataset has {MAX_TRAIN_SHARDS} train shards")
    os.makedirs(data_dir, exist_ok=True)
    names = [shard_name(i) for i in range(num_train)] + [VAL_SHARD]

    def fetch(name):   # skips a file already there: the helper renames only complete, valid files
        return gpt.download(gpt.hub_url(DATA_REPO, name), os.path.join(data_dir, name))

    t0 = time.time()
    with ThreadPoolExecutor(workers) as pool:
        paths = list(pool.map(fetch, names))
    print(f"{len(paths)} shards in {data_dir} ({time.time() - t0:.1f}s)")
    return paths


def shard_row_groups(path):
    """Number of row groups of a readable shard with a `text` column; None for a damaged file."""
    try:
        meta = pq.ParquetFile(path).metadata
    except (OSError, pa.ArrowException):
        return None
    return meta.num_row_groups if "text" in meta.schema.names and meta.num_row_groups else None


def check_shards(paths, refetch):
    """Row-group counts per shard. A damaged shard is fetched again once when `refetch`, otherwise
    (or if it is still damaged) the run stops naming it: data is never skipped silently."""
    counts = []
    for path in paths:
        count = shard_row_groups(path)
        if count is None and refetch:
            print(f"shard {path} is damaged (truncated or not parquet); fetching it again", flush=True)
            os.remove(path)
            gpt.download(gpt.hub_url(DATA_REPO, os.path.basename(path)), path)
            count = shard_row_groups(path)
        if count is None:
            raise SystemExit(f"shard {path} is damaged (truncated or not parquet with a text column); "
                             f"delete it and run `python pretrain.py --download=N` to fetch it again")
        counts.append(count)
    return counts


def read_texts(path, group):
    """The documents of one row group; a damaged row group stops the run with the shard's name."""
    try:
        return pq.ParquetFile(path).read_row_group(group, columns=["text"]).column("text").to_pylist()
    except (OSError, pa.ArrowException) as e:
        raise RuntimeError(f"shard {path} row group {group} is unreadable ({e}); delete the shard and "
                           f"run `python pretrain.py --download=N` to fetch it again") from e

# ---------------------------------------------------------------------------
# tokenizing: row groups -> <|bos|>-prefixed documents, in-process or in worker processes

_worker_tokenizer = None    # set once per worker process, so tasks don't ship the vocabulary


def _init_worker(merges, pattern):
    global _worker_tokenizer
    _worker_tokenizer = bpe.Tokenizer(merges, pattern)


def encode_row_group(path, group, tokenizer=None):
    """One row group as a flat int32 array of <|bos|> + ids per document, plus each document's
    length (two arrays pickle far faster than lists of lists)."""
    tok = tokenizer or _worker_tokenizer
    docs = tok.encode_batch(read_texts(path, group))
    lengths = np.array([len(d) + 1 for d in docs], dtype=np.int64)
    flat = np.empty(int(lengths.sum()), dtype=np.int32)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    flat[starts] = tok.bos_id
    for start, ids in zip(starts, docs):
        flat[start + 1:start + 1 + len(ids)] = ids
    return flat, lengths


def split_docs(flat, lengths):
    return np.split(flat, np.cumsum(lengths)[:-1])

# ---------------------------------------------------------------------------
# the loader: BOS-aligned best-fit packing with an exact, resumable position


def rank_row_groups(counts, rank, world, start=(0, 0, None)):
    """Endless (epoch, shard index, row group) of one rank: groups rank, rank+world, ... of every
    shard, in shard order, epoch after epoch; `start` resumes at a saved position."""
    if not any(count > rank for count in counts):
        raise SystemExit(f"rank {rank} has no row group to read: {sum(counts)} row groups in "
                         f"{len(counts)} shards for {world} ranks; download more shards")
    epoch, first_shard, first_group = start
    while True:
        for i in range(first_shard, len(counts)):
            begin = first_group if i == first_shard and first_group is not None else rank
            for group in range(begin, counts[i], world):
                yield epoch, i, group
        epoch, first_shard, first_group = epoch + 1, 0, None


def packed_batches(paths, counts, tokenizer, B, T, rank=0, world=1, device="cpu", state=None,
                   workers=0, buffer_size=1000, say_passes=True):
    """Yield (inputs, targets, state) forever: (B, T) int64 tensors on `device`, and the loader
    state just before this batch, from which packed_batches(..., state=state) yields it again.
    With say_passes, rank 0 prints when it starts reading the data again.

    The state is {"epoch", "shard", "group": the next row group to read, "buffer": the buffered
    documents as [shard name, group, [rows...]] in arrival order}: resuming re-encodes exactly those.
    """
    names = [os.path.basename(p) for p in paths]
    docs = {}           # arrival number -> ((shard index, group, row), tokens); insertion = arrival order
    fits = []           # sorted (length, arrival number): the best fit is one bisect away
    arrivals = itertools.count()

    def add(shard, group, rows, pieces):
        for row in rows:
            n = next(arrivals)
            docs[n] = ((shard, group, row), pieces[row])
            bisect.insort(fits, (len(pieces[row]), n))

    def index_of(name):
        if name not in names:
            raise SystemExit(f"the saved loader position needs shard {name}, which is not in the data dir")
        return names.index(name)

    start = (0, 0, None)
    if state is not None:
        for name, group, rows in state["buffer"]:
            i = index_of(name)
            add(i, group, rows, split_docs(*encode_row_group(paths[i], group, tokenizer)))
        start = (state["epoch"], index_of(state["shard"]), state["group"])
    units = rank_row_groups(counts, rank, world, start)
    reading_epoch = start[0]
    # spawn, not fork: forking a process that has started CUDA or threads is unsafe
    pool = ProcessPoolExecutor(workers, multiprocessing.get_context("spawn"), _init_worker,
                               (tokenizer.merges, tokenizer.pattern)) if workers > 0 else None
    pending = collections.deque()   # (unit, future or None), in reading order

    def next_unit():
        while len(pending) < max(1, 2 * workers):  # keep the workers busy two row groups ahead
            unit = next(units)
            pending.append((unit, pool.submit(encode_row_group, paths[unit[1]], unit[2]) if pool else None))
        return pending[0][0]

    def refill():
        nonlocal reading_epoch
        while len(docs) < buffer_size:
            next_unit()   # tops up the queue
            (epoch, i, group), future = pending.popleft()
            if epoch > reading_epoch and say_passes:   # a second pass over the data looks like a fine run
                reading_epoch = epoch
                gpt.print0(f"loader: all {len(paths)} shard(s) read; pass {epoch + 1} over the same data "
                           f"begins (download more shards for a run this long)")
            pieces = split_docs(*(future.result() if future else encode_row_group(paths[i], group, tokenizer)))
            add(i, group, range(len(pieces)), pieces)

    def snapshot():
        epoch, i, group = next_unit()
        buffer = []
        for (shard, grp, row), _ in docs.values():
            if buffer and buffer[-1][:2] == [names[shard], grp]:
                buffer[-1][2].append(row)
            else:
                buffer.append([names[shard], grp, [row]])
        return {"epoch": epoch, "shard": names[i], "group": group, "buffer": buffer}

    try:
        while True:
            refill()
            state = snapshot()
            rows = np.empty((B, T + 1), dtype=np.int64)
            for b in range(B):
                filled = 0
                while filled < T + 1:
                    refill()
                    room = T + 1 - filled
                    k = bisect.bisect_right(fits, (room, math.inf)) - 1  # the largest doc that fits
                    length, n = fits.pop(max(k, 0))                    # none fits: crop the shortest
                    take = min(length, room)
                    rows[b, filled:filled + take] = docs.pop(n)[1][:take]
                    filled += take
            batch = torch.from_numpy(rows)
            if torch.device(device).type == "cuda":
                batch = batch.pin_memory().to(device, non_blocking=True)   # the copy overlaps compute
            else:
                batch = batch.to(device)
            yield batch[:, :-1].contiguous(), batch[:, 1:].contiguous(), state
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)

# ---------------------------------------------------------------------------
# model, evaluation, schedules, logging


def model_config(depth, n_embd, n_head, vocab_size, seq_len):
    """The depth dial's config, with the explicit width/heads of tiny models when given."""
    config = gpt.config_from_depth(depth, vocab_size, seq_len)
    if n_embd > 0 or n_head > 0:
        width = n_embd if n_embd > 0 else config.n_embd
        heads = n_head if n_head > 0 else max(1, width // 128)
        if width % heads:
            raise SystemExit(f"n_embd {width} is not divisible by n_head {heads}")
        config = dataclasses.replace(config, n_embd=width, n_head=heads, n_kv_head=heads)
    return config


def horizon_steps(num_steps, target_flops, target_param_data_ratio, flops_per_token, num_params, total_batch_size):
    """(optimizer steps, the knob that set them): num_steps > target_flops > target_param_data_ratio."""
    if num_steps > 0:
        return num_steps, "num_steps"
    if target_flops > 0:
        return round(target_flops / (flops_per_token * total_batch_size)), "target_flops"
    if target_param_data_ratio > 0:
        return round(target_param_data_ratio * num_params / total_batch_size), "target_param_data_ratio"
    raise SystemExit("no horizon: set --num_steps, --target_flops or --target_param_data_ratio")


def shards_needed(train_tokens):
    """Train shards that hold `train_tokens` after packing, with SHARD_MARGIN to spare."""
    return math.ceil(train_tokens / KEPT_FRAC * CHARS_PER_TOKEN / SHARD_CHARS * SHARD_MARGIN)


def depth_shards(depth, seq_len, total_batch_size, target_param_data_ratio):
    """Shards for a run of the depth dial at a tokens:params ratio (run_all.sh sizes its download so)."""
    with torch.device("meta"):
        model = gpt.GPT(gpt.config_from_depth(depth, SPEEDRUN_VOCAB, seq_len))
    steps, _ = horizon_steps(-1, -1, target_param_data_ratio, 0, model.num_params()["total"], total_batch_size)
    return shards_needed(steps * total_batch_size)


def shard_tokens(paths, tokenizer, sample_docs=64):
    """About how many tokens the shards hold: their text bytes (from the parquet metadata) over the
    bytes per token of the first documents of the first shard."""
    texts = read_texts(paths[0], 0)[:sample_docs]
    tokens = sum(len(ids) + 1 for ids in tokenizer.encode_batch(texts))   # + <|bos|>
    bytes_per_token = sum(len(t.encode()) for t in texts) / max(1, tokens)
    total = 0
    for path in paths:
        meta = pq.ParquetFile(path).metadata
        column = meta.schema.names.index("text")
        total += sum(meta.row_group(g).column(column).total_uncompressed_size for g in range(meta.num_row_groups))
    return total / bytes_per_token


def data_warning(paths, tokenizer, train_tokens, total_batch_size):
    """A warning when the shards hold fewer tokens after packing than the run trains on, else None."""
    kept = shard_tokens(paths, tokenizer) * KEPT_FRAC
    if train_tokens <= kept:
        return None
    return (f"warning: the run trains on {train_tokens:,} tokens, but the {len(paths)} train shard(s) on disk "
            f"hold about {kept:,.0f} after packing ({1 - KEPT_FRAC:.0%} cropped at T=2048): from about step "
            f"{int(kept / total_batch_size):,} the data repeats. One pass needs about "
            f"{math.ceil(len(paths) * train_tokens / kept * SHARD_MARGIN)} shards (python pretrain.py --download=N)")


def fit_device_batch(model, rows_per_rank, world_size, memory, compiled=True):
    """The largest power of two that divides rows_per_rank and whose estimated training step
    (GPT.estimate_memory) fits in `memory` less gpt.MEMORY_RESERVE_GIB; 1 when even 2 does not fit."""
    usable, batch = memory - gpt.MEMORY_RESERVE_GIB * 2**30, 1
    while (rows_per_rank % (2 * batch) == 0
           and sum(model.estimate_memory(2 * batch, world_size, compiled).values()) <= usable):
        batch *= 2
    return batch


def lr_multiplier(step, num_steps, warmup_steps, warmdown_frac, final_lr_frac):
    """Linear warmup, constant, then linear warmdown to final_lr_frac at num_steps."""
    warmdown_steps = round(warmdown_frac * num_steps)
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if step <= num_steps - warmdown_steps:
        return 1.0
    progress = (num_steps - step) / warmdown_steps
    return progress + (1 - progress) * final_lr_frac


def muon_momentum(step):
    """0.85 -> 0.95 over the first 300 steps (REFERENCE §4.1): less momentum while gradients churn."""
    return 0.85 + 0.10 * min(step / 300, 1.0)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


if __name__ == "__main__":
    config = gpt.apply_overrides(globals())
    data_dir = os.path.join(gpt.home(), "data")
    if download >= 0:
        download_shards(download, data_dir)
        sys.exit(0)

    # ------------------------------------------------------------------ setup
    ddp, rank, local_rank, world_size, dev, dtype, dtype_reason = gpt.compute_setup(device, preflight)
    master = rank == 0
    torch.manual_seed(seed)
    git = gpt.git_info()
    gpt.print0(f"device {dev} x {world_size} rank(s), dtype {dtype} ({dtype_reason}), git {git}")
    has_tokenizer = os.path.exists(os.path.join(gpt.home(), "tokenizer", "tokenizer.json"))
    tok = gpt.load_tokenizer() if has_tokenizer or not preflight else None
    vocab_size = tok.vocab_size if tok else SPEEDRUN_VOCAB   # a preflight before the tokenizer exists
    token_bytes = torch.tensor(tok.token_bytes() if tok else [], dtype=torch.int64, device=dev)
    log_path = os.path.join(gpt.home(), "logs", "base.jsonl")

    # ------------------------------------------------------------------ model
    arch = model_config(depth, n_embd, n_head, vocab_size, max_seq_len)
    tag = f"d{arch.n_layer}"
    meta, optim_state = None, None
    if resume and not preflight:
        raw_model, meta, optim_state = gpt.load_checkpoint("base", dev, tag=tag, tokenizer=tok, rank=rank, dtype=dtype)
        if raw_model.config != arch:   # the loaded config: fields newer than the checkpoint take their defaults
            raise SystemExit(f"--resume: the checkpoint's model {meta['model_config']} differs from "
                             f"the knobs' {dataclasses.asdict(arch)}; pass the same model knobs")
        if meta["world_size"] != world_size:
            raise SystemExit(f"--resume: the checkpoint was written by {meta['world_size']} ranks, "
                             f"this run has {world_size}; the loader position is per rank")
    else:
        raw_model = gpt.new_model(arch, dev, dtype)
    model = torch.compile(raw_model, dynamic=False) if use_compile and dev.type == "cuda" else raw_model
    num_params = raw_model.num_params()
    flops_per_token = raw_model.estimate_flops()
    gpt.print0(f"model {arch}: " + ", ".join(f"{k} {v:,}" for k, v in num_params.items()))

    # ------------------------------------------------------------------ horizon and batch
    if total_batch_size % (max_seq_len * world_size):
        raise SystemExit(f"total_batch_size {total_batch_size} is not a multiple of max_seq_len {max_seq_len} "
                         f"x {world_size} ranks: every rank must get whole rows")
    rows_per_rank = total_batch_size // (max_seq_len * world_size)
    memory, memory_why = gpt.gpu_memory(gpu_memory_gib)
    compiled = bool(use_compile) and dev.type in ("cuda", "meta")   # as above; a preflight plans for GPUs
    if device_batch_size < 0:   # a resumed run replays its batches exactly: it keeps its own
        device_batch_size = (meta["device_batch_size"] if meta else
                             fit_device_batch(raw_model, rows_per_rank, world_size, memory, compiled))
        estimate = raw_model.estimate_memory(device_batch_size, world_size, compiled)
        gpt.print0(f"device_batch_size {device_batch_size}: the largest power of two dividing the {rows_per_rank} rows per "
                   f"rank per step whose estimated training step fits in {memory_why} less {gpt.MEMORY_RESERVE_GIB} GiB: "
                   f"{sum(estimate.values()) / 2**30:.1f} GiB = " + " + ".join(f"{k} {v / 2**30:.1f}" for k, v in estimate.items()))
    tokens_per_micro_step = device_batch_size * max_seq_len * world_size
    assert total_batch_size % tokens_per_micro_step == 0, (
        f"total_batch_size {total_batch_size} is not a multiple of device_batch_size {device_batch_size} "
        f"x max_seq_len {max_seq_len} x {world_size} ranks = {tokens_per_micro_step}")
    grad_accum = total_batch_size // tokens_per_micro_step
    horizon, why = horizon_steps(num_steps, target_flops, target_param_data_ratio, flops_per_token,
                                 num_params["total"], total_batch_size)
    if meta is not None and meta["num_steps"] != horizon:
        raise SystemExit(f"--resume: the checkpoint's run has {meta['num_steps']} steps, these knobs "
                         f"give {horizon}; the schedule must not change mid-run")
    gpt.print0(f"{grad_accum} micro-step(s) of {tokens_per_micro_step:,} tokens per step; {horizon:,} steps "
               f"(from {why}) = {horizon * total_batch_size:,} tokens = "
               f"{horizon * total_batch_size / num_params['total']:.1f} tokens/param, "
               f"{horizon * total_batch_size * flops_per_token:.3e} FLOPs")

    # ------------------------------------------------------------------ preflight: the plan at full size, then exit
    if preflight:
        # one training, eval and decode step at full size (it stops here on a device or dtype mismatch)
        memory_line, too_big = gpt.preflight(raw_model, device_batch_size, max_seq_len, world_size, memory,
                                             memory_why, compiled)
        gpu_name = torch.cuda.get_device_name() if torch.cuda.is_available() else gpt.ASSUMED_GPU[0]
        gpu_flops = gpt.peak_flops(gpu_name)
        train_tokens = horizon * total_batch_size
        on_disk = [p for p in sorted(glob.glob(os.path.join(data_dir, "shard_*.parquet"))) if not p.endswith(VAL_SHARD)]
        rows = [("parameters", f"{num_params['total']:,}"), ("FLOPs per token", f"{flops_per_token:.3e}"),
                ("tokens per step", f"{total_batch_size:,} = {device_batch_size} rows x {max_seq_len} x "
                                    f"{world_size} ranks x {grad_accum} micro-step(s)"),
                ("steps", f"{horizon:,} (from {why}) = {train_tokens / 1e9:.2f}B tokens"),
                ("shards needed", f"{shards_needed(train_tokens)} ({len(on_disk)} on disk)"),
                ("peak memory per GPU", memory_line),
                ("wall time", f"{train_tokens * flops_per_token / (world_size * gpu_flops * ASSUMED_MFU) / 3600:.2f} h "
                              f"at {ASSUMED_MFU:.0%} MFU on {gpu_name}s" if gpu_flops else f"unknown: no peak FLOP/s for {gpu_name}"),
                ("checked", "training step, eval step, KV-cache decode step on the meta device")]
        print("preflight:\n" + "\n".join(f"  {name:<20} {value}" for name, value in rows))
        if on_disk and tok and (warning := data_warning(on_disk, tok, train_tokens, total_batch_size)):
            print(warning)
        sys.exit(too_big)   # None: exit 0

    # ------------------------------------------------------------------ data
    train_paths = bpe.shard_paths(data_dir)
    val_path = os.path.join(data_dir, VAL_SHARD)
    if not os.path.exists(val_path):
        raise SystemExit(f"no val shard {val_path}; run `python pretrain.py --download=N`")
    if local_rank == 0:
        check_shards(train_paths + [val_path], refetch=True)
    if ddp:
        dist.barrier()
    *train_counts, val_count = check_shards(train_paths + [val_path], refetch=False)
    if master and (warning := data_warning(train_paths, tok, horizon * total_batch_size, total_batch_size)):
        gpt.print0(warning)
    # auto: 0 off cuda, where the model is the bottleneck; on a GPU node up to 4 of the cores left
    # per GPU, so encoding stays off the core that launches kernels (tests/bench/RESULTS.md)
    cores_per_gpu = (os.cpu_count() or 1) // max(1, torch.cuda.device_count())
    workers = loader_workers if loader_workers >= 0 else 0 if dev.type != "cuda" else max(0, min(4, cores_per_gpu - 1))
    loader_state = meta["loop_state"]["loader"][rank] if meta else None
    train_loader = packed_batches(train_paths, train_counts, tok, device_batch_size, max_seq_len, rank,
                                  world_size, dev, loader_state, workers, buffer_size)
    x, y, loader_state = next(train_loader)
    eval_steps = eval_tokens // tokens_per_micro_step
    assert eval_steps > 0, f"eval_tokens {eval_tokens} is less than one micro-step ({tokens_per_micro_step} tokens)"
    # every rank packs the same val rows and keeps batches rank, rank+W, ...: the val set is the
    # same for any number of ranks, so runs on 1 and 8 GPUs report comparable bpb
    val_loader = packed_batches([val_path], [val_count], tok, device_batch_size, max_seq_len, device=dev,
                                workers=workers, buffer_size=buffer_size, say_passes=False)
    val_batches = [(vx, vy) for vx, vy, _ in itertools.islice(val_loader, rank, eval_steps * world_size, world_size)]
    val_loader.close()
    gpt.print0(f"{len(train_paths)} train shards, {workers} loader worker(s) per rank; "
               f"val: {eval_steps * tokens_per_micro_step:,} tokens, fixed")

    # ------------------------------------------------------------------ optimizer
    optimizer = raw_model.setup_optimizer(embedding_lr, unembedding_lr, matrix_lr, weight_decay)
    if optim_state is not None:
        optimizer.load_state_dict(optim_state)

    # ------------------------------------------------------------------ loop
    loop = meta["loop_state"] if meta else {"min_val_bpb": float("inf"), "smooth_loss": 0.0, "training_time": 0.0}
    step = start_step = meta["step"] if meta else 0
    if master:
        gpt.rewind_log(log_path, start_step + 1 if resume else None)   # step start_step is not redone
        gpt.log_jsonl(log_path, {"event": "start", "step": step, "config": config, "git": git,
                             "world_size": world_size, "num_params": num_params, "num_steps": horizon})
    stop_signal = gpt.stop_requests()   # filled by Ctrl-C / SIGTERM; acted on at the top of the next step
    gpu_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else None
    peak = gpt.peak_flops(gpu_name) if gpu_name else None
    gpt.print0(f"MFU against {peak / 1e12:.0f} TFLOP/s, the dense bf16 peak of {gpu_name}" if peak else
               f"no MFU: no peak FLOP/s known for {gpu_name or dev.type} (gpt.PEAK_FLOPS)")
    val_bpb, timed_steps = None, 0
    while True:
        last_step = step == horizon
        stop = gpt.rank_max([len(stop_signal)], ddp, dev)[0] > 0   # every rank stops at the same step
        fresh = step > start_step or not resume   # a resumed run has already done step's evals and save

        if fresh and (last_step or (eval_every > 0 and step % eval_every == 0)):
            gpt.reset_peak_memory(dev)
            model.eval()
            val_bpb = evaluate.evaluate_bpb(model, val_batches, eval_steps, token_bytes)
            model.train()
            eval_mem = gpt.peak_memory_gib(dev)
            loop["min_val_bpb"] = min(loop["min_val_bpb"], val_bpb)
            gpt.print0(f"step {step:05d} | val bpb {val_bpb:.4f}" + gpt.memory_text(eval_mem))
            if master:
                gpt.log_jsonl(log_path, {"step": step, "val_bpb": val_bpb, "eval_peak_mem_gib": eval_mem})
        if fresh and master and (last_step or (sample_every > 0 and step % sample_every == 0)):
            engine = gpt.Engine(gpt.inference_model(raw_model), tok)
            samples = []
            for prompt in SAMPLE_PROMPTS:
                seqs, _ = engine.generate_batch([tok.bos_id] + tok.encode(prompt), max_tokens=16, temperature=0.0)
                samples.append(tok.decode(seqs[0][1:]))
                print(f"sample: {samples[-1]!r}")
            gpt.log_jsonl(log_path, {"step": step, "samples": samples})
        if stop or (fresh and (last_step or (save_every > 0 and step % save_every == 0 and step > 0))):
            loader_states = gpt.rank_gather(loader_state, ddp)
            checkpoint_meta = {"val_bpb": val_bpb, "config": config, "tokenizer": tok.fingerprint(),
                               "world_size": world_size, "num_steps": horizon,
                               "total_batch_size": total_batch_size, "max_seq_len": max_seq_len,
                               "device_batch_size": device_batch_size,
                               "loop_state": dict(loop, loader=loader_states)}
            where = gpt.save_checkpoint("base", step, raw_model, checkpoint_meta, optimizer, rank, tag)
            gpt.print0(f"saved step {step} to {where}")
        if last_step or stop:
            break

        # ------------------------------------------------------------------ one training step
        sync(dev)
        gpt.reset_peak_memory(dev)
        t0 = time.time()
        train_loss = torch.zeros((), device=dev)
        for micro_step in range(grad_accum):
            loss = model(x, y)
            train_loss += loss.detach() / grad_accum
            (loss / grad_accum).backward()
            x, y, loader_state = next(train_loader)   # prefetch while the device works
        lrm = lr_multiplier(step, horizon, warmup_steps, warmdown_frac, final_lr_frac)
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * lrm
            if group["kind"] == "muon":
                group["momentum"] = muon_momentum(step)
        optimizer.step()
        model.zero_grad(set_to_none=True)
        loss_value = train_loss.item()
        sync(dev)
        dt = time.time() - t0
        train_mem = gpt.peak_memory_gib(dev)
        step += 1

        # ------------------------------------------------------------------ log
        beta = 0.9   # EMA of the train loss, debiased by the number of steps taken
        loop["smooth_loss"] = beta * loop["smooth_loss"] + (1 - beta) * loss_value
        smooth = loop["smooth_loss"] / (1 - beta ** step)
        if step - start_step > 10:   # the first steps compile and warm up: not counted
            loop["training_time"] += dt
            timed_steps += 1
        tok_per_sec = total_batch_size / dt
        mfu = flops_per_token * tok_per_sec / (peak * world_size) if peak else None
        eta = (loop["training_time"] / timed_steps if timed_steps else dt) * (horizon - step)
        gpt.print0(f"step {step:05d}/{horizon:05d} ({100 * step / horizon:.1f}%) | loss {smooth:.4f} "
                   f"| lrm {lrm:.3f} | dt {dt * 1000:.1f}ms | tok/s {tok_per_sec:,.0f} | mfu "
                   f"{'-' if mfu is None else f'{100 * mfu:.1f}%'} | eta {eta / 60:.1f}m"
                   + gpt.memory_text(train_mem))
        if master:
            gpt.log_jsonl(log_path, {"step": step, "loss": loss_value, "smooth_loss": smooth, "lrm": lrm,
                                 "dt": dt, "tok_per_sec": tok_per_sec, "mfu": mfu, "train_peak_mem_gib": train_mem})

    # ------------------------------------------------------------------ done
    gpt.print0(f"done at step {step}: min val bpb {loop['min_val_bpb']:.4f}, "
               f"training time {loop['training_time'] / 60:.2f}m")
    train_loader.close()
    gpt.compute_cleanup(stopped=not last_step)   # stopped by Ctrl-C/SIGTERM: exit status 75
