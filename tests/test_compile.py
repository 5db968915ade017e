"""
The paths the GPU runs compiled, checked on the CPU with torch.compile's inductor backend (the
one the GPU uses, generating C++ here instead of Triton): the training step, the eval forward
and the KV-cache decode step each compile to one graph (a graph break would show as a second
frame), give eager's numbers, and compile once (error_on_recompile turns a recompile into an
error). Also: bf16 compute trains like fp32. A cold inductor cache costs about 55 s of compile for
the three on the loaded 2-core machine (load 3-6), most of it inductor's first start; torch keeps
its cache under /tmp, so later runs take about 10 s.
"""
import copy

import pytest
import torch
import torch._dynamo
import torch._inductor.config
from torch._dynamo.testing import CompileCounterWithBackend

import gpt

# one layer keeps the compile short; GQA (4 query heads on 2 kv heads) goes through the compiled SDPA
TINY = gpt.GPTConfig(sequence_len=32, vocab_size=96, n_layer=1, n_head=4, n_kv_head=2, n_embd=64)


def random_model(config, seed=0, dtype=torch.float32):
    """Every weight random (init_weights zeroes the head and the output projections)."""
    torch.manual_seed(seed)
    model = gpt.new_model(config, "cpu", dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test counts its own compiles. One compile thread: on a 2-core machine inductor's pool
    of compile workers costs more to start than it saves (measured: 56 s for this file, 92 s with it)."""
    torch._dynamo.reset()
    with torch._inductor.config.patch(compile_threads=1):
        yield
    torch._dynamo.reset()


def test_compiled_training_step_is_one_graph_and_matches_eager():
    """Three training steps: the compiled copy's loss and gradients equal eager's on the same weights
    and batch (1e-5; measured 2e-7), then eager's Muon + AdamW step moves the weights and the compiled
    copy takes them over in place. One graph, compiled once, although the weights change."""
    eager = random_model(TINY)
    raw = copy.deepcopy(eager)
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(raw, backend=counter, dynamic=False)
    opt = eager.setup_optimizer()
    torch.manual_seed(1)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for step in range(3):
            x = torch.randint(0, TINY.vocab_size, (2, 16))
            y = torch.randint(0, TINY.vocab_size, (2, 16))
            losses = [model(x, y) for model in (eager, compiled)]
            for loss in losses:
                loss.backward()
            assert abs(losses[0].item() - losses[1].item()) < 1e-5, (step, losses)
            for a, b in zip(eager.parameters(), raw.parameters()):
                assert torch.allclose(a.grad, b.grad, atol=1e-5), step
            opt.step()
            eager.zero_grad(set_to_none=True)
            raw.zero_grad(set_to_none=True)
            raw.load_state_dict(eager.state_dict())   # copies into the same tensors
    assert counter.frame_count == 1


def test_compiled_eval_forward_is_one_graph_and_matches_eager():
    """evaluate_bpb's call (per-token losses, no graph): one graph over batches of one shape."""
    model = random_model(TINY)
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(model, backend=counter, dynamic=False)
    torch.manual_seed(1)
    with torch._dynamo.config.patch(error_on_recompile=True), torch.no_grad():
        for _ in range(3):
            x = torch.randint(0, TINY.vocab_size, (2, 16))
            y = torch.randint(0, TINY.vocab_size, (2, 16))
            got = compiled(x, y, loss_reduction="none")
            assert torch.allclose(got, model(x, y, loss_reduction="none"), atol=1e-5)
    assert counter.frame_count == 1


def test_compiled_decode_step_is_one_graph_for_every_position():
    """A prefill, then 8 decode steps at positions 6..13 through one compiled graph (a position
    kept as a Python int recompiled at every token): the logits equal eager's, token by token."""
    model = random_model(TINY)
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(model, backend=counter, dynamic=False)
    torch.manual_seed(1)
    seq = torch.randint(0, TINY.vocab_size, (2, 14))
    caches = [gpt.KVCache.for_model(model, 2, 14) for _ in range(2)]
    with torch.no_grad():
        for cache in caches:
            model(seq[:, :6], kv_cache=cache)          # prefill in eager: only the decode step compiles
        with torch._dynamo.config.patch(error_on_recompile=True):
            for t in range(6, 14):
                got = compiled(seq[:, t:t + 1], kv_cache=caches[0])
                want = model(seq[:, t:t + 1], kv_cache=caches[1])
                assert torch.allclose(got, want, atol=1e-5), t
    assert counter.frame_count == 1
    assert int(caches[0].pos) == 14


def test_bf16_compute_trains_like_fp32():
    """20 steps of the same tiny run (same init, same batches) with bf16 and with fp32 compute on
    the CPU, loss falling from 6.5 to 0.9: the curves stay within 0.1 nats of each other at every
    step (measured: 0.046 at most) and within 0.03 nats over the last 5 steps (measured: 0.014);
    the bf16 model really computes in bf16."""
    curves = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = random_model(TINY, dtype=dtype)
        opt = model.setup_optimizer()
        seen = []
        model.blocks[0].register_forward_hook(lambda module, args, out: seen.append(out.dtype))
        gen = torch.Generator().manual_seed(2)
        data = torch.randint(0, 12, (64,), generator=gen)     # a few repeating patterns to learn
        curve = []
        for step in range(20):
            starts = torch.randint(0, 64 - 17, (4,), generator=gen)
            rows = torch.stack([data[s:s + 17] for s in starts.tolist()])
            loss = model(rows[:, :-1], rows[:, 1:])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            curve.append(loss.item())
        curves[dtype] = curve
        assert set(seen) == {dtype}
    fp32, bf16 = curves[torch.float32], curves[torch.bfloat16]
    gap = max(abs(a - b) for a, b in zip(fp32, bf16))
    end_gap = abs(sum(fp32[-5:]) - sum(bf16[-5:])) / 5
    assert gap < 0.1 and end_gap < 0.03, (gap, end_gap, fp32, bf16)
    assert fp32[0] - fp32[-1] > 1.0 and bf16[0] - bf16[-1] > 1.0, (fp32, bf16)
