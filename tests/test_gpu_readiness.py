"""
What the GPU run reports, checked on the CPU: the training logs' peak-memory fields (null off cuda,
never a made-up figure) and the GPU acceptance script (tests/bench/gpucheck.py) end to end in its
--smoke=1 shrink: every check of the GPU run, on a tiny model, in real subprocesses.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

import gpt
from conftest import ROOT


def records(home, stage):
    with open(os.path.join(home, "logs", f"{stage}.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_training_logs_carry_peak_memory_fields_null_on_cpu(base_home, mid_home):
    """Every step record has train_peak_mem_gib, every val eval eval_peak_mem_gib: None on the CPU."""
    for home, stage in ((base_home, "base"), (mid_home, "mid")):
        logged = records(home, stage)
        steps = [r for r in logged if "loss" in r]
        evals = [r for r in logged if "val_bpb" in r]
        assert steps and evals, stage
        assert all("train_peak_mem_gib" in r and r["train_peak_mem_gib"] is None for r in steps), stage
        assert all("eval_peak_mem_gib" in r and r["eval_peak_mem_gib"] is None for r in evals), stage
    assert gpt.peak_memory_gib(torch.device("cpu")) is None
    assert gpt.memory_text(None) == "" and gpt.memory_text(12.34) == " | mem 12.3GiB"


def test_gpucheck_smoke_runs_every_check(tmp_path):
    """`gpucheck.py --smoke=1`: train (no MFU, no memory figures off cuda), setup, decode, a CORE
    slice through evaluate.py and a request through serve.py all pass, and gpucheck.json says so.
    11 s on the 2-core machine at load 4, 34 s at load 8: mostly the subprocesses starting up."""
    env = dict(os.environ, SLIMCHAT_HOME=str(tmp_path), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "tests/bench/gpucheck.py", "--smoke=1"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    summary = json.loads((tmp_path / "gpucheck.json").read_text())
    checks = summary["checks"]
    assert summary["ok"] and list(checks) == ["train", "setup", "decode", "core", "serve"]
    assert all(c["ok"] for c in checks.values()), checks
    train = checks["train"]
    assert train["tok_per_sec"] > 0 and train["mfu"] is None and train["peak_flops"] is None
    assert train["train_peak_mem_gib"] is None and train["eval_peak_mem_gib"] is None
    assert all(checks["decode"][f"{kind}tok_per_sec_{n}"] > 0 for kind in ("", "cast_") for n in (1, 16))
    assert checks["core"]["tasks"] > 0 and checks["serve"]["reply_s"] > 0
    assert "all checks passed" in proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="there is a GPU here: this would run the real check")
def test_gpucheck_without_a_gpu_says_so():
    """Asked for cuda where torch sees none: a clear message and a nonzero exit, before any work."""
    proc = subprocess.run([sys.executable, "tests/bench/gpucheck.py", "--device=cuda"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "sees no GPU" in proc.stderr, proc.stderr
