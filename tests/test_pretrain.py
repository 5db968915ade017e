"""
pretrain.py: the best-fit packing loader and its exact resume, the schedules, the tiny run on the
mirror (download over loopback HTTP, tokenizer, training: conftest's base_home), SIGKILL then
--resume, a real 2-process torchrun (gloo), and damaged shards.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
import torch

import bpe
import gpt
import pretrain
from conftest import ROOT, run_script

# a model small enough that a run is mostly process start-up: 1 head of 64, rows of 64 tokens,
# 512 tokens per step = 2 micro-steps of 4 rows on one process, 1 on each of two
TINY = ["--device=cpu", "--depth=2", "--n_embd=64", "--n_head=1", "--max_seq_len=64",
        "--device_batch_size=4", "--total_batch_size=512", "--num_steps=30", "--eval_every=10",
        "--eval_tokens=4096", "--sample_every=-1"]


def data_home(base_home, where):
    """A fresh SLIMCHAT_HOME with base_home's shards and tokenizer, and no checkpoints or logs."""
    for name in ("data", "tokenizer"):
        shutil.copytree(os.path.join(base_home, name), os.path.join(where, name))
    return str(where)


def read_log(home):
    with open(os.path.join(home, "logs", "base.jsonl")) as f:
        return [json.loads(line) for line in f]


def losses(records):
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def val_bpbs(records):
    return [r["val_bpb"] for r in records if "val_bpb" in r]


def shard_files(home):
    data = os.path.join(home, "data")
    return [os.path.join(data, n) for n in sorted(os.listdir(data))
            if n.endswith(".parquet") and n != pretrain.VAL_SHARD]


@pytest.fixture(scope="module")
def uninterrupted(base_home, mirror, tmp_path_factory):
    """The log of one uninterrupted TINY run, the reference for resume and torchrun."""
    home = data_home(base_home, tmp_path_factory.mktemp("uninterrupted"))
    run_script(["pretrain.py", *TINY, "--save_every=10"], dict(mirror["env"], SLIMCHAT_HOME=home))
    return read_log(home)


@pytest.fixture(scope="module")
def tokenizer(base_home):
    return bpe.Tokenizer.load(os.path.join(base_home, "tokenizer", "tokenizer.json"))


def test_schedules():
    """Constant LR, then linear warmdown over the last 20% to final_lr_frac; momentum ramp."""
    assert pretrain.lr_multiplier(0, 100, 0, 0.2, 0.0) == 1.0
    assert pretrain.lr_multiplier(80, 100, 0, 0.2, 0.0) == 1.0
    assert pretrain.lr_multiplier(90, 100, 0, 0.2, 0.0) == 0.5
    assert pretrain.lr_multiplier(100, 100, 0, 0.2, 0.0) == 0.0
    assert pretrain.lr_multiplier(100, 100, 0, 0.2, 0.1) == pytest.approx(0.1)
    assert pretrain.lr_multiplier(4, 100, 10, 0.2, 0.0) == 0.5
    assert [pretrain.muon_momentum(s) for s in (0, 150, 300, 5000)] == pytest.approx([0.85, 0.90, 0.95, 0.95])


def test_row_groups_are_strided_by_rank():
    """Rank r reads groups r, r+W, ... of each shard, then starts the next epoch."""
    rank0 = pretrain.rank_row_groups([3, 2], 0, 2)
    rank1 = pretrain.rank_row_groups([3, 2], 1, 2)
    assert [next(rank0) for _ in range(4)] == [(0, 0, 0), (0, 0, 2), (0, 1, 0), (1, 0, 0)]
    assert [next(rank1) for _ in range(3)] == [(0, 0, 1), (0, 1, 1), (1, 0, 1)]
    resumed = pretrain.rank_row_groups([3, 2], 0, 2, start=(4, 0, 2))
    assert [next(resumed) for _ in range(2)] == [(4, 0, 2), (4, 1, 0)]


