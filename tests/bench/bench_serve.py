"""
bench_serve.py: aggregate tokens/s and time to first token of serve.py under 1..32 concurrent
streams on one replica (a benchmark, not a test).

It builds a throwaway SLIMCHAT_HOME (a small tokenizer and a random model whose head never
ends a reply, so every stream runs to max_tokens), starts `serve.py --num_workers=1` as a real
process, and fires N streaming requests at once through POST /chat/completions, N = each of
--streams. Modes (--modes):
  batched   this serve.py: every stream is a row of the replica's batched decode step
  serial    this serve.py with --max_rows=1: one reply at a time per replica, the rest queued
            (the old one-request-per-replica design, minus its 503 after 60 s of waiting)
  DIR       another checkout's serve.py (e.g. `git worktree add /tmp/main main`), the old code itself
  decoder   no server: gpt.BatchDecoder's steps alone in this process, N rows (the model side
            of batching, without HTTP, JSON and the clients' threads)

Reported per point: aggregate tokens/s over the wall time of the N streams, tokens per CPU-second
of the server process (steadier than wall time when other jobs share the machine), and the mean
and worst time to the first token.

  python tests/bench/bench_serve.py --device=cpu --streams=1,4,8,16,32 --modes=batched,serial --repeats=3
"""
import argparse
import http.client
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)
import torch

import bpe
import gpt

SENTENCES = ["The cat sat on the mat.", "A dog ran in the park!", "Hello world, how are you today?",
             "Numbers like 12 and 345 are split.", "Some more words to learn merges from."] * 8


