"""
gpucheck.py: the GPU acceptance run, `bash run_all.sh gpucheck`: what the CPU tests cannot settle,
in at most 10 minutes on one GPU and with no network.

1. train: d20 at the speedrun's settings (32 rows of 2,048 tokens per micro-step, 524,288 tokens
   per step: on one GPU 8 micro-steps, the same work per optimizer step as each of the speedrun's
   8 ranks), torch.compile'd, for 20 steps on random tokens of the real 65,536 vocabulary (only
   speed and memory matter here). Reports tokens/s, MFU (gpt.PEAK_FLOPS; none for an unknown GPU),
   the compile time (and fails on more than one compiled graph: a graph break or a recompile), and the peak memory of a training step and of a val eval
   (evaluate.evaluate_bpb), which must stay below the training step's.
2. setup: the offline mirror (tests/tinyworld.py), a tokenizer trained on it (its text runs out of
   merges near 2,000 tokens), and an untrained d20 of that vocabulary saved as a base checkpoint.
3. decode: Engine tokens/s at 1 and 16 samples on gpt.inference_model's copy, greedy for a fixed
   number of tokens (the untrained model never ends a reply), and on the model as trained (fp32
   weights cast to bf16 at every forward) to show what the copy saves.
4. core: `python evaluate.py --stage=base --tasks=CORE` on a slice of each CORE task.
5. serve: `python serve.py --stage=base`, one OpenAI-style request over loopback.

Everything lives under $SLIMCHAT_HOME/gpucheck/ (wiped at the start; never the speedrun's own
files); the figures go to $SLIMCHAT_HOME/gpucheck.json and a short table. A failed check does not
stop the others, so one run shows every problem; the exit code is 1 if any failed.

  bash run_all.sh gpucheck                            # on a GPU box (sets up .venv)
  python tests/bench/gpucheck.py --device_batch_size=16   # less memory per row group
  python tests/bench/gpucheck.py --smoke=1            # on the CPU in seconds: a tiny model, no compile
  python tests/bench/gpucheck.py --smoke=1 --use_compile=1   # the same through inductor (a minute more)
"""
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import traceback
import urllib.request

import torch
import torch._dynamo.utils

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
import evaluate
import gpt
import tinyworld

# ---------------------------------------------------------------------------
# knobs: edit here, or override any of them with --name=value
smoke = False               # True: tiny sizes (SMOKE) on the CPU, no compile; the test suite runs this
device = ""                 # "" = cuda (cpu with --smoke=1)
depth = 20                  # the speedrun's model
device_batch_size = 32      # rows per micro-step (the speedrun's at d20 on 80 GB)
max_seq_len = 2048          # tokens per row
total_batch_size = 524288   # tokens per optimizer step; micro-steps = this / (rows x tokens per row)
train_steps = 20            # optimizer steps; the first 3 (compile, warm-up) are not timed
eval_batches = 4            # micro-batches of the val eval whose peak memory is measured
decode_tokens = 128         # tokens per Engine decode timing
core_per_task = 16          # examples per CORE task
use_compile = True          # torch.compile the training model (as pretrain.py does on cuda)
timeout_s = 300             # per subprocess (evaluate.py, serve.py)
# ---------------------------------------------------------------------------

