"""
rl.py: the pure pieces (reward, advantages, pass@k, masking, the loss, the data cursor) on worked
examples, then real runs from the session's tiny SFT model (conftest sft_home) on the mirror's
arithmetic word problems: the learning run, a 2-process torchrun with --resume, and Ctrl-C.
"""
import json
import math
import os
import signal
import subprocess
import sys

import pytest
import torch

import gpt
import rl
from conftest import ROOT, copy_home, run_script

# The learning run: 8 questions x 16 samples per step at T=1.0 (the tiny model solves ~4% of its
# samples, so 16 per question are needed for a group with both outcomes to be common), 30 steps
# at 30% of the pretraining LRs (0.05, the big-model value, barely moves it; 0.5 collapsed it to
# zero reward in trials). pass@1 is measured on 100 test questions x 8 samples at steps 0 and 30.
RL_ARGS = ["--device=cpu", "--examples_per_step=8", "--num_samples=16", "--device_batch_size=8",
           "--max_new_tokens=64", "--temperature=1.0", "--init_lr_frac=0.3", "--eval_examples=100",
           "--eval_samples=8", "--save_every=-1"]
LEARN_STEPS = 30


def test_advantage_is_reward_minus_group_mean():
    """Each question is its own baseline: a question every sample solves (or none) gives no signal."""
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 1.0]])
    expected = torch.tensor([[0.5, -0.5, -0.5, 0.5], [0.0, 0.0, 0.0, 0.0], [-0.25, -0.25, -0.25, 0.75]])
    assert torch.equal(rl.group_advantages(rewards), expected)


def test_pass_at_k_worked_examples():
    """Unbiased pass@k: k=1 is c/n, k=n is "any correct", and 2 of 4 correct gives 5/6 at k=2."""
    assert rl.pass_at_k(8, 0, 1) == 0.0
    assert math.isclose(rl.pass_at_k(8, 3, 1), 3 / 8)
    assert rl.pass_at_k(8, 1, 8) == 1.0
    assert math.isclose(rl.pass_at_k(4, 2, 2), 1 - 1 / 6)   # only the pair of wrong ones fails
    assert math.isclose(rl.pass_at_k(4, 1, 2), 1 - 3 / 6)


def test_step_questions_split_ranks_without_overlap():
    """The ranks of one step share its questions exactly, and consecutive steps move on."""
    ranks = [rl.step_questions(3, 4, r, 2, 100) for r in range(2)]
    assert ranks == [[12, 14], [13, 15]]
    assert rl.step_questions(4, 4, 0, 1, 10) == [6, 7, 8, 9]
    assert rl.step_questions(2, 4, 0, 1, 10) == [8, 9, 0, 1]   # wraps around the dataset


def test_sample_seed_is_stable_and_distinct():
    """Seeds are the same in every process (no PYTHONHASHSEED dependence) and differ per pass."""
    assert rl.sample_seed(0, 1, 2, 3) == hash((0, 1, 2, 3)) & 0x7FFFFFFF
    assert len({rl.sample_seed(0, 5, 7, p) for p in range(16)}) == 16


def test_rollout_batch_masks_prompt_tool_output_and_padding():
    """Only tokens the policy sampled are targets: prompt, forced calculator output, pad are -1."""
    sequences = [[1, 2, 3, 4, 5, 6], [1, 2, 3, 7]]
    masks = [[0, 0, 0, 1, 0, 1], [0, 0, 0, 1]]   # token 5 was forced by the calculator
    inputs, targets = rl.rollout_batch(sequences, masks, pad_id=9, device="cpu")
    assert inputs.tolist() == [[1, 2, 3, 4, 5], [1, 2, 3, 7, 9]]
    assert targets.tolist() == [[-1, -1, 4, -1, 6], [-1, -1, 7, -1, -1]]


def test_policy_gradient_loss_is_token_normalised():
    """Loss = -(sum of logp * A over sampled tokens) / N; the gradient on each logp is -A / N."""
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, -0.5]], requires_grad=True)
    targets = torch.tensor([[-1, 5, 6], [7, -1, -1]])
    advantages = torch.tensor([0.5, -1.0])
    loss = rl.policy_gradient_loss(logp, targets, advantages, num_tokens=3)
    assert math.isclose(loss.item(), -((-2.0 - 3.0) * 0.5 + (-0.5) * -1.0) / 3, rel_tol=1e-6)
    loss.backward()
    assert torch.allclose(logp.grad, torch.tensor([[0.0, -0.5 / 3, -0.5 / 3], [1.0 / 3, 0.0, 0.0]]))


def test_reward_is_the_gsm8k_grader(mirror, tmp_path, monkeypatch):
    """The reward is 1.0 exactly when the '#### N' of the completion matches the reference."""
    import evaluate
    monkeypatch.setenv("SLIMCHAT_HOME", str(tmp_path))
    monkeypatch.setenv("HF_ENDPOINT", mirror["env"]["HF_ENDPOINT"])
    task = evaluate.GSM8K("test")
    conversation = task[0]
    answer = conversation["messages"][-1]["content"][-1]["text"]   # "... #### N"
    number = int(answer.split("####")[-1])
    assert rl.reward(task, conversation, f"so it is {number}.\n#### {number}") == 1.0
    assert rl.reward(task, conversation, f"#### {number + 1}") == 0.0
    assert rl.reward(task, conversation, f"{number}") == 0.0   # no final '####' line


