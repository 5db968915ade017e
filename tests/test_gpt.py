"""
Tests for gpt.py: model parity (KV cache vs full recompute), Engine sampling and tool use,
the calculator, Muon + AdamW, checkpoints, overrides, and the download helper against a real
loopback HTTP server. CPU, fp32, deterministic. The optimizer's 2-process torchrun test is in
test_gpt_dist.py; the checkpoint's write order across 2 ranks is tested here.
"""
import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
import warnings

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import bpe
import gpt

TINY = gpt.GPTConfig(sequence_len=32, vocab_size=96, n_layer=2, n_head=4, n_kv_head=2, n_embd=64)


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMCHAT_HOME", str(tmp_path / "home"))


def random_model(config, seed=0):
    """A model whose every weight is random (init_weights zeroes the head, which makes outputs flat)."""
    torch.manual_seed(seed)
    model = gpt.new_model(config, "cpu", torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model


@pytest.fixture(scope="module")
def tokenizer():
    text = "the answer is 2+3=5 and 12*4=48; 'strawberry'.count('r') gives 3. " * 20
    return bpe.Tokenizer.train([text], vocab_size=300)

# ---------------------------------------------------------------------------
# model


def test_forward_shapes_and_loss_reductions():
    model = random_model(TINY)
    idx = torch.randint(0, TINY.vocab_size, (3, 10))
    targets = idx.clone()
    targets[0, :4] = -1
    assert model(idx).shape == (3, 10, TINY.vocab_size) and model(idx).dtype == torch.float32
    per_token = model(idx, targets, loss_reduction="none")
    assert per_token.shape == (3, 10) and (per_token[0, :4] == 0).all()
    assert torch.allclose(model(idx, targets), per_token.sum() / 26)


def test_logits_are_softcapped_and_fresh_model_is_uniform():
    """Zero-init head: a fresh model predicts uniformly; softcap bounds logits by 15."""
    fresh = gpt.new_model(TINY, "cpu")
    idx = torch.randint(0, TINY.vocab_size, (1, 8))
    assert torch.allclose(fresh(idx), torch.zeros(1, 8, TINY.vocab_size))
    with torch.no_grad():
        fresh.lm_head.weight.fill_(100.0)
    assert fresh(idx).abs().max() <= 15.0


def test_kv_cache_logits_match_full_forward():
    """Prefill, a 3-token chunk, then single tokens: every step's logits equal a full recompute (GQA, batch 2)."""
    model = random_model(TINY)
    seq = torch.randint(0, TINY.vocab_size, (2, 14))
    full = model(seq)
    cache = gpt.KVCache.for_model(model, 2, 14)
    pieces = [(0, 6), (6, 9)] + [(t, t + 1) for t in range(9, 14)]
    for a, b in pieces:
        logits = model(seq[:, a:b], kv_cache=cache)
        assert torch.allclose(logits, full[:, a:b], atol=1e-4), (a, b)
    assert cache.pos == 14


def test_inference_model_stores_weights_in_the_compute_dtype_and_computes_the_same():
    """serve, evaluate, samples and RL rollouts run on a bf16 copy instead of casting every fp32
    weight at every forward: the logits are bit-identical, and a refresh takes new weights over."""
    torch.manual_seed(0)
    model = gpt.new_model(TINY, "cpu", torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    infer = gpt.inference_model(model)
    assert {p.dtype for p in infer.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert not infer.training and not any(p.requires_grad for p in infer.parameters())
    idx = torch.randint(0, TINY.vocab_size, (2, 12))
    assert torch.equal(infer(idx), model(idx))
    with torch.no_grad():
        model.lm_head.weight.mul_(-1.0)   # an optimizer step, say
    assert not torch.equal(infer(idx), model(idx))
    assert gpt.inference_model(model, infer) is infer
    assert torch.equal(infer(idx), model(idx))
    fp32 = random_model(TINY)
    assert gpt.inference_model(fp32) is fp32   # nothing to cast: no copy


def test_param_counts_and_flops_match_reference():
    """d20 at vocab 65,536: 560,988,160 params and 3.491758e9 FLOPs/token (REFERENCE §3.2)."""
    config = gpt.config_from_depth(20, 65536, 2048)
    assert (config.n_embd, config.n_head) == (1280, 10)
    with torch.device("meta"):
        model = gpt.GPT(config)
    assert model.num_params()["total"] == 560_988_160
    assert abs(model.estimate_flops() - 3.491758e9) < 1e3
    with pytest.raises(ValueError, match="depth=25"):
        gpt.config_from_depth(25, 65536, 2048)

# ---------------------------------------------------------------------------
# optimizer


def test_adamw_half_matches_torch_adamw():
    torch.manual_seed(0)
    p1 = torch.nn.Parameter(torch.randn(8, 16))
    p2 = torch.nn.Parameter(p1.detach().clone())
    ours = gpt.MuonAdamW([dict(params=[p1], kind="adamw", lr=0.01, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.1)])
    ref = torch.optim.AdamW([p2], lr=0.01, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.1)
    for _ in range(10):
        g = torch.randn(8, 16)
        p1.grad, p2.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    assert torch.allclose(p1, p2, atol=1e-6)


def test_orthogonalize_is_near_semi_orthogonal():
    """Polar Express after 5 steps: singular values of the update all close to 1, wide or tall."""
    torch.manual_seed(0)
    for shape in [(64, 32), (32, 64), (48, 48)]:
        s = torch.linalg.svdvals(gpt.orthogonalize(torch.randn(1, *shape)).float()[0])
        assert s.min() > 0.6 and s.max() < 1.2, (shape, s.min(), s.max())


def test_first_muon_step_is_orthogonalized_gradient():
    """One Muon step on a tall matrix moves it by lr·√(rows/cols)·(near-orthogonal matrix)."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(64, 16))
    before = p.detach().clone()
    opt = gpt.MuonAdamW([dict(params=[p], kind="muon", lr=0.02, momentum=0.95, ns_steps=5)])
    p.grad = torch.randn(64, 16)
    opt.step()
    s = torch.linalg.svdvals((before - p.detach()) / (0.02 * 2.0))
    assert s.min() > 0.6 and s.max() < 1.2, (s.min(), s.max())


def test_optimizer_overfits_a_fixed_batch():
    model = gpt.new_model(TINY, "cpu")
    torch.manual_seed(1)
    x = torch.randint(0, TINY.vocab_size, (4, 16))
    y = torch.roll(x, -1, dims=1)
    opt = model.setup_optimizer()
    first = None
    for _ in range(25):
        loss = model(x, y)
        first = first or loss.item()
        loss.backward()
        opt.step()
        model.zero_grad(set_to_none=True)
    assert first == pytest.approx(4.564, abs=0.01)   # ln(96): uniform at init
    assert loss.item() < 0.5


def test_optimizer_groups_and_lr_scaling():
    """AdamW LRs scale by (n_embd/768)^-0.5; Muon groups hold one shape each; initial_lr is set."""
    opt = gpt.new_model(TINY, "cpu").setup_optimizer(embedding_lr=0.2, unembedding_lr=0.004)
    adamw = [g for g in opt.param_groups if g["kind"] == "adamw"]
    assert [g["lr"] for g in adamw] == pytest.approx([0.004 * (64 / 768) ** -0.5, 0.2 * (64 / 768) ** -0.5])
    for g in opt.param_groups:
        assert g["initial_lr"] == g["lr"]
        if g["kind"] == "muon":
            assert len({p.shape for p in g["params"]}) == 1 and g["momentum"] == 0.95

# ---------------------------------------------------------------------------
# engine


def engine_model(tokenizer, seed=0):
    """A random model over the tokenizer's vocab whose head never prefers a special token."""
    config = gpt.GPTConfig(sequence_len=64, vocab_size=tokenizer.vocab_size, n_layer=2, n_head=2, n_kv_head=1, n_embd=32)
    model = random_model(config, seed)
    with torch.no_grad():
        for name in bpe.SPECIAL_TOKENS:
            model.lm_head.weight[tokenizer.special(name)] = 0.0
    return model


def test_engine_greedy_matches_naive_generate(tokenizer):
    model = engine_model(tokenizer)
    prompt = tokenizer.encode("the answer is")
    naive = model.naive_generate(prompt, 12)
    columns = [col for col, _ in gpt.Engine(model, tokenizer).generate(prompt, num_samples=3, max_tokens=12, temperature=0.0)]
    assert len(columns) == 12
    for row in range(3):
        assert [col[row] for col in columns] == naive


def test_engine_first_token_differs_across_samples(tokenizer):
    """Each row draws its own first token from the prefill logits (nanochat E broadcast one)."""
    model = engine_model(tokenizer)
    with torch.no_grad():
        model.lm_head.weight.mul_(0.01)   # near-uniform next-token distribution
    first, _ = next(gpt.Engine(model, tokenizer).generate([tokenizer.bos_id], num_samples=16, max_tokens=1))
    assert len(set(first)) > 4


def test_engine_seeds_reproduce_and_differ(tokenizer):
    model = engine_model(tokenizer)
    engine = gpt.Engine(model, tokenizer)
    run = lambda seed: engine.generate_batch([tokenizer.bos_id], num_samples=2, max_tokens=10, top_k=20, seed=seed)
    assert run(1) == run(1)
    assert run(1)[0] != run(2)[0]


@pytest.fixture(scope="module")
def tool_model(tokenizer):
    """A tiny real model overfit on one tool-use reply whose written output is wrong ("7")."""
    sp = tokenizer.special
    seq = ([tokenizer.bos_id, sp("<|assistant_start|>"), sp("<|python_start|>")] + tokenizer.encode("2+3")
           + [sp("<|python_end|>"), sp("<|output_start|>")] + tokenizer.encode("7")
           + [sp("<|output_end|>"), sp("<|assistant_end|>")])
    config = gpt.GPTConfig(sequence_len=32, vocab_size=tokenizer.vocab_size, n_layer=1, n_head=1, n_kv_head=1, n_embd=64)
    torch.manual_seed(0)
    model = gpt.new_model(config, "cpu")
    opt = model.setup_optimizer(unembedding_lr=0.05)
    x, y = torch.tensor([seq[:-1]]), torch.tensor([seq[1:]])
    for _ in range(60):
        model(x, y).backward()
        opt.step()
        model.zero_grad(set_to_none=True)
    assert model(x, y).item() < 0.05
    return model, seq


def test_tool_use_forces_calculator_output(tokenizer, tool_model):
    """After <|python_end|> the Engine writes the true result "5" (mask 0), not what the model learned."""
    model, seq = tool_model
    sp = tokenizer.special
    prompt = seq[:2]
    seqs, masks = gpt.Engine(model, tokenizer).generate_batch(prompt, num_samples=2, max_tokens=20, temperature=0.0)
    forced = [sp("<|output_start|>")] + tokenizer.encode("5") + [sp("<|output_end|>")]
    end = seq.index(sp("<|python_end|>")) + 1
    for s, m in zip(seqs, masks):
        assert s[:end] == seq[:end] and m[:end] == [0, 0] + [1] * (end - 2)
        assert s[end:end + len(forced)] == forced and m[end:end + len(forced)] == [0] * len(forced)


def alone(engine, prompt, max_tokens, temperature=1.0, top_k=None, top_p=None, seed=42):
    """One row's tokens from Engine.generate, up to and including a stop token."""
    out = []
    for column, _ in engine.generate(prompt, 1, max_tokens, temperature, top_k, seed, top_p):
        out.append(column[0])
        if column[0] in engine.stop_ids:
            break
    return out


def test_batch_decoder_rows_match_decoding_alone(tokenizer):
    """The server's continuous batching (rows of different lengths, joining and leaving while
    others decode) gives every row exactly the tokens it gets decoded alone: greedy, seeded top-k
    and seeded top-p rows, a prompt of one token and a long one, a row that ends early."""
    model = engine_model(tokenizer)
    engine = gpt.Engine(model, tokenizer)
    jobs = [(tokenizer.encode("the answer is"), 24, dict(temperature=0.0)),
            (tokenizer.encode("12*4=48; 'strawberry'.count('r') gives"), 20, dict(temperature=1.0, top_k=20, seed=5)),
            ([tokenizer.bos_id], 6, dict(temperature=0.9, top_p=0.8, seed=7)),
            (tokenizer.encode("and"), 16, dict(temperature=1.2, seed=9))]
    decoder = gpt.BatchDecoder(engine, 3, 64, engine.stop_ids)
    got, waiting = {}, list(jobs)
    for step in range(60):
        if waiting and len(decoder.rows) < 3 and (step in (0, 3, 4) or step > 8):   # join mid-flight, up to 3 rows
            prompt, max_tokens, settings = waiting.pop(0)
            got[id(decoder.add(prompt, max_tokens, **settings))] = (prompt, max_tokens, settings, [])
        for row, token, ended in decoder.step():
            got[id(row)][3].append(token)
    assert not waiting and not decoder.rows and len(got) == 4
    for prompt, max_tokens, settings, tokens in got.values():
        assert tokens == alone(engine, prompt, max_tokens, **settings), settings
    assert len(got[min(got, key=lambda k: got[k][1])][3]) == 6   # the short row left early


def test_batch_decoder_remove_and_tool_calls(tokenizer, tool_model):
    """A row removed mid-reply frees its place at once and the others go on unchanged; the
    calculator's forced tokens are injected per row, in a batch, as they are alone."""
    model, seq = tool_model
    engine = gpt.Engine(model, tokenizer)
    decoder = gpt.BatchDecoder(engine, 2, 32, engine.stop_ids)
    leaver = decoder.add(seq[:2], 20, temperature=1.0, seed=1)
    stayer = decoder.add(seq[:2], 20, temperature=0.0)
    tokens = []
    for step in range(20):
        if step == 2:
            decoder.remove(leaver)
            assert decoder.rows == [stayer] and len(decoder.cache.lengths) == 1
        for row, token, ended in decoder.step():
            assert row is not leaver or step < 2
            if row is stayer:
                tokens.append(token)
        if not decoder.rows:
            break
    assert tokens == alone(engine, seq[:2], 20, temperature=0.0)
    forced = [tokenizer.special("<|output_start|>")] + tokenizer.encode("5") + [tokenizer.special("<|output_end|>")]
    assert forced == tokens[tokens.index(tokenizer.special("<|python_end|>")) + 1:][:len(forced)]


def test_top_p_keeps_the_smallest_likely_set():
    """top_p=0.5 over probabilities (0.4, 0.3, 0.2, 0.1) may pick only the first two tokens; after top-k
    the mass is renormalised first."""
    logits = torch.tensor([[0.4, 0.3, 0.2, 0.1]]).log().repeat(2000, 1)
    picks = gpt.sample_next_token(logits, torch.Generator().manual_seed(0), 1.0, None, 0.5).view(-1)
    assert set(picks.tolist()) == {0, 1}
    picks = gpt.sample_next_token(logits, torch.Generator().manual_seed(0), 1.0, 3, 0.8).view(-1)   # of 0.44, 0.33, 0.22
    assert set(picks.tolist()) == {0, 1, 2}


CALC_GOOD = [("2+3", "5"), ("10/4", "2.5"), ("7//2", "3"), ("7%3", "1"), ("2**10", "1024"),
             ("-(3+4)*2", "-14"), ("1,000*3", "3000"), ("3.5*2", "7.0"), ("2**-1", "0.5"),
             ("'strawberry'.count('r')", "3"), ("'a,b,c'.count(',')", "2"), (" 12 * (3 + 1) ", "48"),
             ("(" * 150 + "1" + ")" * 150, "1")]
CALC_BAD = ["__import__('os').system('ls')", "().__class__.__bases__", "'abc'.__class__", "'abc'.count",
            "'a'.upper()", "x + 1", "open('f')", "print(1)", "[1, 2]", "lambda: 1", "1 if 1 else 2",
            "True + 1", "9**9**9", "10**100", "(10**12)*(10**12)", "1e308*10", "1/0", "'a'*10**6",
            "'ab' + 'c'", "(" * 300 + "1" + ")" * 300, "-" * 900 + "1", "'" + "a" * 5000 + "'.count('a')",
            "1+" * 400 + "1", "'abc'.count('a', 1)", "(-8)**0.5", "", "2+"]


@pytest.mark.parametrize("expr,expected", CALC_GOOD)
def test_calculator_good(expr, expected):
    assert gpt.use_calculator(expr) == expected


def test_calculator_refuses_hostile_input_fast():
    for expr in CALC_BAD:
        t0 = time.perf_counter()
        assert gpt.use_calculator(expr) is None, expr
        assert time.perf_counter() - t0 < 0.05, expr[:40]


def test_calculator_is_silent_on_malformed_literals():
    # ast.parse warns (SyntaxWarning: invalid decimal literal) on these; the tool must not write to stderr
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for expr in ["1if 2else 3", "0x1for", "3in [3]", "5and 3"]:
            assert gpt.use_calculator(expr) is None, expr
    assert caught == []

# ---------------------------------------------------------------------------
# run records


def test_rewind_log_keeps_only_steps_before_the_resume_point(tmp_path):
    """A resumed run redoes the steps from its resume point on, so their old records must go."""
    path = str(tmp_path / "logs" / "rl.jsonl")
    gpt.rewind_log(path, None)
    for step in range(5):
        gpt.log_jsonl(path, {"step": step, "reward": 0.5})
    gpt.rewind_log(path, 3)
    assert [json.loads(line)["step"] for line in open(path)] == [0, 1, 2]
    gpt.rewind_log(path, None)
    assert open(path).read() == ""


def test_git_info_and_single_rank_reductions():
    info = gpt.git_info()
    assert info is None or set(info) == {"commit", "dirty"}
    cpu = torch.device("cpu")
    assert gpt.rank_max([1.5, 0, True], False, cpu) == [1.5, 0.0, 1.0]
    assert gpt.rank_sum([2, 0.25], False, cpu) == [2.0, 0.25]
    assert gpt.rank_gather({"cursor": 3}, False) == [{"cursor": 3}]


def test_stop_requests_turn_signals_into_a_flag():
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        requests = gpt.stop_requests()
        os.kill(os.getpid(), signal.SIGTERM)   # the handler runs before the next bytecode
        os.kill(os.getpid(), signal.SIGINT)
        assert requests == [signal.SIGTERM, signal.SIGINT]
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)

# ---------------------------------------------------------------------------
# checkpoints and overrides


def test_checkpoint_round_trip_and_mismatch(tokenizer):
    config = gpt.GPTConfig(sequence_len=32, vocab_size=tokenizer.vocab_size, n_layer=1, n_head=2, n_kv_head=2, n_embd=32)
    model = random_model(config)
    opt = model.setup_optimizer()
    model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long)).backward()
    opt.step()
    gpt.save_checkpoint("base", 5, model, {"tokenizer": tokenizer.fingerprint(), "lr": 0.1}, optimizer=opt)
    assert gpt.latest_step("base") == 5 and gpt.latest_step("sft") is None
    loaded, meta, optim_state = gpt.load_checkpoint("base", "cpu", tokenizer=tokenizer)
    assert meta["step"] == 5 and meta["lr"] == 0.1 and meta["model_config"]["n_embd"] == 32
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k
    opt2 = loaded.setup_optimizer()
    opt2.load_state_dict(optim_state)
    assert torch.equal(opt2.state[loaded.lm_head.weight]["exp_avg"], opt.state[model.lm_head.weight]["exp_avg"])
    other = bpe.Tokenizer.train(["a different corpus gives different merges " * 10], vocab_size=280)
    with pytest.raises(ValueError, match="tokenizer mismatch"):
        gpt.load_checkpoint("base", "cpu", tokenizer=other)
    meta_path = os.path.join(gpt.home(), "checkpoints", "base", "d1", "meta_000005.json")
    with open(meta_path) as f:
        edited = json.load(f)
    edited["model_config"]["n_embd"] = 64
    with open(meta_path, "w") as f:
        json.dump(edited, f)
    with pytest.raises(ValueError, match="config mismatch.*n_embd=64"):
        gpt.load_checkpoint("base", "cpu")
    with pytest.raises(FileNotFoundError, match="no sft checkpoint"):
        gpt.load_checkpoint("sft", "cpu")