TRAIN_VOCAB = 65536         # the speedrun tokenizer's vocabulary, for the training shapes
TIMED_AFTER = 3             # training steps left out of the timing
SMOKE = dict(depth=2, device_batch_size=2, max_seq_len=64, total_batch_size=256, train_steps=4,
             eval_batches=2, decode_tokens=8, core_per_task=2, use_compile=False)


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def check_train(dev, vocab):
    """Compiled training steps and a val eval at the configured shapes, on random tokens."""
    config = gpt.config_from_depth(depth, vocab, max_seq_len)
    raw_model = gpt.new_model(config, dev)
    model = torch.compile(raw_model, dynamic=False) if use_compile else raw_model
    optimizer = raw_model.setup_optimizer()
    grad_accum = total_batch_size // (device_batch_size * max_seq_len)
    assert grad_accum >= 1 and grad_accum * device_batch_size * max_seq_len == total_batch_size, \
        f"total_batch_size {total_batch_size} is not a multiple of {device_batch_size} x {max_seq_len}"

    def batch():
        return [torch.randint(0, vocab, (device_batch_size, max_seq_len), device=dev) for _ in range(2)]

    times, mems, losses = [], [], []
    for step in range(train_steps):
        sync(dev)
        gpt.reset_peak_memory(dev)
        t0 = time.time()
        train_loss = torch.zeros((), device=dev)
        for _ in range(grad_accum):
            x, y = batch()
            loss = model(x, y)
            train_loss += loss.detach() / grad_accum
            (loss / grad_accum).backward()
        optimizer.step()
        model.zero_grad(set_to_none=True)
        total = train_loss.item()   # reads back once per step, as pretrain.py does
        sync(dev)
        times.append(time.time() - t0)
        mems.append(gpt.peak_memory_gib(dev))
        losses.append(total)
        assert math.isfinite(total), f"non-finite loss {total} at step {step}"
    # one graph for all the steps: a graph break or a recompile at the real shapes shows here
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert graphs == (1 if use_compile else 0), f"{graphs} compiled graphs for the training step, expected 1"
    model.eval()
    gpt.reset_peak_memory(dev)
    evaluate.evaluate_bpb(model, [batch() for _ in range(eval_batches)], eval_batches,
                          torch.ones(vocab, dtype=torch.int64, device=dev))
    eval_mem = gpt.peak_memory_gib(dev)
    timed = times[min(TIMED_AFTER, len(times) - 1):]
    tok_per_sec = total_batch_size * len(timed) / sum(timed)
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else None
    peak = gpt.peak_flops(gpu) if gpu else None
    train_mem = max(mems) if dev.type == "cuda" else None
    if train_mem is not None:   # issue 13: an eval that keeps autograd graphs needs more than training
        assert eval_mem < train_mem, f"the val eval peaked at {eval_mem:.1f}GiB, above training's {train_mem:.1f}GiB"
    return {"params": raw_model.num_params()["total"], "grad_accum": grad_accum, "train_graphs": graphs,
            "first_step_s": times[0], "step_s": sum(timed) / len(timed), "tok_per_sec": tok_per_sec,
            "mfu": raw_model.estimate_flops() * tok_per_sec / peak if peak else None, "peak_flops": peak,
            "train_peak_mem_gib": train_mem, "eval_peak_mem_gib": eval_mem,
            "loss_first": losses[0], "loss_last": losses[-1]}


def check_setup(work, env, dev):
    """Mirror, shards, a tokenizer, and an untrained model of its vocabulary saved as base."""
    mirror = os.path.join(work, "mirror")
    tinyworld.build(mirror, seed=0)
    run([sys.executable, "pretrain.py", "--download=4"], env)
    run([sys.executable, "bpe.py", "train", "--vocab_size=4096"], env)
    tok = gpt.load_tokenizer()
    model = gpt.new_model(gpt.config_from_depth(depth, tok.vocab_size, max_seq_len), dev)
    gpt.save_checkpoint("base", 0, model, {"tokenizer": tok.fingerprint(), "max_seq_len": max_seq_len})
    return {"vocab_size": tok.vocab_size}


def check_decode(dev):
    """Engine tokens/s at 1 and 16 samples (greedy, decode_tokens each, prefill included) on the
    inference copy, and on the model as trained (fp32 weights cast at every forward) for comparison."""
    tok = gpt.load_tokenizer()
    model, _, _ = gpt.load_checkpoint("base", dev, tokenizer=tok)
    prompt = [tok.bos_id] + tok.encode("The capital of France is")
    figures = {}
    for label, m in (("", gpt.inference_model(model)), ("cast_", model)):
        engine = gpt.Engine(m, tok)
        for samples in (1, 16):
            for timed in (False, True):   # the first call warms up the kernels
                sync(dev)
                t0 = time.time()
                steps = sum(1 for _ in engine.generate(prompt, samples, decode_tokens, temperature=0.0))
                sync(dev)
            assert steps == decode_tokens, f"{steps} decode steps, expected {decode_tokens}"
            figures[f"{label}tok_per_sec_{samples}"] = samples * steps / (time.time() - t0)
    return figures


def check_core(env, dev):
    """The CORE slice through evaluate.py's command line."""
    run([sys.executable, "evaluate.py", "--stage=base", "--tasks=CORE", f"--max_per_task={core_per_task}",
         f"--device={dev.type}"], env)
    with open(os.path.join(env["SLIMCHAT_HOME"], "eval", "base", "results.json")) as f:
        results = json.load(f)["results"]
    assert math.isfinite(results["CORE"]), results
    return {"CORE": results["CORE"], "tasks": len(results["CORE_tasks"])}