def rl_env(mirror, home):
    # one thread per process: the tiny model's ops are too small to gain from sharing busy cores
    return dict(mirror["env"], SLIMCHAT_HOME=home, OMP_NUM_THREADS="1")


def read_log(home):
    with open(os.path.join(home, "logs", "rl.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [r for r in rows if "reward" in r], [r for r in rows if "pass@1" in r]


@pytest.fixture(scope="module")
def learning_run(sft_home, mirror, tmp_path_factory):
    """LEARN_STEPS steps of RL_ARGS from the tiny SFT model: (home, train rows, eval rows)."""
    home = copy_home(sft_home, tmp_path_factory.mktemp("rl_learn") / "home")
    run_script(["rl.py", *RL_ARGS, f"--num_steps={LEARN_STEPS}", f"--eval_every={LEARN_STEPS}"],
               rl_env(mirror, home))
    return (home, *read_log(home))


def test_rl_raises_reward_and_held_out_pass_at_1(learning_run):
    """The point of the stage: the mean reward on training questions (each step draws new ones)
    grows from the first to the last 8 steps, and sampled pass@1 on held-out test questions (all
    100 of the mirror's) rises. Measured from the fixture's SFT model (GSM8K 6 of 12 greedy):
    reward 0.337 -> 0.481, pass@1 0.255 -> 0.446; the bars are about half of those gains.
    The steps are deterministic, but the margins depend on the SFT model: in trials on an earlier,
    weaker tiny SFT model, other --seed values gave held-out gains of -1 to +6 points."""
    home, train, evals = learning_run
    assert [r["step"] for r in train] == list(range(LEARN_STEPS))
    first = sum(r["reward"] for r in train[:8]) / 8
    last = sum(r["reward"] for r in train[-8:]) / 8
    assert last >= first + 0.07, f"reward {first:.4f} -> {last:.4f}"
    assert [e["step"] for e in evals] == [0, LEARN_STEPS]
    before, after = evals[0]["pass@1"], evals[1]["pass@1"]
    assert after >= before + 0.08, f"pass@1 {before:.4f} -> {after:.4f}"
    assert all(evals[1][f"pass@{k}"] >= evals[1][f"pass@{k - 1}"] for k in range(2, 9))


def test_lr_decays_linearly_and_the_run_ends_with_a_checkpoint(learning_run):
    home, train, _ = learning_run
    assert [r["lrm"] for r in train] == pytest.approx([1 - s / LEARN_STEPS for s in range(LEARN_STEPS)])
    assert all(0 < r["sample_len"] <= 64 for r in train)
    meta = json.load(open(os.path.join(home, "checkpoints", "rl", "d2", f"meta_{LEARN_STEPS:06d}.json")))
    assert meta["stage"] == "rl" and meta["config"]["num_samples"] == 16


def test_torchrun_two_ranks_match_one_process_then_resume(learning_run, sft_home, mirror, tmp_path):
    """Two gloo ranks split the questions and the test slice: before any update they must see
    exactly the rewards and pass@k of the one-process run. Then --resume=1 continues from the
    2-rank checkpoint (both optimizer shards) to the new last step."""
    _, train_1p, evals_1p = learning_run
    home = copy_home(sft_home, tmp_path / "home")
    env = rl_env(mirror, home)
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "rl.py", *RL_ARGS]
    run_script([*torchrun, "--num_steps=2", "--eval_every=2"], env)
    train, evals = read_log(home)
    assert train[0]["reward"] == train_1p[0]["reward"]
    assert evals[0] == pytest.approx(evals_1p[0])
    ckpt = os.path.join(home, "checkpoints", "rl", "d2")
    assert {f"optim_000002_rank{r}.pt" for r in (0, 1)} <= set(os.listdir(ckpt))
    run_script([*torchrun, "--num_steps=3", "--eval_every=-1", "--resume=1"], env)
    train, _ = read_log(home)
    assert [r["step"] for r in train] == [0, 1, 2]
    assert train[2]["lrm"] == pytest.approx(1 / 3)
    assert {f"optim_000003_rank{r}.pt" for r in (0, 1)} <= set(os.listdir(ckpt))


def test_ctrl_c_saves_and_stops(sft_home, mirror, tmp_path):
    """SIGINT mid-run: the step in flight finishes, a checkpoint is written, the exit status is 75
    ("stopped early, checkpoint saved")."""
    home = copy_home(sft_home, tmp_path / "home")
    args = ["--device=cpu", "--num_steps=500", "--examples_per_step=1", "--num_samples=2",
            "--device_batch_size=2", "--max_new_tokens=16", "--eval_every=-1", "--save_every=-1"]
    proc = subprocess.Popen([sys.executable, "rl.py", *args], cwd=ROOT, env=rl_env(mirror, home),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if line.startswith("step 00001/"):
            break
    proc.send_signal(signal.SIGINT)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == gpt.STOPPED_EXIT_CODE, output
    train, _ = read_log(home)
    saved = sorted(f for f in os.listdir(os.path.join(home, "checkpoints", "rl", "d2")) if f.startswith("meta_"))
    assert saved == [f"meta_{len(train):06d}.json"] and 2 <= len(train) < 500