def build_home(home, depth, width, seq_len):
    """A tokenizer and a random sft checkpoint that never emits a special token."""
    tok = bpe.Tokenizer.train(SENTENCES, vocab_size=400)
    tok.save(os.path.join(home, "tokenizer", "tokenizer.json"))
    torch.manual_seed(0)
    config = gpt.GPTConfig(sequence_len=seq_len, vocab_size=tok.vocab_size, n_layer=depth,
                           n_head=max(1, width // 128), n_kv_head=max(1, width // 128), n_embd=width)
    model = gpt.new_model(config, "cpu", torch.float32)
    # test_serve.py's recipe: init zeroes the blocks' output projections (they still cost their
    # full matmuls), so the last hidden state is norm(wte[token]) ~ (sqrt(C), 0, ...) and a
    # negative first weight on the specials' head rows (specials come last) keeps them unlikely
    with torch.no_grad():
        model.wte.weight[:, 0] = 100.0
        model.lm_head.weight.normal_(0.0, 1.0)
        model.lm_head.weight[:, 0] = 0.0
        model.lm_head.weight[tok.bos_id:, 0] = -3.0
    os.environ["SLIMCHAT_HOME"] = home
    gpt.save_checkpoint("sft", 0, model, {"tokenizer": tok.fingerprint()})
    return config


def decoder_rate(rows, max_tokens, device):
    """Tokens/s of BatchDecoder steps on `rows` rows of the checkpoint in $SLIMCHAT_HOME."""
    tokenizer = gpt.load_tokenizer()
    model, _, _ = gpt.load_checkpoint("sft", torch.device(device), tokenizer=tokenizer)
    engine = gpt.Engine(model, tokenizer)
    decoder = gpt.BatchDecoder(engine, rows, model.config.sequence_len, engine.stop_ids)
    for i in range(rows):
        decoder.add(tokenizer.encode(f"stream {i}: tell me a story"), max_tokens + 2, 1.0, 50, None, i)
    decoder.step()   # warm-up
    t0, cpu0 = time.perf_counter(), time.process_time()
    tokens = sum(len(decoder.step()) for _ in range(max_tokens))
    return tokens / (time.perf_counter() - t0), tokens / (time.process_time() - cpu0)


def start_server(root, home, device, extra):
    env = {**os.environ, "SLIMCHAT_HOME": home}
    proc = subprocess.Popen([sys.executable, "serve.py", f"--device={device}", "--port=0", "--num_workers=1", *extra],
                            cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if (m := re.search(r"on http://127\.0\.0\.1:(\d+)/", line)):
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()   # drain the log
            return proc, int(m.group(1))
    raise SystemExit(f"serve.py in {root} exited ({proc.wait()}) without serving")


def one_stream(port, i, max_tokens, out):
    """One streamed reply: (seconds to the first token event, seconds to the end, completion tokens),
    or the error that ended it."""
    try:
        out[i] = timed_stream(port, i, max_tokens)
    except (OSError, RuntimeError, AssertionError) as e:   # the old server resets clients past its backlog
        out[i] = e


def timed_stream(port, i, max_tokens):
    body = json.dumps({"messages": [{"role": "user", "content": f"stream {i}: tell me a story"}],
                       "max_tokens": max_tokens, "temperature": 1.0, "seed": i})
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request("POST", "/chat/completions", body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    first, tokens = None, 0
    for line in resp:
        if not line.startswith(b"data: "):
            continue
        event = json.loads(line[6:])
        if "token" in event and first is None:
            first = time.perf_counter() - t0
        if event.get("done"):
            tokens = event["usage"]["completion_tokens"]
        if "error" in event:
            raise RuntimeError(event["error"])
    assert resp.status == 200 and tokens, f"stream {i}: HTTP {resp.status}"
    return first, time.perf_counter() - t0, tokens


def cpu_seconds(pid):
    """CPU time (user + system) a process has used so far, from /proc (Linux)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(port, pid, streams, max_tokens):
    """N streams at once -> (aggregate tokens/s, tokens per server CPU-second, mean TTFT, max TTFT),
    or a line saying how many streams failed."""
    out = [None] * streams
    cpu0 = cpu_seconds(pid)
    threads = [threading.Thread(target=one_stream, args=(port, i, max_tokens, out)) for i in range(streams)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    failed = [o for o in out if isinstance(o, Exception)]
    if failed:
        return f"{len(failed)} of {streams} streams failed ({type(failed[0]).__name__}: {failed[0]})"
    ttft, tokens = [o[0] for o in out], sum(o[2] for o in out)
    return tokens / wall, tokens / (cpu_seconds(pid) - cpu0), sum(ttft) / len(ttft), max(ttft)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--seq_len", type=int, default=512)
    ap.add_argument("--max_tokens", type=int, default=64, help="reply length of every stream")
    ap.add_argument("--streams", default="1,4,8,16,32")
    ap.add_argument("--modes", default="batched,serial")
    ap.add_argument("--repeats", type=int, default=3, help="runs per point; the fastest is reported")
    args = ap.parse_args()
    home = tempfile.mkdtemp(prefix="bench_serve_")
    config = build_home(home, args.depth, args.width, args.seq_len)
    print(f"model: {config.n_layer} layers, width {config.n_embd}, context {config.sequence_len}, "
          f"vocab {config.vocab_size}; {args.max_tokens} tokens per reply; device {args.device}; "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    counts = [int(n) for n in args.streams.split(",")]
    print("| mode | streams | aggregate tok/s | tok per server CPU-s | mean TTFT s | max TTFT s |\n"
          "|---|---|---|---|---|---|")
    for mode in args.modes.split(","):
        if mode == "decoder":
            for n in counts:
                rate, cpu_rate = max(decoder_rate(n, args.max_tokens, args.device) for _ in range(args.repeats))
                print(f"| decoder | {n} | {rate:.0f} | {cpu_rate:.0f} | | |", flush=True)
            continue
        root = ROOT if mode in ("batched", "serial") else mode
        extra = {"batched": [f"--max_rows={max(counts)}"], "serial": ["--max_rows=1", f"--max_queue={max(counts)}"]}
        proc, port = start_server(root, home, args.device, extra.get(mode, []))
        try:
            measure(port, proc.pid, 1, 4)   # warm-up: first-call allocations and lazy inits
            for n in counts:
                # on a shared machine other jobs slow some runs down: the fastest run is the one
                # least disturbed (its TTFTs come with it)
                runs = [measure(port, proc.pid, n, args.max_tokens) for _ in range(args.repeats)]
                failed = [r for r in runs if isinstance(r, str)]
                if failed:
                    print(f"| {mode} | {n} | {failed[0]} | | | |", flush=True)
                    continue
                rate, cpu_rate, mean_ttft, max_ttft = max(runs)
                print(f"| {mode} | {n} | {rate:.0f} | {cpu_rate:.0f} | {mean_ttft:.2f} | {max_ttft:.2f} |", flush=True)
        finally:
            proc.terminate()
            proc.wait()
