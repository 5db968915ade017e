"""
midtrain.py and sft.py: the loaders on worked examples (packing, padding, masking, cropping, exact
resume), then real runs on the mirror: the chat model beats the base model, a killed or
interrupted run resumes to the very same weights, and a bad line of --data is reported by number.
"""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

import bpe
import evaluate
import gpt
import midtrain
import sft
from conftest import MID_ARGS, ROOT, SFT_ARGS, copy_home, run_script

CRAFTED = {"messages": [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Ada has 3 figs and buys 4 more. How many now?"},
    {"role": "assistant", "content": [{"type": "text", "text": "She has "},
                                      {"type": "python", "text": "3+4"},
                                      {"type": "python_output", "text": "7"},
                                      {"type": "text", "text": "7 figs.\n#### 7"}]},
    {"role": "user", "content": "Thanks!"},
    {"role": "assistant", "content": "You are welcome."}]}


@pytest.fixture(scope="module")
def tok(base_home):
    return bpe.Tokenizer.load(os.path.join(base_home, "tokenizer", "tokenizer.json"))


def tiny_model(vocab_size):
    """A random 1-layer model whose head is not zero, so every position has a gradient."""
    torch.manual_seed(0)
    model = gpt.new_model(gpt.GPTConfig(sequence_len=256, vocab_size=vocab_size, n_layer=1, n_head=2,
                                        n_kv_head=2, n_embd=64), "cpu", torch.float32)
    torch.nn.init.normal_(model.lm_head.weight, std=0.5)
    return model


def test_targets_are_exactly_the_assistant_tokens(tok):
    """Targets keep what the assistant writes (text, python calls, <|assistant_end|>) and are -1
    on the system/user turns, the tool output and the padding; pads are <|assistant_end|>."""
    ids, mask = tok.render_conversation(CRAFTED)
    short = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}
    x, y = sft.pad_rows([sft.render_row(tok, CRAFTED, 256), sft.render_row(tok, short, 256)],
                        tok.special("<|assistant_end|>"))
    assert x[0].tolist() == ids[:-1]
    assert [t >= 0 for t in y[0].tolist()] == [m == 1 for m in mask[1:]]
    kept = [t for t in y[0].tolist() if t >= 0]
    end, py0, py1 = (tok.special(s) for s in ("<|assistant_end|>", "<|python_start|>", "<|python_end|>"))
    assert kept == (tok.encode("She has ") + [py0] + tok.encode("3+4") + [py1] + tok.encode("7 figs.\n#### 7")
                    + [end] + tok.encode("You are welcome.") + [end])
    width = len(tok.render_conversation(short)[0]) - 1
    assert set(x[1, width:].tolist()) == {end} and set(y[1, width:].tolist()) == {-1}


def test_loss_and_gradient_only_on_assistant_tokens(tok):
    """The training loss is the mean over assistant targets, and its gradient reaches the logits
    of assistant positions only: a user turn, a tool output or a pad contributes exactly zero."""
    model = tiny_model(tok.vocab_size)
    x, y = sft.pad_rows([sft.render_row(tok, CRAFTED, 256)], tok.special("<|assistant_end|>"))
    captured = {}

    def keep(module, inputs, output):
        output.retain_grad()
        captured["logits"] = output

    hook = model.lm_head.register_forward_hook(keep)
    loss = sft.masked_loss(model, x, y)
    hook.remove()
    loss.backward()
    per_position = captured["logits"].grad[0].abs().sum(-1)          # (T,)
    assistant = y[0] >= 0
    assert torch.all(per_position[~assistant] == 0)
    assert torch.all(per_position[assistant] > 0)
    with torch.no_grad():
        ce = model(x, y, loss_reduction="none")[0]                  # (T,), 0 where the target is -1
    assert torch.all(ce[~assistant] == 0)
    assert torch.isclose(loss, ce[assistant].mean())


def test_loss_per_conversation_weighs_every_conversation_the_same(tok):
    """--loss_per=conversation: the mean of each row's mean, so a one-letter answer counts as much
    as a long worked one; the default is the mean over all assistant tokens of the batch."""
    model = tiny_model(tok.vocab_size)
    letter = [{"role": "user", "content": "Pick one: A or B?"}, {"role": "assistant", "content": "B"}]
    rows = [sft.render_row(tok, c, 256) for c in (CRAFTED, letter)]
    x, y = sft.pad_rows(rows, tok.special("<|assistant_end|>"))
    with torch.no_grad():
        ce = model(x, y, loss_reduction="none")
        counts = (y >= 0).sum(1)
        assert counts[0] > 4 * counts[1]
        per_row = ce.sum(1) / counts
        assert torch.isclose(sft.masked_loss(model, x, y, "conversation"), per_row.mean())
        assert torch.isclose(sft.masked_loss(model, x, y), ce.sum() / counts.sum())


