"""
Peak memory of the val eval against a training step, on the CPU (issue 13 item 1).

Each scenario runs in a fresh process: build the model and the batches, note the resident size,
run the scenario, and report how far the peak resident size (ru_maxrss) rose above that. Large
tensors are mmap'ed by the allocator and given back when freed, so the rise follows the live
tensors. Scenarios:
  train        one training step: forward, backward, optimizer step
  eval_graph   evaluate_bpb as pretrain.py called it before the fix: autograd on, so every val
               batch keeps a training graph and the previous one is alive while the next runs
  eval         evaluate_bpb as it is now (no autograd)

python tests/bench/bench_eval_memory.py [--depth=4 --width=256 --vocab=8192 --rows=8 --seq=512 --batches=4]
"""
import os
import resource
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run(scenario, depth, width, vocab, rows, seq, batches):
    """The peak rise of the resident size in bytes for one scenario (in this process)."""
    import torch
    import evaluate
    import gpt
    torch.manual_seed(0)
    config = gpt.GPTConfig(sequence_len=seq, vocab_size=vocab, n_layer=depth, n_head=width // 64,
                           n_kv_head=width // 64, n_embd=width)
    model = gpt.new_model(config, "cpu")
    data = [(torch.randint(0, vocab, (rows, seq)), torch.randint(0, vocab, (rows, seq))) for _ in range(batches)]
    token_bytes = torch.ones(vocab, dtype=torch.int64)
    optimizer = model.setup_optimizer()
    base = rss_bytes()
    if scenario == "train":
        model(*data[0]).backward()
        optimizer.step()
    elif scenario == "eval_graph":
        evaluate.evaluate_bpb.__wrapped__(model, data, batches, token_bytes)   # the undecorated function
    else:
        evaluate.evaluate_bpb(model, data, batches, token_bytes)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base


if __name__ == "__main__":
    knobs = {"depth": 4, "width": 256, "vocab": 8192, "rows": 8, "seq": 512, "batches": 4}
    for arg in sys.argv[1:]:
        name, _, value = arg.lstrip("-").partition("=")
        if name == "scenario":
            print(run(value, **knobs))
            sys.exit(0)
        if name not in knobs:
            sys.exit(f"unknown option {arg}; known: {', '.join(knobs)}")
        knobs[name] = int(value)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    args = [f"--{k}={v}" for k, v in knobs.items()]
    peaks = {}
    for scenario in ("train", "eval_graph", "eval"):
        out = subprocess.run([sys.executable, __file__, *args, f"--scenario={scenario}"], env=env,
                             capture_output=True, text=True, check=True).stdout
        peaks[scenario] = int(out.split()[-1])
    print(f"model depth {knobs['depth']} width {knobs['width']} vocab {knobs['vocab']}, fp32, "
          f"{knobs['batches']} val batches of {knobs['rows']} x {knobs['seq']}")
    print("| scenario | peak rise | vs a training step |\n|---|---|---|")
    for scenario, peak in peaks.items():
        print(f"| {scenario} | {peak / 2**20:,.0f} MiB | {peak / peaks['train']:.2f}x |")
