"""
run_all.sh under a real bash: its helper functions called one by one (the script defines them and
returns when sourced), and whole presets run in a scratch copy of the repo whose .venv stands in
for the installed one (so nothing is installed and nothing touches the network). Ctrl-C and
SIGTERM are real signals to a real tiny pretraining run.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT

RUN_ALL = os.path.join(ROOT, "run_all.sh")
VENV_BIN = os.path.dirname(sys.executable)


def source_and_run(commands, env=None):
    """Source run_all.sh in a fresh bash and run `commands`; returns the CompletedProcess."""
    return subprocess.run(["bash", "-c", f'source "{RUN_ALL}"; {commands}', "run_all_test"], cwd=ROOT,
                          env=env or os.environ, capture_output=True, text=True, timeout=120)


@pytest.fixture
def repo(tmp_path):
    """A scratch checkout: links to the repo's files, and a .venv that runs the test's own Python,
    with the stamps that tell run_all.sh its requirements are installed."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in os.listdir(ROOT):
        if not name.startswith("."):
            os.symlink(os.path.join(ROOT, name), repo / name)
    bin_dir = repo / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (bin_dir / "python").chmod(0o755)
    (bin_dir / "activate").write_text(f'PATH="{VENV_BIN}:$PATH"; export PATH\n')
    digest = subprocess.run("cat requirements*.txt | sha1sum | cut -c1-12", shell=True, cwd=repo,
                            capture_output=True, text=True, check=True).stdout.strip()
    for reqs in ("requirements.txt", "requirements-test.txt"):
        (repo / ".venv" / f".installed-{digest}-{reqs}").touch()
    return repo