def test_overlong_conversation_is_skipped_not_trained_as_nothing(tok):
    """A user turn longer than the row leaves no assistant token: the loader skips it and counts
    it, so every row has targets and the loss stays finite."""
    huge = {"messages": [{"role": "user", "content": "Mira lives in Oakvale. " * 100},
                         {"role": "assistant", "content": "Yes."}]}
    assert sft.render_row(tok, huge, 128) is None
    loader = sft.sft_batches([huge, CRAFTED, huge, CRAFTED, CRAFTED], tok, 2, 128)
    x, y, before = next(loader)
    _, _, after = next(loader)
    assert before == {"cursor": 0, "skipped": 0} and after == {"cursor": 4, "skipped": 2}
    assert x.size(1) <= 128 and torch.all((y >= 0).sum(1) > 0)
    assert torch.isfinite(sft.masked_loss(tiny_model(tok.vocab_size), x, y))


def test_packed_rows_are_full_bos_aligned_and_resume_exactly(tok):
    """Midtraining rows hold T+1 tokens with no padding, start with <|bos|>, crop an overlong
    conversation, and the state that comes with a batch yields that same batch again."""
    data = [CRAFTED, {"messages": [{"role": "user", "content": "Spell the word: figs"},
                                   {"role": "assistant", "content": "figs:f,i,g,s"}]},
            {"messages": [{"role": "user", "content": "Mira lives in Oakvale. " * 60},
                          {"role": "assistant", "content": "Yes."}]}] * 20
    loader = midtrain.packed_batches(data, tok, 4, 64, buffer_size=6)
    batches = [next(loader) for _ in range(4)]
    for x, y, _ in batches:
        assert x.shape == (4, 64) and torch.all(x[:, 0] == tok.bos_id)
        assert torch.equal(x[:, 1:], y[:, :-1])
    x, y, state = batches[2]
    again = next(midtrain.packed_batches(data, tok, 4, 64, state=json.loads(json.dumps(state)), buffer_size=6))
    assert torch.equal(again[0], x) and torch.equal(again[1], y)
    assert 0 < midtrain.pass_progress(batches[3][2], 1, len(data)) < 1


def test_ranks_take_disjoint_conversations(tok):
    """With 2 ranks, rank r takes positions r, r+2, ...: together they cover each conversation once."""
    data = [{"messages": [{"role": "user", "content": f"What is {i} + {i}?"},
                          {"role": "assistant", "content": f"{2 * i}"}]} for i in range(6)]
    pad_id = tok.special("<|assistant_end|>")
    for rank in range(2):
        x, y, _ = next(sft.sft_batches(data, tok, 3, 64, rank=rank, world=2))
        want_x, want_y = sft.pad_rows([sft.render_row(tok, data[i], 64) for i in (rank, rank + 2, rank + 4)], pad_id)
        assert torch.equal(x, want_x) and torch.equal(y, want_y)


def chat_scores(home, stage, mirror_env, monkeypatch, problems=64, gsm8k_problems=12):
    """A stage's accuracy on MMLU and ARC-Easy (categorical) and GSM8K (generative, calculator on),
    and the probability it gives the answer letters right after <|assistant_start|> on MMLU."""
    import evaluate
    monkeypatch.setenv("SLIMCHAT_HOME", home)
    for name in ("HF_ENDPOINT", "SLIMCHAT_FILES_ENDPOINT"):
        monkeypatch.setenv(name, mirror_env[name])
    tokenizer = gpt.load_tokenizer()
    model, _, _ = gpt.load_checkpoint(stage, "cpu", tokenizer=tokenizer, dtype=torch.float32)
    model.eval()
    engine = gpt.Engine(model, tokenizer)
    mmlu, arc, gsm8k = evaluate.MMLU("test"), evaluate.ARC("ARC-Easy", "test"), evaluate.GSM8K("test")
    scores = {"MMLU": evaluate.run_chat_eval(mmlu, model, tokenizer, engine, max_problems=problems),
              "ARC-Easy": evaluate.run_chat_eval(arc, model, tokenizer, engine, max_problems=problems),
              "GSM8K": evaluate.run_chat_eval(gsm8k, model, tokenizer, engine, max_problems=gsm8k_problems,
                                              max_new_tokens=80)}
    mass = 0.0
    for i in range(problems):
        prompt = tokenizer.render_for_completion(mmlu[i])
        with torch.no_grad():
            probs = model(torch.tensor([prompt]))[0, -1].softmax(-1)
        mass += probs[evaluate.letter_ids(tokenizer, mmlu.letters(mmlu[i]))].sum().item() / problems
    return dict(scores, letter_mass=mass)


