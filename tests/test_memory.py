"""
The speedrun's memory and data, checked on a CPU (issues 13 and 14): no evaluation or sampling path
builds an autograd graph; the memory estimate behind the device batch matches what the training
graph saves; `--preflight=1` plans the d20/d26/d32 runs at full size on the meta device (and the
midtrain/sft runs); the loader says when it repeats data and pretraining warns when it will.
"""
import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import bpe
import evaluate
import gpt
import pretrain
import rl
from conftest import ROOT


def tiny_model():
    """A 2-layer model whose parameters require grad, as they do inside a training loop."""
    torch.manual_seed(0)
    config = gpt.GPTConfig(sequence_len=64, vocab_size=bpe.Tokenizer([]).vocab_size, n_layer=2,
                           n_head=2, n_kv_head=2, n_embd=32)
    model = gpt.new_model(config, "cpu")
    assert all(p.requires_grad for p in model.parameters())
    return model


def watch_grad_mode(model):
    """A list that gets torch.is_grad_enabled() at the start of every forward of `model`."""
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append(torch.is_grad_enabled()))
    return seen


class AnyAnswer(evaluate.Task):
    """A generative task whose grader accepts everything: only the model calls matter here."""

    def evaluate(self, conversation, completion):
        return True


def chat(question, answer):
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def test_no_eval_or_sampling_path_builds_a_graph():
    """bpb (pretrain/midtrain/sft in-loop), CORE's three kinds, the chat evals (categorical and
    generative), the training-time samples (Engine) and RL's rollouts and pass@k eval: every model
    forward they make runs with autograd off. It failed on evaluate_bpb before issue 13's fix: the
    loops called it with autograd on (at d20 x 32 rows a val batch's graph is ~74 GB in eager mode,
    and the previous batch's was still alive)."""
    tok, model = bpe.Tokenizer([]), tiny_model()
    seen = watch_grad_mode(model)
    paths = {}

    def check(name, run):
        seen.clear()
        run()
        paths[name] = list(seen)

    x = torch.randint(0, 256, (2, 16))
    check("evaluate_bpb", lambda: evaluate.evaluate_bpb(model, [(x, x)], 1, tok.token_bytes()))
    mc = evaluate.MultipleChoice([evaluate.mc_conversation("1 + 1?", ["2", "3"], 0)])
    check("categorical", lambda: evaluate.run_chat_eval(mc, model, tok, gpt.Engine(model, tok)))
    gen = AnyAnswer([chat("Hi", "Hello")])
    check("generative", lambda: evaluate.run_chat_eval(gen, model, tok, gpt.Engine(model, tok), max_new_tokens=4))
    items = {"multiple_choice": [{"query": "Sky is", "choices": ["blue", "red"], "gold": 0}] * 2,
             "schema": [{"context_options": ["A cat", "A dog"], "continuation": "barks", "gold": 1}] * 2,
             "language_modeling": [{"context": "2 + 2 =", "continuation": "4"}] * 2}
    for kind, data in items.items():
        check(f"CORE {kind}", lambda: evaluate.core_task_accuracy(model, tok, data, kind, 1, " "))
    engine = gpt.Engine(model, tok)
    check("samples", lambda: engine.generate_batch([tok.bos_id] + tok.encode("The"), max_tokens=4, temperature=0.0))
    prompt = tok.render_for_completion(chat("Hi", "Hello"))
    check("rl rollouts", lambda: rl.generate(engine, tok, prompt, 4, 0, 4, 1.0, 0))
    check("rl pass@k", lambda: rl.evaluate_pass_at_k(gen, engine, tok, [0], 2, (4, 1.0, 0), 0,
                                                     torch.device("cpu"), False))
    assert all(paths.values()), f"a path made no model call: {paths}"
    grad_on = [name for name, modes in paths.items() if any(modes)]
    assert not grad_on, f"these paths ran the model with autograd on: {grad_on}"