def fake_tool(directory, name, script):
    """An executable `name` in `directory` (the machine lacks the real one, or it must fail)."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, name)
    with open(path, "w") as f:
        f.write("#!/bin/sh\n" + script)
    os.chmod(path, 0o755)
    return directory


# ---------------------------------------------------------------------------
# the functions, one by one

@pytest.mark.parametrize("driver, build", [
    ("535.104.05", None),     # R535 LTS: older than CUDA 12.6 (560.28.03)
    ("550.54.15", None),      # CUDA 12.4's driver
    ("560.28.03", "cu126"),   # exactly CUDA 12.6 GA's minimum
    ("565.57.01", "cu126"),
    ("570.26", "cu128"),      # exactly CUDA 12.8 GA's minimum
    ("570.86.15", "cu128"),
    ("575.57.08", "cu128"),   # CUDA 12.9's driver; torch has no cu129 build, so 12.8
    ("580.65.06", "cu130"),   # exactly CUDA 13.0 GA's minimum
    ("580.95.05", "cu130"),
    ("590.44.01", "cu130"),
    ("", "cpu"),              # no driver: pip's default torch, as on every CPU machine
    ("garbage", None),
    ("570", None),
    ("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver", None),
])
def test_torch_build_from_driver_version(driver, build):
    """The speedrun installs the newest torch CUDA build that the driver runs: PyPI's default
    (CUDA 13.0) needs a 580 driver, and on an older one torch sees no GPU at all."""
    proc = source_and_run('torch_build "$DRIVER"', env=dict(os.environ, DRIVER=driver))
    if build is None:
        assert proc.returncode != 0 and proc.stdout == "", proc.stdout
        assert "driver" in proc.stderr, proc.stderr
    else:
        assert (proc.returncode, proc.stdout.strip()) == (0, build), proc.stderr


def test_resume_flag_takes_only_a_checkpoint_of_the_same_tag(tmp_path):
    """A stopped d2 run leaves checkpoints/base/d2; a run at another depth must start afresh (not
    --resume=1 and then fail to find its own tag), and a d2 run must resume."""
    ckpt = tmp_path / "checkpoints" / "base" / "d2"
    ckpt.mkdir(parents=True)
    (ckpt / "meta_000010.json").write_text("{}")
    env = dict(os.environ, SLIMCHAT_HOME=str(tmp_path), PATH=f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}")
    proc = source_and_run('echo "d4:[$(resume_flag base d4)] d2:[$(resume_flag base d2)]"', env=env)
    assert proc.stdout.strip() == "d4:[] d2:[--resume=1]", proc.stdout + proc.stderr


def test_step_stamps_only_what_finished(tmp_path):
    """A finished step is stamped; a stage that stopped early (exit 75) or failed stops the
    pipeline unstamped, with the stage's status as the script's."""
    env = dict(os.environ, SLIMCHAT_HOME=str(tmp_path))
    proc = source_and_run("step first true; step second bash -c 'exit 75'; echo after", env=env)
    assert proc.returncode == 75 and "after" not in proc.stdout, proc.stdout + proc.stderr
    assert sorted(os.listdir(tmp_path / "run_all")) == ["first.done"]
    assert "second: stopped" in proc.stderr and "again" in proc.stderr, proc.stderr
    proc = source_and_run("step third bash -c 'exit 3'; echo after", env=env)
    assert proc.returncode == 3 and "third: failed (exit status 3)" in proc.stderr, proc.stderr
    assert sorted(os.listdir(tmp_path / "run_all")) == ["first.done"]


# ---------------------------------------------------------------------------
# whole presets in the scratch checkout

def test_help_lists_the_presets_and_every_knob(repo):
    """`bash run_all.sh help` names every preset of the script's case and every environment knob
    it reads with a default (${NAME:-...}), so a new knob cannot go unlisted."""
    proc = subprocess.run(["bash", "run_all.sh", "help"], cwd=repo, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    text = open(RUN_ALL).read()
    knobs = set(re.findall(r"\$\{([A-Z][A-Z0-9_]*):-", text)) - {"HOME"}
    presets = {p for line in re.findall(r"^([a-z][a-z| -]*)\)$", text, re.M) for p in line.split(" | ")
               if p[0].isalpha()}
    assert knobs >= {"DEPTH", "NPROC", "DEVICE_BATCH_SIZE", "SLIMCHAT_HOME", "TORCH_BUILD"}
    assert presets >= {"speedrun", "tiny", "test", "help"}
    missing = [name for name in knobs | presets if not re.search(rf"\b{name}\b", proc.stdout)]
    assert not missing, f"run_all.sh help does not mention {missing}:\n{proc.stdout}"
    assert "75" in proc.stdout   # the exit status of a stopped run


@pytest.mark.parametrize("nvidia_smi, says", [
    (None, "no nvidia-smi"),
    ("echo 'NVIDIA-SMI has failed because it could not communicate with the NVIDIA driver'; exit 9",
     "finds no usable GPU"),
    ("echo 535.104.05", "older than every CUDA build"),
])
def test_speedrun_without_usable_gpus_says_what_to_do(repo, tmp_path, nvidia_smi, says):
    """No nvidia-smi (a CPU machine), a driver that does not answer, or one too old for every torch
    build: the speedrun stops before installing anything, says what is wrong and what to do,
    instead of exiting silently with status 127."""
    path = "/usr/bin:/bin"
    if nvidia_smi is not None:
        path = fake_tool(str(tmp_path / "bin"), "nvidia-smi", nvidia_smi + "\n") + ":" + path
    elif shutil.which("nvidia-smi", path=path):
        pytest.skip("this machine has nvidia-smi")
    proc = subprocess.run(["bash", "run_all.sh"], cwd=repo, env=dict(os.environ, PATH=path),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert says in proc.stderr, proc.stderr
    if nvidia_smi is None:
        assert "bash run_all.sh tiny" in proc.stderr
    else:
        assert "README" in proc.stderr or "TORCH_BUILD" in proc.stderr


def test_venv_failure_gets_a_one_line_fix(repo, tmp_path):
    """Debian's python3 without its venv module: say which package to install, and leave no
    half-made .venv that the next run would take for a working one."""
    shutil.rmtree(repo / ".venv")
    bin_dir = fake_tool(str(tmp_path / "bin"), "python3",
                        'echo "The virtual environment was not created successfully because ensurepip is not available."\n'
                        'mkdir -p .venv/bin && ln -sf /bin/true .venv/bin/python\nexit 1\n')
    proc = subprocess.run(["bash", "run_all.sh", "tiny"], cwd=repo, env=dict(os.environ, PATH=f"{bin_dir}:/usr/bin:/bin"),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "apt install python3-venv" in proc.stderr, proc.stderr
    assert not os.path.exists(repo / ".venv")


def tiny_home(base_home, where):
    """A tiny-preset SLIMCHAT_HOME whose steps before pretraining are done: base_home's shards and
    tokenizer, their stamps, no checkpoints or logs."""
    for name in ("data", "tokenizer"):
        shutil.copytree(os.path.join(base_home, name), os.path.join(where, name))
    os.makedirs(os.path.join(where, "run_all"))
    for done in ("mirror", "download", "tokenizer", "tokenizer_eval"):
        open(os.path.join(where, "run_all", f"{done}.done"), "w").close()
    return str(where)


def saved_steps(home):
    ckpt = os.path.join(home, "checkpoints", "base", "d2")
    return sorted(int(f[5:11]) for f in os.listdir(ckpt) if f.startswith("meta_")) if os.path.isdir(ckpt) else []


def trained_past(home, step):
    """True once pretraining has logged a training step after `step`."""
    path = os.path.join(home, "logs", "base.jsonl")
    if not os.path.exists(path):
        return False
    with open(path) as f:
        records = [json.loads(line) for line in f if line.endswith("\n")]
    return any("loss" in r and r["step"] > step for r in records)


# bash cannot trap a signal that was ignored when it started (pytest may run with SIGINT ignored,
# as a background job does): a small Python sets SIGINT back to its default, then becomes bash.
BASH_WITH_SIGINT = "import os, signal; signal.signal(signal.SIGINT, signal.SIG_DFL); os.execvp('bash', {})"


def start_tiny(repo, home, out_path):
    """`bash run_all.sh tiny` in its own session, like a terminal's foreground job (Ctrl-C goes to
    the whole process group); the returned process is bash itself."""
    argv = ["bash", "run_all.sh", "tiny"]
    with open(out_path, "w") as out:
        return subprocess.Popen([sys.executable, "-c", BASH_WITH_SIGINT.format(argv)], cwd=repo,
                                env=dict(os.environ, SLIMCHAT_HOME=home, OMP_NUM_THREADS="1"), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def wait_until(proc, condition, out_path, timeout=240):
    deadline = time.time() + timeout
    while not condition() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert proc.poll() is None and condition(), f"the run ended or hung:\n{open(out_path).read()[-4000:]}"


def test_ctrl_c_and_sigterm_stop_the_pipeline_and_the_next_run_resumes(repo, base_home, tmp_path):
    """Ctrl-C during pretraining: the stage saves a checkpoint and the whole pipeline stops with
    status 75, pretraining unstamped (before, it exited 0, got stamped, and eval ran on a
    half-trained model). The next run resumes it (--resume=1); a SIGTERM sent to the script alone
    (kill, docker stop) reaches the stage the same way."""
    home = tiny_home(base_home, tmp_path / "home")
    out_path = tmp_path / "first.log"
    proc = start_tiny(repo, home, out_path)
    wait_until(proc, lambda: trained_past(home, 0), out_path)
    os.killpg(proc.pid, signal.SIGINT)   # what the terminal does on Ctrl-C
    assert proc.wait(timeout=120) == 75, open(out_path).read()[-4000:]
    output = open(out_path).read()
    first = saved_steps(home)
    assert len(first) == 1 and first[0] > 0, output
    assert not os.path.exists(os.path.join(home, "run_all", "pretrain-d2.done"))
    assert "pretrain-d2: stopped" in output and "eval_base" not in output, output[-4000:]

    out_path = tmp_path / "second.log"
    proc = start_tiny(repo, home, out_path)
    wait_until(proc, lambda: trained_past(home, first[0]), out_path)
    os.kill(proc.pid, signal.SIGTERM)    # to the script only
    assert proc.wait(timeout=120) == 75, open(out_path).read()[-4000:]
    output = open(out_path).read()
    assert "--resume=1" in output, output[-4000:]
    assert saved_steps(home)[-1] > first[0], output[-4000:]
    assert not os.path.exists(os.path.join(home, "run_all", "pretrain-d2.done"))
