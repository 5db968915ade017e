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
# PLACEHOLDER-BASE

# --- mid and sft models (owned by the midtrain/sft work) ------------------------------------
# PLACEHOLDER-SFT