def test_rows_are_bos_aligned_best_fit(base_home, tokenizer):
    """Every row starts with <|bos|>; every document in a row is whole except a cropped last one."""
    paths = shard_files(base_home)
    texts = [t for p in paths for t in pq.read_table(p).column("text").to_pylist()]
    loader = pretrain.packed_batches(paths, pretrain.check_shards(paths, False), tokenizer, 4, 64)
    bos = tokenizer.bos_id
    for _ in range(5):
        x, y, _ = next(loader)
        assert torch.equal(x[:, 1:], y[:, :-1])
        for row in torch.cat([x, y[:, -1:]], dim=1).tolist():
            assert row[0] == bos
            starts = [i for i, t in enumerate(row) if t == bos] + [len(row)]
            pieces = [tokenizer.decode(row[a + 1:b]) for a, b in zip(starts, starts[1:])]
            assert all(piece in texts for piece in pieces[:-1])
            assert any(t.startswith(pieces[-1]) for t in texts)
    loader.close()


def test_loader_resumes_exactly_and_workers_agree(base_home, tokenizer):
    """From a saved state the loader yields the very same batches; worker processes change nothing."""
    paths = shard_files(base_home)
    counts = pretrain.check_shards(paths, False)
    # a small buffer so that 20 batches cross several row groups
    loader = pretrain.packed_batches(paths, counts, tokenizer, 4, 64, buffer_size=50)
    batches = [next(loader) for _ in range(20)]
    resumed = pretrain.packed_batches(paths, counts, tokenizer, 4, 64, state=batches[7][2], buffer_size=50)
    for x, y, state in batches[7:]:
        x2, y2, state2 = next(resumed)
        assert torch.equal(x, x2) and torch.equal(y, y2) and state == state2
    with_workers = pretrain.packed_batches(paths, counts, tokenizer, 4, 64, workers=1, buffer_size=50)
    for x, _, state in batches:
        x2, _, state2 = next(with_workers)
        assert torch.equal(x, x2) and state == state2
    for gen in (loader, resumed, with_workers):
        gen.close()


def test_pretraining_on_the_mirror_lowers_val_bpb(base_home):
    """download over HTTP, tokenizer, 200 steps (conftest): val bpb ends far below the untrained value."""
    names = sorted(os.listdir(os.path.join(base_home, "data")))
    assert [n for n in names if n.endswith(".parquet")] == [
        "shard_00000.parquet", "shard_00001.parquet", "shard_00002.parquet", "shard_00003.parquet",
        "shard_01822.parquet"]
    records = read_log(base_home)
    bpbs = val_bpbs(records)
    assert bpbs[0] > 2.5 and bpbs[-1] < 0.25 * bpbs[0], bpbs
    assert len(records[-1]["samples"]) == len(pretrain.SAMPLE_PROMPTS)
    assert os.path.exists(os.path.join(base_home, "checkpoints", "base", "d2", "model_000200.pt"))


def test_sigkill_then_resume_ends_where_an_uninterrupted_run_does(base_home, mirror, uninterrupted, tmp_path):
    """Kill -9 after a checkpoint, --resume=1: the same losses and val bpb as never stopping."""
    home = data_home(base_home, tmp_path)
    env = dict(mirror["env"], SLIMCHAT_HOME=home)
    with open(tmp_path / "killed.log", "w") as out:
        proc = subprocess.Popen([sys.executable, "pretrain.py", *TINY, "--save_every=10"], cwd=ROOT,
                                env=env, stdout=out, stderr=subprocess.STDOUT)
    first_meta = os.path.join(home, "checkpoints", "base", "d2", "meta_000010.json")
    deadline = time.time() + 240
    while not os.path.exists(first_meta) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, f"the run ended before it could be killed:\n{(tmp_path / 'killed.log').read_text()}"
    proc.kill()
    proc.wait()
    run_script(["pretrain.py", *TINY, "--save_every=10", "--resume=1"], env)
    resumed, reference = read_log(home), losses(uninterrupted)
    assert [r["step"] for r in resumed if "loss" in r] == list(range(1, 31))   # each step logged once
    assert all(loss == reference[step] for step, loss in losses(resumed).items())
    assert val_bpbs(resumed)[-1] == val_bpbs(uninterrupted)[-1]