def test_training_forward_still_builds_its_graph():
    """The check above is meaningful: the hook sees autograd on in a training forward (pretrain's,
    and RL's policy-gradient forward, which must keep its graph)."""
    model = tiny_model()
    seen = watch_grad_mode(model)
    x = torch.randint(0, 256, (2, 16))
    loss = model(x, x)
    assert seen == [True] and loss.grad_fn is not None


def compiled_saved_bytes(model, rows, seq_len):
    """Bytes of the tensors the compiled training graph keeps for the backward: torch.compile's
    own partitioner (min-cut recomputation) after inductor's decompositions, as on a GPU, with the
    forward graph run uncompiled; counted from the forward graph's extra outputs."""
    from functorch.compile import make_boxed_func, min_cut_rematerialization_partition
    from torch._functorch.aot_autograd import aot_module_simplified
    from torch._inductor.decomposition import select_decomp_table
    counted = []

    def forward_compiler(graph, inputs):
        outputs = next(node for node in graph.graph.nodes if node.op == "output").args[0]
        vals = [node.meta["val"] for node in outputs[1:]]   # outputs[0] is the loss
        counted.append(sum(v.numel() * v.element_size() for v in vals if isinstance(v, torch.Tensor)))
        return make_boxed_func(graph)

    def backend(graph, inputs):
        return aot_module_simplified(graph, inputs, fw_compiler=forward_compiler,
                                     bw_compiler=lambda graph, inputs: make_boxed_func(graph), decompositions=select_decomp_table(),
                                     partition_fn=min_cut_rematerialization_partition)

    torch._dynamo.reset()
    x = torch.randint(0, model.config.vocab_size, (rows, seq_len))
    torch.compile(model, backend=backend, dynamic=False)(x, x).backward()
    return counted[-1]


