"""
A new user's first hour (issue 16): errors that say what to do, damaged checkpoints, the terminal
chat's commands, --help on every script, and the report card. Real files and real subprocesses;
the models are tiny random ones built here (no training), so the whole file takes seconds.
"""
import io
import json
import os
import runpy
import socket
import subprocess
import sys
import xml.dom.minidom

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import evaluate
import gpt
import serve
from conftest import BASE_ARGS, copy_home, run_script
from test_serve import build_tiny_home

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["pretrain.py", "midtrain.py", "sft.py", "rl.py", "evaluate.py", "serve.py"]


def run(args, env, timeout=120):
    """A script of the repo as a real process; -> CompletedProcess (text)."""
    return subprocess.run([sys.executable, *args], cwd=ROOT, env={**env, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=timeout)


def save_steps(steps):
    """Checkpoints of one small random model at `steps` under $SLIMCHAT_HOME (stage base); -> its directory."""
    model = gpt.new_model(gpt.GPTConfig(sequence_len=16, vocab_size=64, n_layer=1, n_head=2, n_kv_head=2,
                                        n_embd=32), "cpu")
    for step in steps:
        ckpt_dir = gpt.save_checkpoint("base", step, model, {"note": f"step {step}"})
        # the newest step is the one saved last (by its meta's time): make the order unambiguous
        meta = os.path.join(ckpt_dir, f"meta_{step:06d}.json")
        os.utime(meta, ns=(step * 10**9, step * 10**9))
    return ckpt_dir

# ---------------------------------------------------------------------------
# damaged checkpoints


def damage(ckpt_dir, how):
    model, meta = os.path.join(ckpt_dir, "model_000002.pt"), os.path.join(ckpt_dir, "meta_000002.json")
    if how == "truncated":
        data = open(model, "rb").read()
        open(model, "wb").write(data[:len(data) // 2])
    elif how == "empty":
        open(model, "wb").close()
    elif how == "not a checkpoint":
        open(model, "w").write("hello, I am a text file\n")
    elif how == "missing keys":
        state = torch.load(model, weights_only=True)
        state.pop("lm_head.weight")
        torch.save(state, model)
    elif how == "corrupt meta":
        text = open(meta).read()
        open(meta, "w").write(text[:len(text) // 2])
        os.utime(meta, ns=(2 * 10**9, 2 * 10**9))
    elif how == "meta without config":
        data = json.load(open(meta))
        data.pop("model_config")
        open(meta, "w").write(json.dumps(data))
        os.utime(meta, ns=(2 * 10**9, 2 * 10**9))
    return model if "meta" not in how else meta


@pytest.mark.parametrize("how", ["truncated", "empty", "not a checkpoint", "missing keys", "corrupt meta",
                                 "meta without config"])
def test_damaged_checkpoint_falls_back_to_the_previous_one(how, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SLIMCHAT_HOME", str(tmp_path))
    ckpt_dir = save_steps([1, 2])
    bad_file = damage(ckpt_dir, how)
    _, meta, _ = gpt.load_checkpoint("base", "cpu")
    assert meta["step"] == 1
    warning = capsys.readouterr().err
    assert f"damaged checkpoint {bad_file} (step 2)" in warning and "loading step 1 instead" in warning
    with pytest.raises(gpt.CheckpointError, match=f"{bad_file} \\(step 2\\)"):   # asked for by number: no stand-in
        gpt.load_checkpoint("base", "cpu", step=2)


def test_damaged_optimizer_state_is_named_without_a_fallback(tmp_path, monkeypatch):
    """Each rank reads its own optimizer shard: one rank must not fall back alone."""
    monkeypatch.setenv("SLIMCHAT_HOME", str(tmp_path))
    model = gpt.new_model(gpt.GPTConfig(sequence_len=16, vocab_size=64, n_layer=1, n_head=2, n_kv_head=2,
                                        n_embd=32), "cpu")
    ckpt_dir = gpt.save_checkpoint("base", 3, model, {}, optimizer=model.setup_optimizer())
    open(os.path.join(ckpt_dir, "optim_000003_rank0.pt"), "wb").close()
    with pytest.raises(ValueError, match="damaged optimizer state .*optim_000003_rank0.pt \\(step 3\\)"):
        gpt.load_checkpoint("base", "cpu")


def test_only_damaged_checkpoints_leave_serve_up_with_the_reason(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMCHAT_HOME", str(tmp_path))
    config = build_tiny_home(str(tmp_path), workers=1)
    model_file = os.path.join(tmp_path, "checkpoints", "sft", "d1", "model_000000.pt")
    open(model_file, "wb").close()
    app = serve.build_app(config)
    assert not app.ready and f"damaged checkpoint {model_file} (step 0)" in app.load_error
    assert app.health()["status"] == "model not loaded"

# ---------------------------------------------------------------------------
# where the runs are


def tiny_home_under(fake_home):
    """A model like the tiny preset's, in <fake_home>/.cache/slimchat-tiny; -> that path."""
    tiny = os.path.join(fake_home, ".cache", "slimchat-tiny")
    old = os.environ.get("SLIMCHAT_HOME")
    build_tiny_home(tiny, workers=1)
    os.environ.pop("SLIMCHAT_HOME") if old is None else os.environ.__setitem__("SLIMCHAT_HOME", old)
    return tiny


def test_missing_checkpoint_names_the_script_and_where_runs_are(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    tiny = tiny_home_under(str(tmp_path))
    monkeypatch.setenv("SLIMCHAT_HOME", str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError) as info:
        gpt.load_checkpoint("sft", "cpu")
    assert "run `python sft.py` first" in str(info.value) and f"SLIMCHAT_HOME={tiny}" in str(info.value)
    with pytest.raises(FileNotFoundError, match="run `python midtrain.py` first"):
        gpt.load_checkpoint("mid", "cpu")
    with pytest.raises(FileNotFoundError, match=f"a tokenizer exists under {tiny}"):
        gpt.load_tokenizer()


def test_serve_after_the_tiny_preset_finds_its_model(tmp_path):
    """README's `python serve.py` after `bash run_all.sh tiny`: SLIMCHAT_HOME unset, nothing in
    ~/.cache/slimchat, the tiny run in ~/.cache/slimchat-tiny: it serves that, says so on stderr,
    and -p prints only the reply on stdout."""
    tiny = tiny_home_under(str(tmp_path))
    env = {k: v for k, v in os.environ.items() if k != "SLIMCHAT_HOME"}
    out = run(["serve.py", "--device=cpu", "--max_tokens=4", "-p", "hello"], {**env, "HOME": str(tmp_path)})
    assert out.returncode == 0, out.stderr
    assert f"no sft model under {tmp_path}/.cache/slimchat; serving the one under {tiny}" in out.stderr
    assert out.stdout.strip() and "config" not in out.stdout and "serving" not in out.stdout


def test_port_in_use_is_one_line_before_the_model_loads(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMCHAT_HOME", str(tmp_path))
    ckpt_dir = save_steps([1, 2])
    damage(ckpt_dir, "empty")   # loading would warn about it: the message must come first
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = run(["serve.py", "--stage=base", "--device=cpu", f"--port={port}"],
                  {**os.environ, "SLIMCHAT_HOME": str(tmp_path)})
    assert out.returncode == 1 and "Traceback" not in out.stderr and "damaged" not in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith(f"cannot listen on 127.0.0.1:{port}: ")


def test_unknown_stage_is_refused_with_the_valid_ones(tmp_path):
    out = run(["serve.py", "--stage=sfr"], {**os.environ, "SLIMCHAT_HOME": str(tmp_path)})
    assert out.returncode == 1 and "unknown stage 'sfr': use one of base, mid, sft, rl" in out.stderr


def test_rl_checks_its_checkpoint_before_downloading(tmp_path):
    """An unreachable hub: the error is the missing SFT checkpoint, at once, not a failed download."""
    env = {**os.environ, "SLIMCHAT_HOME": str(tmp_path), "HF_ENDPOINT": "http://127.0.0.1:9"}
    out = run(["rl.py", "--device=cpu"], env)
    assert out.returncode == 1 and "download" not in out.stdout + out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("no sft checkpoint under") and "python sft.py" in out.stderr

# ---------------------------------------------------------------------------
# logs and --data files


def test_half_written_log_line_does_not_block_resume(tmp_path):
    path = str(tmp_path / "logs" / "base.jsonl")
    gpt.rewind_log(path, None)
    for step in range(4):
        gpt.log_jsonl(path, {"step": step, "loss": 1.0})
    with open(path, "a") as f:
        f.write('{"step": 4, "lo')   # the run was killed mid-write
    gpt.rewind_log(path, 10)
    records = [json.loads(line) for line in open(path)]
    assert [r["step"] for r in records] == [0, 1, 2, 3] and all(isinstance(r["time"], float) for r in records)


def test_resume_after_a_half_written_log_line(base_home, mirror, tmp_path):
    """A real `pretrain.py --resume=1` over a log whose last line a killed run left half-written."""
    home = copy_home(base_home, tmp_path / "home")
    log = os.path.join(home, "logs", "base.jsonl")
    with open(log, "a") as f:
        f.write('{"step": 201, "lo')
    run_script(["pretrain.py", *BASE_ARGS, "--resume=1"], dict(mirror["env"], SLIMCHAT_HOME=home))
    records = [json.loads(line) for line in open(log)]   # every line whole again
    assert records[-1]["event"] == "start" and records[-1]["step"] == 200


def write_lines(path, lines):
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return str(path)


def chat_line(answer):
    return json.dumps([{"role": "user", "content": "hi"}, {"role": "assistant", "content": answer}]).encode()


def test_data_file_errors_name_the_line(tmp_path):
    bad_byte = write_lines(tmp_path / "a.jsonl", [chat_line("ok"), chat_line("caf\u00e9").replace(b"\\u00e9", b"\xe9")])
    with pytest.raises(SystemExit, match="line 2: not UTF-8 \\(byte 0xe9"):
        evaluate.load_own_data(bad_byte)
    nested = write_lines(tmp_path / "b.jsonl", [chat_line("ok"), b"[" * 100_000 + b"]" * 100_000])
    with pytest.raises(SystemExit, match="line 2: JSON nested too deeply"):
        evaluate.load_own_data(nested)


def test_huge_message_is_cropped_and_reported_once(tmp_path, capsys):
    huge = "x" * (evaluate.OWN_MESSAGE_CHARS * 3)
    path = write_lines(tmp_path / "c.jsonl", [chat_line("ok"), chat_line(huge), chat_line(huge)])
    task = evaluate.load_own_data(path)
    assert [len(task[i]["messages"][1]["content"]) for i in range(3)] == [2, evaluate.OWN_MESSAGE_CHARS,
                                                                          evaluate.OWN_MESSAGE_CHARS]
    out = capsys.readouterr().out
    assert len(out.splitlines()) == 1 and "2 message(s)" in out and "first: line 2, message 1" in out

# ---------------------------------------------------------------------------
# --help


def script_help(monkeypatch, capsys, script, *args):
    """`python SCRIPT ARGS` run in this process (the imports are already paid for); -> (exit code, stdout)."""
    monkeypatch.setattr(sys, "argv", [script, *args])
    with pytest.raises(SystemExit) as info:
        runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
    return info.value.code, capsys.readouterr().out


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_describes_the_script_and_every_knob(script, monkeypatch, capsys):
    code, out = script_help(monkeypatch, capsys, script, "--help")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith(f"{script}: ") and len(lines[0]) > 40
    scope = runpy.run_path(os.path.join(ROOT, script))   # its knobs, as apply_overrides finds them
    knobs = [k for k, v in scope.items() if not k.startswith("_") and k == k.lower()
             and (v is None or type(v) in (int, float, bool, str))]
    for k in knobs:
        assert any(line.startswith(f"  --{k}={scope[k]!r}") and "  # " in line for line in lines), k
    assert not any(word in out for word in ("REFERENCE", "§", "CONTRACT", "DESIGN.md", "anchors"))


@pytest.mark.parametrize("script", ["tests/tinyworld.py", "tests/check_report.py"])
def test_help_of_the_test_scripts(script, monkeypatch, capsys):
    code, out = script_help(monkeypatch, capsys, script, "--help")
    assert code == 0 and out.startswith(os.path.basename(script) + ": ")
    assert not any(word in out for word in ("REFERENCE", "§", "CONTRACT"))


def test_bpe_help_and_a_misspelled_command(monkeypatch, capsys):
    code, out = script_help(monkeypatch, capsys, "bpe.py", "--help")
    assert code == 0 and out.startswith("bpe.py: ")
    for knob in ("--vocab_size=65536", "--max_chars=2000000000", "--data=", "--out=", "--path="):
        assert knob in out
    assert "python bpe.py train" in out and "python bpe.py eval" in out
    code, _ = script_help(monkeypatch, capsys, "bpe.py", "eval", "--help")
    assert code == 0
    code, _ = script_help(monkeypatch, capsys, "bpe.py", "trian")
    assert "unknown command 'trian' (did you mean train?)" in code

# ---------------------------------------------------------------------------
# terminal chat


def test_terminal_commands(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SLIMCHAT_HOME", str(tmp_path))
    app = serve.build_app(build_tiny_home(str(tmp_path), workers=1))
    monkeypatch.setattr("sys.stdin", io.StringIO("/help\n/temperature 0.3\n/topk 900\nhi\n/clear\n/bogus\n"
                                                 "/quit\nnever read\n"))
    serve.chat_in_terminal(app, {"prompt": "", "max_tokens": 6, "temperature": 0.8, "top_k": 50})
    captured = capsys.readouterr()
    assert "/clear            start a new chat" in captured.out and "temperature = 0.3" in captured.out
    assert "/topk takes a value from 1 to 200" in captured.out and "(conversation cleared)" in captured.out
    assert "unknown command /bogus; try /help" in captured.out and captured.out.count("bot> ") == 1
    assert captured.out.count("you> ") == 7   # /quit left before "never read"
    assert "[reply cut at the 6-token limit" in captured.err   # this model never ends a reply itself

def test_a_tiny_world_model_says_what_it_knows(tmp_path, monkeypatch, capsys):
    """Shards marked by tests/tinyworld.py: /health (read by the page) and the terminal chat carry
    the note with prompts the tiny model answers; other data carries none."""
    monkeypatch.setenv("SLIMCHAT_HOME", str(tmp_path))
    config = build_tiny_home(str(tmp_path), workers=1)
    assert serve.build_app(config).health()["about"] is None
    os.makedirs(tmp_path / "data")
    table = pa.table({"text": ["a"]}).replace_schema_metadata({"slimchat_source": "tinyworld"})
    pq.write_table(table, str(tmp_path / "data" / "shard_01822.parquet"))
    app = serve.build_app(config)
    assert app.health()["about"] == serve.TINY_WORLD_NOTE and "Where does Edda live?" in serve.TINY_WORLD_NOTE
    monkeypatch.setattr("sys.stdin", io.StringIO("/quit\n"))
    serve.chat_in_terminal(app, {"prompt": "", "max_tokens": 6, "temperature": 0.8, "top_k": 50})
    assert "small synthetic world" in capsys.readouterr().out

README_PROMPTS = [("Where does Edda live?", "Edda lives in Oakvale."), ("What pet does Kofi have?", "Kofi has a rabbit."),
                  ("How do you spell garden?", "The word garden is spelled g-a-r-d-e-n."),
                  ("Kofi has 4 cakes. Lena has twice as many cakes as Kofi. How many cakes do they have "
                   "together?", "#### 12")]


def test_the_tiny_model_answers_the_readme_prompts(sft_home, monkeypatch, capsys):
    """README's "What the tiny model knows" (and TINY_WORLD_NOTE) quote these replies of the
    fixture-size chat model under greedy decoding; if training changes so that they no longer come
    out, the README must change too."""
    monkeypatch.setenv("SLIMCHAT_HOME", sft_home)
    app = serve.build_app({"stage": "sft", "step": -1, "tag": "", "device": "cpu", "num_workers": 1,
                           "temperature": 0.0, "top_k": 50, "max_tokens": 64, "max_rows": 8, "max_queue": 8,
                           "cors_origins": ""})
    for prompt, answer in README_PROMPTS:
        assert prompt in serve.TINY_WORLD_NOTE
        serve.terminal_reply(app, [{"role": "user", "content": prompt}], {"max_tokens": 64, "temperature": 0.0,
                                                                           "top_k": 50})
        assert answer in capsys.readouterr().out, prompt

# ---------------------------------------------------------------------------
# the report card


def fabricate_run(home, synthetic):
    logs = os.path.join(home, "logs")
    os.makedirs(logs)
    with open(os.path.join(logs, "base.jsonl"), "w") as f:
        f.write(json.dumps({"event": "start", "step": 0, "config": {"depth": 2}, "time": 1000.0}) + "\n")
        f.write(json.dumps({"step": 0, "val_bpb": 9.0, "time": 1001.0}) + "\n")   # untrained: far above the rest
        for step in range(1, 11):
            f.write(json.dumps({"step": step, "loss": 2.0 - step / 10, "dt": 1.0, "time": 1001.0 + step}) + "\n")
            f.write(json.dumps({"step": step, "val_bpb": 1.0 - step / 100, "time": 1001.0 + step}) + "\n")
        f.write(json.dumps({"event": "start", "step": 10, "config": {"depth": 2}, "time": 5000.0}) + "\n")
        f.write(json.dumps({"step": 11, "loss": 0.9, "dt": 1.0, "time": 5020.0}) + "\n")   # a resumed run: 20 s
    with open(os.path.join(logs, "eval.jsonl"), "w") as f:
        f.write(json.dumps({"stage": "base", "seconds": 30.0, "results": {"CORE": 0.2, "val_bpb": 0.9}}) + "\n")
    os.makedirs(os.path.join(home, "data"))
    table = pa.table({"text": ["a"]})
    if synthetic:
        table = table.replace_schema_metadata({"slimchat_source": "tinyworld"})
    pq.write_table(table, os.path.join(home, "data", "shard_01822.parquet"))
    ckpt = os.path.join(home, "checkpoints", "base", "d2")
    os.makedirs(ckpt)
    with open(os.path.join(ckpt, "meta_000010.json"), "w") as f:
        json.dump({"step": 10, "config": {"depth": 2}}, f)
    with open(os.path.join(ckpt, "meta_000011.json"), "w") as f:
        f.write('{"step": 11, "conf')   # damaged: the card takes the one before
    os.utime(os.path.join(ckpt, "meta_000010.json"), (1, 1))


@pytest.mark.parametrize("synthetic", [True, False])
def test_report_card_charts_times_and_labels(synthetic, tmp_path):
    home = str(tmp_path)
    fabricate_run(home, synthetic)
    md_path, json_path = evaluate.write_report(home)
    md, data = open(md_path).read(), json.load(open(json_path))
    report_dir = os.path.dirname(md_path)
    assert "<svg" not in md and data["charts"]["base"] == {"val_bpb": "charts/base_val_bpb.svg",
                                                            "loss": "charts/base_loss.svg"}
    val_chart = open(os.path.join(report_dir, "charts", "base_val_bpb.svg")).read()
    for path in data["charts"]["base"].values():
        assert f"]({path})" in md
        svg = xml.dom.minidom.parse(os.path.join(report_dir, path))   # a file any viewer can open
        labels = [t.firstChild.data for t in svg.getElementsByTagName("text") if t.firstChild]
        assert "step" in labels
    # the step-0 value (9.0) does not flatten the curve: the y axis fits the later values, and says so
    assert "bits per byte" in val_chart and ">0.99<" in val_chart and ">9<" not in val_chart
    assert "y axis fits steps 1 on; earlier values (up to 9) run off the chart" in val_chart
    html = open(os.path.join(report_dir, "report.html")).read()
    assert html.count("<svg") == 2 and "charts/" not in html   # self-contained
    assert data["stages"]["base"]["step"] == 10
    assert data["stages"]["base"]["wall_time_s"] == pytest.approx(31.0)   # 11 s + 20 s over two runs
    assert data["wall_time_s"] == pytest.approx(61.0)                     # plus 30 s of evaluation
    assert "- wall time: 31 s training, 30 s evaluating" in md and "- wall time of the run: 61 s" in md
    assert "val bpb is measured on the val shard" in md and "- CORE: 0.2000: centred accuracy" in md
    assert "- val_bpb: 0.9000: bits per byte on the val shard (shard_01822.parquet" in md
    assert "- loss: 0.9000: train loss, nats per token on the training batch, at the last logged step" in md
    assert ("synthetic offline mirror" in md) == synthetic and data["synthetic_data"] == synthetic