def test_lr_holds_then_decays_over_the_warmdown():
    assert [sft.lr_multiplier(s, 100, 1.0) for s in (0, 50, 100)] == [1.0, 0.5, 0.0]   # §7 E
    assert [sft.lr_multiplier(s, 100, 0.5) for s in (0, 50, 75, 100)] == [1.0, 1.0, 0.5, 0.0]   # §7 H


def test_chat_model_beats_base_model(mirror, sft_home, monkeypatch):
    """Midtraining then SFT turn the base model into one that answers multiple choice with a
    letter (the base model almost never does), picks the right letter well above chance on the
    mirror's MMLU and ARC-Easy test questions (the base model, read through its letter logits,
    sits at chance), and solves arithmetic word problems with the calculator (the base solves none).
    Measured: MMLU 0.265 -> 0.475, ARC-Easy 0.285 -> 0.42 (200 each), GSM8K 0 -> 6 of 12."""
    base = chat_scores(sft_home, "base", mirror["env"], monkeypatch, problems=200)
    chat = chat_scores(sft_home, "sft", mirror["env"], monkeypatch, problems=200)
    print(f"base {base}\nsft  {chat}")
    assert base["letter_mass"] < 0.1 and chat["letter_mass"] > 0.9, (base, chat)
    for task in ("MMLU", "ARC-Easy"):
        assert chat[task] >= base[task] + 0.06, (task, base, chat)
    assert chat["MMLU"] + chat["ARC-Easy"] >= base["MMLU"] + base["ARC-Easy"] + 0.2, (base, chat)
    assert chat["GSM8K"] >= base["GSM8K"] + 3 / 12, (base, chat)


def test_mmlu_epochs_adds_passes_over_auxiliary_train(mirror, base_home, tmp_path, monkeypatch):
    """--mmlu_epochs=n puts every MMLU auxiliary_train question into the SFT mixture n times."""
    monkeypatch.setenv("SLIMCHAT_HOME", copy_home(base_home, tmp_path / "home"))   # task files get fetched into it
    for name in ("HF_ENDPOINT", "SLIMCHAT_FILES_ENDPOINT"):
        monkeypatch.setenv(name, mirror["env"][name])
    plain = sft.train_mixture(None, "add", smoltalk_rows=10, spelling_rows=10)
    more = sft.train_mixture(None, "add", smoltalk_rows=10, spelling_rows=10, mmlu_epochs=2)
    aux = evaluate.MMLU("auxiliary_train")
    assert len(more) == len(plain) + 2 * len(aux)
    first = aux[0]["messages"][0]["content"]
    assert sum(more[i]["messages"][0]["content"] == first for i in range(len(more))) == 2


def latest_weights(home, stage):
    ckpt = os.path.join(home, "checkpoints", stage, "d2")
    step = max(int(f[5:11]) for f in os.listdir(ckpt) if f.startswith("meta_"))
    return step, torch.load(os.path.join(ckpt, f"model_{step:06d}.pt"), weights_only=True)


def run_until(args, env, line_start, sig):
    """Start a stage, send `sig` once it prints a line starting with `line_start`; return its output."""
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith(line_start):
            proc.send_signal(sig)
            break
    rest, _ = proc.communicate(timeout=300)
    return proc.returncode, "".join(lines) + rest


def test_midtrain_killed_then_resumed_matches_uninterrupted(mirror, base_home, mid_home, tmp_path):
    """SIGKILL right after a checkpoint, then --resume=1: the final weights equal those of the
    uninterrupted run (mid_home), bit for bit, so the loader, optimizer and schedule all resumed."""
    home = copy_home(base_home, tmp_path / "home")
    env = dict(mirror["env"], SLIMCHAT_HOME=home)
    code, out = run_until(["midtrain.py", *MID_ARGS, "--save_every=20"], env, "saved step 20", signal.SIGKILL)
    assert code == -signal.SIGKILL, out
    killed_at, _ = latest_weights(home, "mid")
    assert 20 <= killed_at < 150
    run_script(["midtrain.py", *MID_ARGS, "--save_every=20", "--resume=1"], env)
    step, resumed = latest_weights(home, "mid")
    want_step, want = latest_weights(mid_home, "mid")
    assert step == want_step == 150
    assert all(torch.equal(resumed[k], want[k]) for k in want)


