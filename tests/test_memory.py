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
