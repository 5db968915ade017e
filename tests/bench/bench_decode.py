"""
bench_decode.py: Engine decode tokens per second, with bf16 compute, on the model as trained
(fp32 master weights, each cast to bf16 at every forward) and on gpt.inference_model's copy (weights
stored in bf16), plus fp32 compute for reference. A benchmark, not a test.

Decode reads every weight once per step for a few rows of work, so it is bound by memory traffic:
casting the weights first reads 4 bytes and writes 2 for each one before the matmul reads the 2
again. The model here is random (only speed is measured) and decodes greedily for max_tokens steps.

  OMP_NUM_THREADS=1 python tests/bench/bench_decode.py --depth=6 --vocab_size=8192 --samples=1,16
"""
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import bpe
import gpt


def decode_rate(model, tokenizer, prompt, num_samples, max_tokens):
    """Generated tokens per second over one Engine.generate call (prefill included, it is short)."""
    engine = gpt.Engine(model, tokenizer)
    t0 = time.perf_counter()
    steps = sum(1 for _ in engine.generate(prompt, num_samples, max_tokens, temperature=0.0))
    return num_samples * steps / (time.perf_counter() - t0)


def main(argv):
    args = {"depth": 6, "vocab_size": 8192, "samples": "1,16", "max_tokens": 64, "prompt_len": 32, "repeat": 5,
            "device": "cpu"}
    for arg in argv:
        name, _, text = arg[2:].partition("=")
        if name not in args:
            sys.exit(f"unknown option {arg!r}; options: {', '.join(args)}")
        args[name] = type(args[name])(text)
    tokenizer = bpe.Tokenizer.train(["the Engine needs the special token ids only " * 20], vocab_size=300)
    config = gpt.config_from_depth(args["depth"], args["vocab_size"], 512)
    torch.manual_seed(0)
    models = {"fp32": gpt.new_model(config, args["device"], torch.float32)}
    models["bf16, cast per forward"] = gpt.new_model(config, args["device"], torch.bfloat16)
    models["bf16, inference_model"] = gpt.inference_model(models["bf16, cast per forward"])
    prompt = [tokenizer.bos_id] + list(range(1, args["prompt_len"]))
    n = models["fp32"].num_params()["total"]
    print(f"d{args['depth']} ({n / 1e6:.1f}M params, vocab {args['vocab_size']}) on {args['device']}, "
          f"{torch.get_num_threads()} thread(s); {args['max_tokens']} greedy tokens after a "
          f"{args['prompt_len']}-token prompt; best of {args['repeat']}")
    print(f"{'samples':>8} | " + " | ".join(f"{name:>24}" for name in models) + " | speedup of the copy")
    for num_samples in [int(s) for s in args["samples"].split(",")]:
        rates = dict.fromkeys(models, 0.0)
        for _ in range(args["repeat"]):   # interleaved, best of: a shared machine's load drifts
            for name, m in models.items():
                rates[name] = max(rates[name], decode_rate(m, tokenizer, prompt, num_samples, args["max_tokens"]))
        speedup = rates["bf16, inference_model"] / rates["bf16, cast per forward"]
        print(f"{num_samples:>8} | " + " | ".join(f"{r:>18,.0f} tok/s" for r in rates.values())
              + f" | {speedup:.2f}x", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