def test_sigint_saves_a_checkpoint_then_exits(base_home, mirror, tmp_path):
    """Ctrl-C mid-run: a checkpoint of the current step is written and the process exits with
    status 75, "stopped early, checkpoint saved", so that run_all.sh does not take it for finished."""
    home = data_home(base_home, tmp_path)
    log = os.path.join(home, "logs", "base.jsonl")
    proc = subprocess.Popen([sys.executable, "pretrain.py", *TINY, "--num_steps=100000"], cwd=ROOT,
                            env=dict(mirror["env"], SLIMCHAT_HOME=home), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while not (os.path.exists(log) and '"loss"' in open(log).read()) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == gpt.STOPPED_EXIT_CODE == 75, out
    step = max(losses(read_log(home)))
    assert f"saved step {step} to" in out
    assert os.path.exists(os.path.join(home, "checkpoints", "base", "d2", f"meta_{step:06d}.json"))


def test_torchrun_two_ranks_tracks_one_process(base_home, mirror, uninterrupted, tmp_path):
    """2 gloo ranks x 1 micro-step train like 1 process x 2 micro-steps (the data differs per rank)."""
    home = data_home(base_home, tmp_path)
    run_script(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "pretrain.py", *TINY],
               dict(mirror["env"], SLIMCHAT_HOME=home, OMP_NUM_THREADS="1"))
    one, two = val_bpbs(uninterrupted), val_bpbs(read_log(home))
    print("val bpb, one process:", one, "two ranks:", two)
    assert two[0] == pytest.approx(one[0], rel=1e-5)   # same initial weights, same val rows
    assert two[-1] < 0.5 * two[0] and two[-1] == pytest.approx(one[-1], rel=0.1), (one, two)
    with open(os.path.join(home, "checkpoints", "base", "d2", "meta_000030.json")) as f:
        meta = json.load(f)
    assert meta["world_size"] == 2
    assert [s["group"] % 2 for s in meta["loop_state"]["loader"]] == [0, 1]
    assert os.path.exists(os.path.join(home, "checkpoints", "base", "d2", "optim_000030_rank1.pt"))


def test_truncated_shard_is_fetched_again(base_home, mirror, tmp_path):
    """A shard cut short (a killed copy, a full disk) is detected by its footer and re-downloaded."""
    home = data_home(base_home, tmp_path)
    shard = os.path.join(home, "data", "shard_00001.parquet")
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) // 2)
    proc = run_script(["pretrain.py", *TINY, "--num_steps=1"], dict(mirror["env"], SLIMCHAT_HOME=home))
    assert f"shard {shard} is damaged" in proc.stdout and "fetching it again" in proc.stdout
    with open(shard, "rb") as a, open(os.path.join(base_home, "data", "shard_00001.parquet"), "rb") as b:
        assert a.read() == b.read()


def test_damaged_shard_is_reported_by_name(base_home, tokenizer, tmp_path):
    """Without a good copy to fetch, a damaged shard stops the loader with its name; no data is skipped."""
    truncated = str(tmp_path / "shard_00000.parquet")
    shutil.copy(os.path.join(base_home, "data", "shard_00000.parquet"), truncated)
    with open(truncated, "r+b") as f:
        f.truncate(1000)
    with pytest.raises(SystemExit, match="shard_00000.parquet is damaged"):
        pretrain.check_shards([truncated], refetch=False)

    garbled = str(tmp_path / "shard_00001.parquet")
    shutil.copy(os.path.join(base_home, "data", "shard_00001.parquet"), garbled)
    column = pq.ParquetFile(garbled).metadata.row_group(2).column(0)   # garble row group 2's pages
    with open(garbled, "r+b") as f:
        f.seek(column.data_page_offset + 40)
        f.write(bytes(range(256)) * 4)
    counts = pretrain.check_shards([garbled], refetch=False)   # the footer is still fine
    loader = pretrain.packed_batches([garbled], counts, tokenizer, 4, 64, buffer_size=50)
    with pytest.raises(RuntimeError, match="shard_00001.parquet row group 2 is unreadable"):
        for _ in range(100):
            next(loader)