def test_sft_interrupted_then_resumed_matches_uninterrupted(mirror, mid_home, own_data, tmp_path):
    """Ctrl-C (SIGINT) saves a checkpoint at the current step and exits with status 75 ("stopped
    early, checkpoint saved"); --resume=1 then ends with exactly the weights of an uninterrupted run."""
    args = ["sft.py", *SFT_ARGS, "--num_steps=60", "--device_batch_size=8", "--examples_per_step=8",
            f"--data={own_data}"]
    whole = copy_home(mid_home, tmp_path / "whole")
    run_script(args, dict(mirror["env"], SLIMCHAT_HOME=whole))
    home = copy_home(mid_home, tmp_path / "home")
    env = dict(mirror["env"], SLIMCHAT_HOME=home)
    code, out = run_until(args, env, "step 00020/", signal.SIGINT)
    assert code == gpt.STOPPED_EXIT_CODE, out
    stopped_at, _ = latest_weights(home, "sft")
    assert 20 <= stopped_at < 60, out
    run_script([*args, "--resume=1"], env)
    step, resumed = latest_weights(home, "sft")
    want_step, want = latest_weights(whole, "sft")
    assert step == want_step == 60
    assert all(torch.equal(resumed[k], want[k]) for k in want)
    with open(os.path.join(home, "logs", "sft.jsonl")) as f:
        steps = [r["step"] for r in map(json.loads, f) if "loss" in r]
    assert steps == list(range(1, 61))   # the resumed run appended the rest of the log, no step twice


def test_bad_jsonl_line_is_reported_by_number(mirror, mid_home, tmp_path):
    """A broken line of --data stops the run before any work, naming the line; nothing is written,
    and the same file with that line fixed trains."""
    home = copy_home(mid_home, tmp_path / "home")
    env = dict(mirror["env"], SLIMCHAT_HOME=home)
    good = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    lines = [json.dumps(good), json.dumps({"messages": good}), '{"messages": [', json.dumps(good)]
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join(lines) + "\n")
    for script in ("sft.py", "midtrain.py"):
        proc = subprocess.run([sys.executable, script, "--device=cpu", f"--data={path}"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode != 0
        assert "line 3" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    roles = tmp_path / "roles.jsonl"
    roles.write_text(json.dumps(good) + "\n" + json.dumps(good[::-1]) + "\n")   # assistant speaks first
    with pytest.raises(SystemExit, match="line 2"):
        evaluate.load_own_data(str(roles))
    assert not os.path.exists(os.path.join(home, "checkpoints", "sft"))
    assert not os.path.exists(os.path.join(home, "logs", "sft.jsonl"))
    lines[2] = json.dumps(good)
    path.write_text("\n".join(lines) + "\n")
    run_script(["sft.py", *SFT_ARGS, "--num_steps=2", f"--data={path}", "--data_mode=replace"], env)
    assert latest_weights(home, "sft")[0] == 2


def test_sft_under_torchrun_splits_conversations_by_rank(mirror, mid_home, tmp_path):
    """Two gloo ranks: each takes every other conversation, the checkpoint records both loader
    positions (rank-strided cursors) and both optimizer shards, and the run ends cleanly."""
    home = copy_home(mid_home, tmp_path / "home")
    env = dict(mirror["env"], SLIMCHAT_HOME=home)
    run_script(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "sft.py", *SFT_ARGS,
                "--num_steps=3", "--device_batch_size=2", "--examples_per_step=8", "--mc_problems=8"], env)
    ckpt = os.path.join(home, "checkpoints", "sft", "d2")
    with open(os.path.join(ckpt, "meta_000003.json")) as f:
        meta = json.load(f)
    assert meta["world_size"] == 2
    cursors = [state["cursor"] for state in meta["loop_state"]["loader"]]
    assert [c % 2 for c in cursors] == [0, 1] and min(cursors) >= 3 * 2 * 2 * 2   # 3 steps x 2 micro x 2 rows x 2 ranks
    assert all(os.path.exists(os.path.join(ckpt, f"optim_000003_rank{r}.pt")) for r in range(2))