def check_serve(env, dev):
    """serve.py on a free port, one non-streaming chat completion, then Ctrl-C."""
    proc = subprocess.Popen([sys.executable, "serve.py", "--stage=base", "--port=0", f"--device={dev.type}"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines, port, t0 = [], None, time.time()
        for line in proc.stdout:   # ends when serve.py exits; the timeout below kills a hung one
            lines.append(line)
            if (m := re.search(r"serving .* on http://127\.0\.0\.1:(\d+)/", line)):
                port = int(m.group(1))
                break
        assert port, f"serve.py exited ({proc.wait()}) without serving:\n{''.join(lines[-20:])}"
        loaded = time.time() - t0
        body = json.dumps({"messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 16,
                           "temperature": 0, "stream": False}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", body,
                                         {"Content-Type": "application/json"})
        t0 = time.time()
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            reply = json.load(response)
        assert reply["usage"]["completion_tokens"] == 16, reply
        return {"load_s": loaded, "reply_s": time.time() - t0}
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def run(args, env):
    """A stage script as a subprocess in the repo root; its output goes to ours, a failure raises."""
    proc = subprocess.run(args, cwd=ROOT, env=env, timeout=timeout_s, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(args[1:])} failed ({proc.returncode}):\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")


def describe(name, result):
    """One table row: the check, ok/FAILED, seconds, its main figures."""
    def gib(v):
        return "-" if v is None else f"{v:.1f}GiB"
    r = result
    if not r["ok"]:
        text = r["error"].splitlines()[0][:100]
    elif name == "train":
        mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        text = (f"{r['tok_per_sec']:,.0f} tok/s | mfu {mfu} "
                f"| train mem {gib(r['train_peak_mem_gib'])} | eval mem {gib(r['eval_peak_mem_gib'])} "
                f"| first step {r['first_step_s']:.0f}s")
    elif name == "decode":
        text = (f"{r['tok_per_sec_1']:,.0f} tok/s at 1 sample | {r['tok_per_sec_16']:,.0f} at 16 "
                f"(without the inference copy: {r['cast_tok_per_sec_1']:,.0f} | {r['cast_tok_per_sec_16']:,.0f})")
    elif name == "core":
        text = f"CORE {r['CORE']:.4f} over {r['tasks']} tasks x {core_per_task} (untrained model)"
    elif name == "serve":
        text = f"loaded in {r['load_s']:.0f}s, 16-token reply in {r['reply_s']:.1f}s"
    else:
        text = f"tokenizer vocab {r['vocab_size']}"
    return f"{name:<7} {'ok' if r['ok'] else 'FAILED':<7} {r['seconds']:>7.1f}s  {text}"


if __name__ == "__main__":
    if any(re.fullmatch(r"--smoke=(1|true)", arg, flags=re.I) for arg in sys.argv[1:]):
        globals().update(SMOKE)   # the tiny sizes become the defaults; knobs given explicitly still win
    config = gpt.apply_overrides(globals())
    dev = torch.device(device or ("cpu" if smoke else "cuda"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        sys.exit(f"gpucheck: torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU; "
                 f"check nvidia-smi, or run --smoke=1 on a CPU")
    out_path = os.path.join(gpt.home(), "gpucheck.json")
    work = os.path.join(gpt.home(), "gpucheck")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    mirror = os.path.join(work, "mirror")
    # this process and every subprocess use the scratch home and read the mirror: no network
    env = dict(os.environ, SLIMCHAT_HOME=work, HF_ENDPOINT=f"file://{mirror}",
               SLIMCHAT_FILES_ENDPOINT=f"file://{mirror}/files")
    os.environ.update(env)
    torch.manual_seed(42)

    checks = [("train", lambda: check_train(dev, 512 if smoke else TRAIN_VOCAB)),
              ("setup", lambda: check_setup(work, env, dev)),
              ("decode", lambda: check_decode(dev)),
              ("core", lambda: check_core(env, dev)),
              ("serve", lambda: check_serve(env, dev))]
    results, t_start = {}, time.time()
    for name, check in checks:
        if name != "train" and not results.get("setup", {"ok": True})["ok"]:
            results[name] = {"ok": False, "seconds": 0.0, "error": "skipped: the setup failed"}
            continue
        print(f"== {name}", flush=True)
        t0 = time.time()
        # an acceptance run reports every failure, not just the first: catch, record, go on
        try:
            results[name] = {"ok": True, **check()}
        except Exception as e:
            traceback.print_exc()
            results[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        results[name]["seconds"] = time.time() - t0
        if dev.type == "cuda":
            torch.cuda.empty_cache()   # hand the training model's memory back before the next check
    ok = all(r["ok"] for r in results.values())
    summary = {"ok": ok, "time": time.time(), "seconds": time.time() - t_start,
               "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else dev.type,
               "torch": torch.__version__, "git": gpt.git_info(), "config": config, "checks": results}
    with open(out_path + ".tmp", "w") as f:
        json.dump(summary, f, indent=1)
    os.replace(out_path + ".tmp", out_path)
    print(f"\ngpucheck on {summary['device']}, d{depth}, compile {'on' if use_compile else 'off'}, "
          f"{summary['seconds']:.0f}s:")
    for name, result in results.items():
        print(describe(name, result))
    print(f"{'all checks passed' if ok else 'FAILED'}; figures in {out_path}")
    sys.exit(0 if ok else 1)