def eager_saved_bytes(model, rows, seq_len):
    """Bytes of the distinct storages an eager training forward saves for the backward."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    x = torch.randint(0, model.config.vocab_size, (rows, seq_len))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x, x)
    return sum(storages.values())


def test_activation_estimate_matches_what_the_graph_saves():
    """The device batch is chosen from estimate_memory's activations per row; they must be what
    a bf16 training forward really saves per row (2 rows minus 1 row: the weight copies cancel),
    compiled by torch.compile (pretrain, midtrain) and eager (sft), at 2 and 4 layers."""
    for layers in (2, 4):
        config = gpt.GPTConfig(sequence_len=256, vocab_size=512, n_layer=layers, n_head=2, n_kv_head=2, n_embd=256)
        model = gpt.new_model(config, "cpu", torch.bfloat16)
        for compiled, measure in ((True, compiled_saved_bytes), (False, eager_saved_bytes)):
            if compiled and layers == 4:
                continue   # one compile is enough to pin the constant (each costs seconds)
            measured = measure(model, 2, 256) - measure(model, 1, 256)
            estimated = (model.estimate_memory(2, compiled=compiled)["activations"]
                         - model.estimate_memory(1, compiled=compiled)["activations"])
            assert abs(estimated - measured) < 0.05 * measured, (layers, compiled, estimated, measured)


# --- the preflight and the device batch -----------------------------------------------------------

def write_meta(home, stage, depth, **fields):
    """The meta file a stage leaves next to its weights (the preflight of the next stage reads only it)."""
    config = gpt.config_from_depth(depth, pretrain.SPEEDRUN_VOCAB, 2048)
    folder = os.path.join(home, "checkpoints", stage, f"d{depth}")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "meta_000100.json"), "w") as f:
        json.dump({"model_config": config.__dict__, "step": 100, "stage": stage, **fields}, f)


def tiny_shards(data_dir, docs_per_shard, doc_chars, shards=2):
    """Train shards plus the val shard of `docs_per_shard` documents of `doc_chars` letters each, in
    row groups of 8 documents; with a byte-level tokenizer a letter is a token. No dictionary and no
    statistics, as in the real shards (REFERENCE §2.1)."""
    os.makedirs(data_dir, exist_ok=True)
    for name in [pretrain.shard_name(i) for i in range(shards)] + [pretrain.VAL_SHARD]:
        texts = [chr(97 + i % 26) * doc_chars for i in range(docs_per_shard)]
        pq.write_table(pa.table({"text": texts}), os.path.join(data_dir, name), row_group_size=8,
                       use_dictionary=False, write_statistics=False)


TINY_RUN = ["--device=cpu", "--depth=2", "--n_embd=64", "--n_head=1", "--max_seq_len=128", "--device_batch_size=8",
            "--total_batch_size=4096", "--num_steps=2", "--eval_every=-1", "--eval_tokens=1024",
            "--sample_every=-1", "--loader_workers=0", "--buffer_size=16"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every stage script this file checks, run at once as real subprocesses (2 cores: they overlap).
    The preflights plan for 8 GPUs of 80 GiB, as on the speedrun's node, in a home with no data;
    midtrain and sft read a d20 base/mid checkpoint's meta as pretrain.py writes it. `tiny` is a
    real 2-step run on 2 shards of 32 documents of 100 tokens (6,400 tokens, about 4,200 after
    packing) that wants 8,192 tokens."""
    home = str(tmp_path_factory.mktemp("preflight_home"))
    batch = {"max_seq_len": 2048, "device_batch_size": 32, "total_batch_size": 524288, "tokenizer": None}
    write_meta(home, "base", 20, **batch)
    write_meta(home, "mid", 20, **batch)
    tiny_home = str(tmp_path_factory.mktemp("tiny_home"))
    tiny_shards(os.path.join(tiny_home, "data"), 32, 99)   # 99 letters + <|bos|> = 100 tokens
    bpe.Tokenizer([]).save(os.path.join(tiny_home, "tokenizer", "tokenizer.json"))
    commands = {f"d{depth}": (home, ["pretrain.py", "--preflight=1", f"--depth={depth}"]) for depth in (20, 26, 32)}
    commands["d26 x32"] = (home, ["pretrain.py", "--preflight=1", "--depth=26", "--device_batch_size=32"])
    commands["mid"] = (home, ["midtrain.py", "--preflight=1"])
    commands["sft"] = (home, ["sft.py", "--preflight=1"])
    commands["tiny"] = (tiny_home, ["pretrain.py", *TINY_RUN])
    procs = {}
    for name, (where, args) in commands.items():
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        env.update(SLIMCHAT_HOME=where, OMP_NUM_THREADS="1")
        procs[name] = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, text=True,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    return {name: (proc.wait(timeout=300), proc.stdout.read(), proc.stderr.read()) for name, proc in procs.items()}


def plan(runs, name):
    rc, out, err = runs[name]
    assert rc == 0, f"{name} failed ({rc}):\n{out[-3000:]}\n{err[-3000:]}"
    return out


@pytest.mark.parametrize("depth, rows, micro_steps", [(20, 32, 1), (26, 16, 2), (32, 8, 4)])
def test_preflight_plans_the_speedrun(runs, depth, rows, micro_steps):
    """`pretrain.py --preflight=1` at the speedrun's knobs, on a CPU with no data: the full-size model
    takes a training, an eval and a decode step on the meta device, the device batch is the
    reference's for 80 GB (d20 32, d26 16, d32 8), and the plan has every figure."""
    out = plan(runs, f"d{depth}")
    assert f"{524288:,} = {rows} rows x 2048 x 8 ranks x {micro_steps} micro-step(s)" in out
    assert f"device_batch_size {rows}: the largest power of two" in out   # the choice, with its numbers
    for row in ("parameters", "FLOPs per token", "steps", "shards needed", "peak memory per GPU", "wall time"):
        assert f"\n  {row} " in out, row


def test_preflight_keeps_the_users_batch_and_refuses_one_that_cannot_fit(runs):
    """An explicit --device_batch_size is used as given (d26 at 32 rows), and when its estimate
    exceeds the GPU the preflight prints the plan, then fails saying so and what to do."""
    rc, out, err = runs["d26 x32"]
    assert "524,288 = 32 rows x 2048 x 8 ranks x 1 micro-step(s)" in out
    assert rc != 0 and "32 rows per GPU do not fit" in err and "lower --device_batch_size" in err


