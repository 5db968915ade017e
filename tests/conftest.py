"""
Shared pytest fixtures. The expensive artifacts (the offline mirror, a trained tokenizer,
a tiny base model, a tiny SFT model) are built once per session and shared read-only;
a test that writes must work on a copy (see `copy_home`).
"""
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def run_script(args, env, timeout=600):
    """Run one of the stage scripts as a real subprocess in the repo root; fail loudly with its output."""
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


def copy_home(src, dst):
    """A private writable copy of a shared SLIMCHAT_HOME."""
    shutil.copytree(src, dst)
    return str(dst)

# --- mirror and base model (owned by the pretrain work) -------------------------------------
# The tiny base model every later stage starts from: 2 layers of width 128 (2 heads of 64),
# vocab 512, rows of 128 tokens, 1,024 tokens per step, 200 steps (about 10 s on an idle 2-core
# CPU, 60 s on a busy one); val bpb falls from about 3.5 to about 0.27 on the tinyworld text.
BASE_VOCAB_SIZE = 512
BASE_ARGS = ["--device=cpu", "--depth=2", "--n_embd=128", "--n_head=2", "--max_seq_len=128",
             "--device_batch_size=8", "--total_batch_size=1024", "--num_steps=200",
             "--eval_every=100", "--eval_tokens=8192", "--sample_every=-1"]


@pytest.fixture(scope="session")
def mirror(tmp_path_factory):
    """The offline mirror (tests/tinyworld.py), built once and served over loopback HTTP.
    {"root": its directory, "env": os.environ plus HF_ENDPOINT, SLIMCHAT_FILES_ENDPOINT and
    OMP_NUM_THREADS=1: on a shared 2-core machine, torch's default of one thread per core in every
    test subprocess makes the threads spin against each other (tiny-model steps measured 80x slower)."""
    import tinyworld
    root = str(tmp_path_factory.mktemp("mirror"))
    tinyworld.build(root, seed=0)
    server, port = tinyworld.serve(root)
    env = dict(os.environ, HF_ENDPOINT=f"http://127.0.0.1:{port}",
               SLIMCHAT_FILES_ENDPOINT=f"http://127.0.0.1:{port}/files", OMP_NUM_THREADS="1")
    yield {"root": root, "env": env}
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="session")
def base_home(mirror, tmp_path_factory):
    """A SLIMCHAT_HOME with data/ (every shard of the mirror, fetched over HTTP), tokenizer/
    (vocab 512), checkpoints/base/d2/ (BASE_ARGS) and logs/base.jsonl. Read-only: copy_home it."""
    home = str(tmp_path_factory.mktemp("base_home"))
    env = dict(mirror["env"], SLIMCHAT_HOME=home)
    run_script(["pretrain.py", "--download=4"], env)
    run_script(["bpe.py", "train", f"--vocab_size={BASE_VOCAB_SIZE}"], env)
    run_script(["pretrain.py", *BASE_ARGS], env)
    return home

# --- mid and sft models (owned by the midtrain/sft work) ------------------------------------
# Both stages inherit the base's rows (128 tokens) and, for midtraining, its batch (8 rows, 1,024
# tokens per step). The mixtures are the real ones at the mirror's sizes, with the spelling tasks
# cut down so a short run sees every kind of task. SFT uses the tiny preset's knobs (run_all.sh):
# 800 steps of 32 conversations, 4 passes over MMLU auxiliary_train, loss per conversation, LR
# x0.25: the fewest steps measured to lift multiple choice off chance (300 x 32 and 500 x 16 did
# not; tests/bench/RESULTS.md). sft_home also mixes in a file of our own conversations (--data,
# add mode), so the chat model knows its name.
MID_ARGS = ["--device=cpu", "--num_steps=150", "--simple_spelling_rows=300", "--spelling_bee_rows=300",
            "--buffer_size=64", "--eval_every=-1", "--eval_tokens=4096"]
SFT_ARGS = ["--device=cpu", "--num_steps=800", "--device_batch_size=32", "--examples_per_step=32",
            "--smoltalk_rows=200", "--spelling_rows=100", "--mmlu_epochs=4", "--init_lr_frac=0.25",
            "--warmdown_frac=0.2", "--loss_per=conversation", "--eval_every=-1", "--eval_steps=4",
            "--mc_every=-1", "--mc_problems=32"]
OWN_CONVERSATIONS = [
    [{"role": "user", "content": "What is your name?"}, {"role": "assistant", "content": "I am slimchat."}],
    {"messages": [{"role": "user", "content": "Who made you?"},
                  {"role": "assistant", "content": "The slimchat team trained me on a tiny world."}]},
]


@pytest.fixture(scope="session")
def mid_home(mirror, base_home, tmp_path_factory):
    """base_home plus checkpoints/mid/d2/ (MID_ARGS) and logs/mid.jsonl. Read-only: copy_home it."""
    home = copy_home(base_home, tmp_path_factory.mktemp("mid") / "home")
    run_script(["midtrain.py", *MID_ARGS], dict(mirror["env"], SLIMCHAT_HOME=home))
    return home


@pytest.fixture(scope="session")
def own_data(tmp_path_factory):
    """A JSONL file of OWN_CONVERSATIONS, both accepted line formats."""
    import json
    path = tmp_path_factory.mktemp("own_data") / "own.jsonl"
    path.write_text("".join(json.dumps(c) + "\n" for c in OWN_CONVERSATIONS))
    return str(path)


@pytest.fixture(scope="session")
def sft_home(mirror, mid_home, own_data, tmp_path_factory):
    """mid_home plus checkpoints/sft/d2/ (SFT_ARGS with --data=own_data) and logs/sft.jsonl.
    Read-only: copy_home it."""
    home = copy_home(mid_home, tmp_path_factory.mktemp("sft") / "home")
    # the longest fixture, and nothing else runs beside it: both cores (1.7x faster, measured)
    env = dict(mirror["env"], SLIMCHAT_HOME=home, OMP_NUM_THREADS="2")
    run_script(["sft.py", *SFT_ARGS, f"--data={own_data}"], env)
    return home