def test_latest_checkpoint_is_the_one_saved_last_not_the_highest_step():
    """A fresh short run into a folder that still holds a longer old run: resuming, evaluating and
    the next stage must all take the new run's checkpoint."""
    model = random_model(gpt.GPTConfig(sequence_len=16, vocab_size=64, n_layer=1, n_head=2, n_kv_head=2, n_embd=32))
    gpt.save_checkpoint("base", 1500, model, {"run": "old"})
    gpt.save_checkpoint("base", 200, model, {"run": "new"})
    ckpt_dir = os.path.join(gpt.home(), "checkpoints", "base", "d1")
    old_time = os.stat(os.path.join(ckpt_dir, "meta_001500.json")).st_mtime_ns
    os.utime(os.path.join(ckpt_dir, "meta_000200.json"), ns=(old_time + 10**9, old_time + 10**9))
    assert gpt.latest_step("base") == 200
    assert gpt.load_checkpoint("base", "cpu")[1]["run"] == "new"
    assert gpt.load_checkpoint("base", "cpu", step=1500)[1]["run"] == "old"   # still there when asked for


SAVE_FOREVER = """
import sys, torch, gpt
model = gpt.new_model(gpt.GPTConfig(sequence_len=16, vocab_size=4096, n_layer=2, n_head=2, n_kv_head=2, n_embd=512), "cpu")
gpt.save_checkpoint("base", 1, model, {})
print("saved", flush=True)
step = 2
while True:
    gpt.save_checkpoint("base", step, model, {})
    step += 1
"""