def test_preflight_of_midtrain_and_sft(runs):
    """midtrain.py and sft.py --preflight=1 plan from the previous checkpoint's meta alone: midtrain
    at the base's 32 x 2048 (compiled), sft at 4 conversations of up to 2048 tokens (eager)."""
    assert "preflight: 32 rows x 2048 tokens per GPU; peak memory per GPU" in plan(runs, "mid")
    assert "preflight: 4 rows of up to 2048 tokens per GPU; peak memory per GPU" in plan(runs, "sft")


def test_device_batch_follows_model_size_and_memory():
    """The largest power of two that divides the rows per rank and fits: the reference's settings
    on 80 GiB, half of them on 48 GiB (an L40S), and never more than the rows a rank has per step."""
    models = {}
    for depth in (20, 26, 32):
        with torch.device("meta"):
            models[depth] = gpt.GPT(gpt.config_from_depth(depth, 65536, 2048))
        models[depth].compute_dtype = torch.bfloat16   # as on the GPUs planned for
    gib = 2**30
    assert [pretrain.fit_device_batch(models[d], 32, 8, 80 * gib) for d in (20, 26, 32)] == [32, 16, 8]
    assert [pretrain.fit_device_batch(models[d], 32, 8, 48 * gib) for d in (20, 26, 32)] == [16, 8, 4]
    assert pretrain.fit_device_batch(models[20], 8, 8, 80 * gib) == 8
    assert pretrain.fit_device_batch(models[20], 12, 8, 80 * gib) == 4   # 8 would not divide 12


def test_preflight_stops_on_a_device_or_dtype_mismatch():
    """The meta device would run a CPU tensor into a GPU model's forward, or a bf16 x fp32 matmul,
    only to fail on the GPU: the preflight names the step instead."""
    config = gpt.GPTConfig(sequence_len=64, vocab_size=300, n_layer=1, n_head=1, n_kv_head=1, n_embd=64)
    model = gpt.new_model(config, "meta", torch.bfloat16)
    args = (1, 80 * 2**30, "80 GiB")
    assert gpt.preflight(model, 2, 64, *args)[1] is None
    model.cos = torch.zeros(model.cos.shape)   # a rotary table left on the CPU
    with pytest.raises(SystemExit, match="training step fails.*cpu"):
        gpt.preflight(model, 2, 64, *args)
    model = gpt.new_model(config, "meta", torch.bfloat16)
    with torch.device("meta"):
        model.lm_head = torch.nn.Linear(64, 300, bias=False)   # a plain Linear: no cast to bf16
    with pytest.raises(SystemExit, match="mixes dtypes"):
        gpt.preflight(model, 2, 64, 1, 80 * 2**30, "80 GiB")


# --- enough data ----------------------------------------------------------------------------------

def test_a_run_longer_than_the_data_warns_at_start_and_when_the_loader_wraps(runs):
    """The tiny run wants 8,192 tokens from shards that hold about 4,200 after packing: pretrain.py
    warns before training, and the loader says when it starts over (each of them once)."""
    out = plan(runs, "tiny")
    warning = out.index("warning: the run trains on 8,192 tokens, but the 2 train shard(s) on disk")
    wrapped = out.index("loader: all 2 shard(s) read; pass 2 over the same data begins")
    assert warning < out.index("step 00001/00002") and out.count("pass 2 over the same data") == 1
    assert wrapped > warning


def test_data_warning_only_when_the_shards_are_too_few(tmp_path):
    """Kept tokens are estimated from the parquet metadata and the tokenizer: 16 documents of 1,000
    tokens are 16,000 tokens, 10,400 after packing (the metadata also counts page headers and
    lengths: under 1% here)."""
    tiny_shards(str(tmp_path), 16, 999, shards=1)
    paths, tok = [str(tmp_path / pretrain.shard_name(0))], bpe.Tokenizer([])
    assert pretrain.data_warning(paths, tok, 10000, 1000) is None
    assert "from about step 10 the data repeats" in pretrain.data_warning(paths, tok, 11000, 1000)
