"""
Memory at full size, checked on a CPU: every evaluation and sampling path runs without an autograd
graph (issue 13 item 1: a val eval with autograd on kept a d20 training graph per batch and ran out
of memory before step 1).
"""
import torch

import bpe
import evaluate
import gpt
import rl


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
    forward they make runs with autograd off. Fails today on evaluate_bpb, called by the loops with
    autograd on (at d20 x 32 rows that graph is ~74 GB, and the previous batch's is still alive)."""
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


def test_activation_estimate_matches_the_compiled_graph():
    """The device batch is chosen from estimate_memory's activations per row; they must be what
    torch.compile's graph really saves per row (2 rows minus 1 row: the weight copies cancel), in bf16."""
    config = gpt.GPTConfig(sequence_len=256, vocab_size=512, n_layer=2, n_head=2, n_kv_head=2, n_embd=256)
    model = gpt.new_model(config, "cpu", torch.bfloat16)
    measured = compiled_saved_bytes(model, 2, 256) - compiled_saved_bytes(model, 1, 256)
    estimated = model.estimate_memory(2)["activations"] - model.estimate_memory(1)["activations"]
    assert abs(estimated - measured) < 0.05 * measured, (estimated, measured)