def test_killed_save_leaves_a_loadable_checkpoint(tmp_path):
    """SIGKILL in the middle of saving: every visible checkpoint still loads, partial files are never named as one."""
    env = {**os.environ, "SLIMCHAT_HOME": str(tmp_path / "home"), "PYTHONPATH": os.path.dirname(os.path.dirname(__file__))}
    proc = subprocess.Popen([sys.executable, "-c", SAVE_FOREVER], env=env, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "saved"
    time.sleep(0.3)
    proc.kill()
    proc.wait()
    model, meta, _ = gpt.load_checkpoint("base", "cpu")
    assert meta["step"] == gpt.latest_step("base") >= 1
    ckpt_dir = tmp_path / "home" / "checkpoints" / "base" / "d2"
    for name in os.listdir(ckpt_dir):
        if name.startswith("model_") and name.endswith(".pt"):
            torch.load(ckpt_dir / name, weights_only=True)


SLOW_SECOND_RANK = """
import os, time, gpt
_, rank, _, _, _ = gpt.compute_init("cpu")
model = gpt.new_model(gpt.GPTConfig(sequence_len=16, vocab_size=64, n_layer=1, n_head=2, n_kv_head=2, n_embd=32), "cpu")
if rank == 1:
    time.sleep(3)   # a slow disk: this rank's optimizer shard lands late
gpt.save_checkpoint("base", 7, model, {}, optimizer=model.setup_optimizer(), rank=rank)
if rank == 0:   # save_checkpoint has returned: is the meta there before rank 1's shard?
    ckpt = os.path.join(gpt.home(), "checkpoints", "base", "d1")
    print("meta", os.path.exists(os.path.join(ckpt, "meta_000007.json")),
          "shard1", os.path.exists(os.path.join(ckpt, "optim_000007_rank1.pt")), flush=True)
gpt.compute_cleanup()
"""


def test_meta_is_written_after_every_rank_saved_its_shard(tmp_path):
    """Two real gloo ranks, the second one slow: meta (the mark of a whole checkpoint) must not
    appear before its optimizer shard, or a kill in between resumes with that rank's state lost."""
    script = tmp_path / "save.py"
    script.write_text(SLOW_SECOND_RANK)
    env = {**os.environ, "SLIMCHAT_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "meta True shard1 True" in proc.stdout, proc.stdout


def test_interrupted_write_leaves_no_temp_file(tmp_path):
    """A full disk or a Ctrl-C in the middle of a checkpoint write: the partial temp file (gigabytes
    at d20) is removed, not left next to the checkpoints."""
    def disk_full(tmp):
        with open(tmp, "wb") as f:
            f.write(b"half a checkpoint")
        raise OSError(28, "No space left on device")

    def ctrl_c(tmp):
        with open(tmp, "wb") as f:
            f.write(b"half a checkpoint")
        os.kill(os.getpid(), signal.SIGINT)   # Python's own handler raises KeyboardInterrupt here

    saved = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        for write, error in ((disk_full, OSError), (ctrl_c, KeyboardInterrupt)):
            with pytest.raises(error):
                gpt._atomic_write(str(tmp_path / "model_000001.pt"), write)
            assert os.listdir(tmp_path) == []
    finally:
        signal.signal(signal.SIGINT, saved)


def test_stale_temp_files_are_removed_on_save_and_load():
    """Temp files of killed saves go at the next save into the folder (every writer of the run is
    done by then), and at a load when their process is gone; a live writer's file, or one from
    another machine sharing the folder, stays at a load."""
    import socket
    model = random_model(gpt.GPTConfig(sequence_len=16, vocab_size=64, n_layer=1, n_head=2, n_kv_head=2, n_embd=32))
    gpt.save_checkpoint("base", 1, model, {})
    ckpt_dir = os.path.join(gpt.home(), "checkpoints", "base", "d1")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()   # its pid names a process that no longer runs
    host = socket.gethostname()
    dead, alive, elsewhere = (f"model_000002.pt.tmp{gone.pid}-{host}", f"optim_000002_rank0.pt.tmp{os.getpid()}-{host}",
                              f"optim_000002_rank1.pt.tmp{gone.pid}-another-node")
    for name in (dead, alive, elsewhere):
        open(os.path.join(ckpt_dir, name), "wb").close()
    gpt.load_checkpoint("base", "cpu")
    assert sorted(n for n in os.listdir(ckpt_dir) if ".tmp" in n) == sorted([alive, elsewhere])
    gpt.save_checkpoint("base", 2, model, {})
    assert [n for n in os.listdir(ckpt_dir) if ".tmp" in n] == []


def test_no_gpu_seen_by_torch_stops_with_the_fix(tmp_path, monkeypatch):
    """nvidia-smi lists a GPU but torch sees none (a torch built for a newer CUDA than the driver):
    autodetection must stop, naming torch's CUDA build and the driver, instead of training on the
    CPU. --device=cpu still runs; --device=cuda stops the same way."""
    if torch.cuda.is_available():
        pytest.skip("torch sees a GPU here")
    fake = tmp_path / "bin" / "nvidia-smi"   # stands in for the driver's tool on this GPU-less machine
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 535.104.05\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    for device in ("", "cuda"):
        with pytest.raises(SystemExit) as stop:
            gpt.compute_init(device)
        message = str(stop.value)
        assert "535.104.05" in message and f"torch {torch.__version__} is built for" in message, message
        assert "download.pytorch.org/whl/" in message and "--device=cpu" in message, message
    assert gpt.compute_init("cpu")[4] == torch.device("cpu")


def test_compute_init_without_torchrun(monkeypatch):
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert gpt.compute_init("cpu") == (False, 0, 0, 1, torch.device("cpu"))
    assert gpt.compute_dtype("cpu")[0] == torch.float32
    with pytest.raises(ValueError, match="unknown device"):
        gpt.compute_init("tpu")


@pytest.mark.parametrize("name, flops", [
    ("NVIDIA H100 80GB HBM3", 989e12),           # the SXM part's name
    ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200", 989e12),
    ("NVIDIA GH200 480GB", 989e12),              # not an H200
    ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA A100 80GB PCIe", 312e12),
    ("NVIDIA L40S", 362e12),
    ("NVIDIA L4", 121e12),
    ("NVIDIA GeForce RTX 4090", 165e12),
    ("NVIDIA B200", 2.25e15),
    ("NVIDIA GB200", 2.5e15),                    # not a B200
    ("NVIDIA GeForce RTX 4090 D", None),         # a cut-down 4090: no MFU rather than a wrong one
    ("NVIDIA GeForce RTX 4090 Laptop GPU", None),
    ("Tesla T4", None),
    ("AMD Instinct MI300X", None),
])
def test_peak_flops_by_gpu_name(name, flops):
    """MFU's denominator: dense bf16 peaks matched on the whole device name; unknown names get None."""
    assert gpt.peak_flops(name) == flops


def test_load_tokenizer(tokenizer, tmp_path):
    with pytest.raises(FileNotFoundError, match="bpe.py train"):
        gpt.load_tokenizer()
    tokenizer.save(str(tmp_path / "home" / "tokenizer" / "tokenizer.json"))
    assert gpt.load_tokenizer().fingerprint() == tokenizer.fingerprint()


def test_apply_overrides():
    scope = {"depth": 4, "lr": 0.02, "use_compile": True, "device": "", "init_stage": None, "MAX": 3, "_x": 1}
    knobs = gpt.apply_overrides(scope, ["--depth=6", "--lr=1", "--use_compile=0", "--device=cpu", "--init_stage=mid"])
    assert knobs == {"depth": 6, "lr": 1.0, "use_compile": False, "device": "cpu", "init_stage": "mid"}
    assert scope["depth"] == 6 and type(scope["lr"]) is float
    for argv, message in [(["--detph=3"], "did you mean --depth"), (["--depth=2.5"], "expected an int"),
                          (["--use_compile=maybe"], "expected 1, 0, true or false"), (["depth=3"], "expected --name=value"),
                          (["--MAX=4"], "unknown knob")]:
        with pytest.raises(SystemExit, match=message):
            gpt.apply_overrides(dict(scope), argv)


def test_apply_overrides_help_lists_knobs(capsys):
    with pytest.raises(SystemExit) as exit_info:
        gpt.apply_overrides({"depth": 4, "lr": 0.02}, ["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--depth=4" in out and "--lr=0.02" in out

# ---------------------------------------------------------------------------
# downloads against a real loopback HTTP server


class Handler(http.server.BaseHTTPRequestHandler):
    """Serves server.files with Range support; server.plan scripts failures for the next requests."""

    def do_GET(self):
        srv = self.server
        srv.requests.append((self.path, self.headers.get("Range")))
        behaviour = srv.plan.pop(0) if srv.plan else "ok"
        data = srv.files.get(self.path)
        if data is None or behaviour == "500":
            self.send_error(404 if data is None else 500)
            return
        start = int(self.headers["Range"][6:].split("-")[0]) if self.headers.get("Range") else 0
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        body = data[start:]
        self.wfile.write(body[:len(body) // 2] if behaviour == "truncate" else body)
        self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.files, srv.plan, srv.requests = {}, [], []
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    yield srv
    srv.shutdown()
    srv.server_close()


def parquet_bytes(tmp_path, rows=2000):
    path = tmp_path / "src.parquet"
    pq.write_table(pa.table({"text": [f"document number {i}" for i in range(rows)]}), path)
    return path.read_bytes()


def test_download_resumes_truncated_body_with_range(server, tmp_path):
    data = parquet_bytes(tmp_path)
    server.files["/d/a.parquet"] = data
    server.plan = ["truncate"]
    out = gpt.download(server.url + "/d/a.parquet", str(tmp_path / "out" / "a.parquet"), backoff_s=0)
    assert open(out, "rb").read() == data
    assert server.requests == [("/d/a.parquet", None), ("/d/a.parquet", f"bytes={len(data) // 2}-")]
    assert not os.path.exists(out + ".partial")


def test_download_retries_after_server_error(server, tmp_path):
    data = parquet_bytes(tmp_path)
    server.files["/a.parquet"] = data
    server.plan = ["500", "500"]
    out = gpt.download(server.url + "/a.parquet", str(tmp_path / "a.parquet"), backoff_s=0)
    assert open(out, "rb").read() == data and len(server.requests) == 3


def test_download_detects_corrupt_parquet(server, tmp_path):
    data = parquet_bytes(tmp_path)
    server.files["/bad.parquet"] = data[:100] + b"x" * (len(data) - 100)
    with pytest.raises(RuntimeError, match=r"after 2 attempts: http://127.*/bad.parquet.*parquet"):
        gpt.download(server.url + "/bad.parquet", str(tmp_path / "bad.parquet"), attempts=2, backoff_s=0)
    assert sorted(os.listdir(tmp_path)) == ["bad.parquet.lock", "src.parquet"]


def test_download_404_names_the_url_without_retrying(server, tmp_path):
    with pytest.raises(RuntimeError, match=r"http://127.*/missing.parquet.*404"):
        gpt.download(server.url + "/missing.parquet", str(tmp_path / "m.parquet"), backoff_s=0)
    assert len(server.requests) == 1


def test_download_concurrent_fetches_download_once(server, tmp_path):
    data = parquet_bytes(tmp_path)
    server.files["/c.parquet"] = data
    target = str(tmp_path / "c.parquet")
    threads = [threading.Thread(target=gpt.download, args=(server.url + "/c.parquet", target)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert open(target, "rb").read() == data and len(server.requests) == 1


def test_file_url_and_hub_endpoint(tmp_path, monkeypatch):
    data = parquet_bytes(tmp_path)
    mirror = tmp_path / "mirror" / "datasets" / "org" / "ds" / "resolve" / "main" / "data"
    mirror.mkdir(parents=True)
    (mirror / "x.parquet").write_bytes(data)
    monkeypatch.setenv("HF_ENDPOINT", f"file://{tmp_path / 'mirror'}")
    assert gpt.hub_url("org/ds", "data/x.parquet") == f"file://{tmp_path}/mirror/datasets/org/ds/resolve/main/data/x.parquet"
    path = gpt.fetch_hub("org/ds", "data/x.parquet")
    assert path == str(tmp_path / "home" / "hub" / "org" / "ds" / "data" / "x.parquet")
    assert open(path, "rb").read() == data
    with pytest.raises(RuntimeError, match="file://.*nope.parquet"):
        gpt.fetch_hub("org/ds", "nope.parquet")
    monkeypatch.setenv("SLIMCHAT_FILES_ENDPOINT", "http://127.0.0.1:1/files/")
    assert gpt.files_url("words_alpha.txt") == "http://127.0.0.1:1/files/words_alpha.txt"
