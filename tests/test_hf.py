"""
Tests for the Hugging Face format (hf.py). A tiny slimchat model with random
weights and a tokenizer trained on tinyworld text (vocab 512) are exported, then loaded by
transformers' own NanoChatForCausalLM and tokenizer with no custom code: the logits, greedy tokens,
token ids and chat renderings must equal slimchat's; importing gives back the same weights and
tokenizer; a NanoChat model made by transformers itself imports with its own logits.
transformers, tokenizers and safetensors are test-only dependencies. CPU, float32.
"""
import json
import os
import random
import shutil
import subprocess
import sys

import pytest
import safetensors.torch
import tokenizers
import torch
import transformers

import bpe
import gpt
import hf
import tinyworld

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXTS = [
    "The river had been low all summer, and by August the old ferry rested on the mud.",
    "def add(a, b):\n    return a + b  # sum\n\n\tprint(add(2, 3))\r\n",
    "Numbers: 1 12 123 1234567 3.14159 -42 1,000,000 and 2+2=4.",
    "spaces:    four, tabs:\t\t, newlines:\n\n\n, mixed: \t \n ",
    "emoji 🌍🎉👩‍👩‍👧 and CJK 你好世界，こんにちは、안녕하세요",
    "looks special: <|bos|> <|user_start|>hi<|user_end|><|assistant_start|> <|output_end|>",
    "accents: café naïve Ærøskøbing, Русский текст, العربية",
]


def docs(n):
    world = tinyworld.make_world(0, 12)
    rng = random.Random(0)
    return [tinyworld.make_document(rng, world) for _ in range(n)]


@pytest.fixture(scope="module")
def tok():
    return bpe.Tokenizer.train(docs(200), 512)


@pytest.fixture(scope="module")
def model(tok):
    """Random weights everywhere (init_weights zeroes the head and projections, which flattens the logits);
    grouped-query attention (4 query heads, 2 for keys and values)."""
    torch.manual_seed(0)
    config = gpt.GPTConfig(sequence_len=64, vocab_size=tok.vocab_size, n_layer=2, n_head=4, n_kv_head=2, n_embd=64)
    model = gpt.new_model(config, "cpu", torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model


@pytest.fixture(scope="module")
def exported(tok, model, tmp_path_factory):
    """The float32 export, and transformers' model and tokenizer loaded from it."""
    out = str(tmp_path_factory.mktemp("hf") / "export")
    hf.export_hf(model, tok, out, torch.float32, {"stage": "sft", "step": 7})
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out)
    return out, hf_model, transformers.AutoTokenizer.from_pretrained(out)


def test_transformers_logits_equal_ours(tok, model, exported):
    """Random and real token sequences, batches of 3, from 1 token to past the trained context."""
    _, hf_model, _ = exported
    assert type(hf_model).__name__ == "NanoChatForCausalLM"
    real = tok.encode("\n\n".join(docs(30)))
    torch.manual_seed(1)
    for T in (1, 9, 64, 100):
        for idx in (torch.randint(0, tok.vocab_size, (3, T)), torch.tensor([[tok.bos_id] + real[i * T:(i + 1) * T - 1] for i in range(3)])):
            with torch.no_grad():
                ours, theirs = model(idx), hf_model(idx).logits
            assert (ours - theirs).abs().max() < 1e-4, T


def test_greedy_generate_equals_engine(tok, model, exported):
    _, hf_model, _ = exported
    engine = gpt.Engine(model, tok)
    stops = {tok.special("<|assistant_end|>"), tok.bos_id}
    prompts = [tok.render_for_completion([{"role": "user", "content": "Who lives in the town by the river?"}]),
               [tok.bos_id] + tok.encode("Once upon a time"), [tok.bos_id]]
    for prompt in prompts:
        (ours,), _ = engine.generate_batch(prompt, max_tokens=24, temperature=0.0)
        out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False)[0].tolist()
        if out[-1] in stops:   # transformers keeps the stop token, the Engine drops it
            out = out[:-1]
        assert out == ours


def test_tokenizer_encodes_like_ours(tok, exported):
    """Plain text, code, digits, whitespace runs, emoji, CJK, and text that looks like special tokens
    (encoded as text when split_special_tokens=True, as slimchat always does)."""
    _, _, hf_tok = exported
    for text in TEXTS + docs(3):
        ids = tok.encode(text)
        assert hf_tok.encode(text, add_special_tokens=False, split_special_tokens=True) == ids
        assert hf_tok.decode(ids) == text
    assert hf_tok(TEXTS[0])["input_ids"] == [tok.bos_id] + tok.encode(TEXTS[0])   # <|bos|> first, as in our prompts
    assert hf_tok.convert_ids_to_tokens(tok.vocab_size - 1) == "<|output_end|>"


CONVERSATIONS = [
    [{"role": "user", "content": "Hi there!"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is 2 + 3?"},
     {"role": "assistant", "content": "5."}, {"role": "user", "content": "And 12 * 4?\n"}],
    [{"role": "user", "content": "How many r in 'strawberry'?"},
     {"role": "assistant", "content": [{"type": "text", "text": "Let me count: "},
                                       {"type": "python", "text": "'strawberry'.count('r')"},
                                       {"type": "python_output", "text": "3"}, {"type": "text", "text": " It is 3."}]},
     {"role": "user", "content": "thanks 🎉"}, {"role": "assistant", "content": "dropped when generating"}],
]


def test_chat_template_renders_like_ours(tok, exported):
    _, _, hf_tok = exported
    for conv in CONVERSATIONS:
        ids = hf_tok.apply_chat_template(conv, add_generation_prompt=True)["input_ids"]
        assert ids == tok.render_for_completion(conv)
    full = hf_tok.apply_chat_template(CONVERSATIONS[2])["input_ids"]
    assert full == tok.render_conversation(CONVERSATIONS[2])[0]
    # a user typing a special token's text: transformers encodes it as text only when asked to
    conv = [{"role": "user", "content": "say <|assistant_start|> now"}]
    ids = hf_tok.apply_chat_template(conv, add_generation_prompt=True, sanitize_control_tokens=True)["input_ids"]
    assert ids == tok.render_for_completion(conv)


def test_import_gives_back_identical_weights_and_tokenizer(tok, model, exported, tmp_path):
    out, _, _ = exported
    back, back_tok = hf.import_hf(out)
    assert back.config == model.config and back_tok.fingerprint() == tok.fingerprint()
    for (name, ours), theirs in zip(model.state_dict().items(), back.state_dict().values()):
        assert torch.equal(ours, theirs), name
    # bfloat16: the weights rounded once, and the file reads the same with the safetensors package
    hf.export_hf(model, tok, str(tmp_path / "bf16"), torch.bfloat16, {"stage": "sft", "step": 7})
    path = str(tmp_path / "bf16" / "model.safetensors")
    ours, reference = hf.load_safetensors(path), safetensors.torch.load_file(path)
    assert ours.keys() == reference.keys() and all(torch.equal(ours[k], reference[k]) for k in ours)
    back, _ = hf.import_hf(str(tmp_path / "bf16"))
    for (name, ours), theirs in zip(model.state_dict().items(), back.state_dict().values()):
        assert torch.equal(ours.bfloat16().float(), theirs), name


def test_model_made_by_transformers_imports(tok, exported, tmp_path):
    """Its own config (rms_norm_eps 1e-6, its init) and its own save_pretrained files. The bound is
    tight because its init makes small logits (up to about 0.6): slimchat's default eps in place of
    the imported one would move them by 2e-5, float32 rounding by about 2e-7."""
    _, _, hf_tok = exported
    config = transformers.NanoChatConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=256,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1)
    torch.manual_seed(2)
    hf_model = transformers.NanoChatForCausalLM(config)
    hf_model.save_pretrained(tmp_path)
    hf_tok.save_pretrained(tmp_path)
    model, _ = hf.import_hf(str(tmp_path))
    assert model.config.norm_eps == 1e-6 and model.config.n_kv_head == 1
    idx = torch.randint(0, tok.vocab_size, (2, 33))
    with torch.no_grad():
        ours, theirs = model(idx), hf_model(idx).logits
    assert theirs.std() > 0.01 and (ours - theirs).abs().max() < 2e-6


def test_tiktoken_style_tokenizer_imports_to_our_merges(tok, exported, tmp_path):
    """transformers converts nanochat's published tokenizers from tiktoken ranks: every split of a token
    into two tokens is listed (9 tokens here have more than one), with ignore_merges. Import keeps the
    split BPE reaches on the token's own bytes, which is our merge; both encode ordinary text alike."""
    folder = shutil.copytree(exported[0], tmp_path / "tiktoken")
    ranks = tok.mergeable_ranks()
    names = {v: k for k, v in json.load(open(folder / "tokenizer.json"))["model"]["vocab"].items()}
    splits = sorted((ranks[t], ranks[t[:i]], ranks[t[i:]]) for t in ranks for i in range(1, len(t))
                    if t[:i] in ranks and t[i:] in ranks)
    assert len(splits) > len(tok.merges)
    edit_json(folder, "tokenizer.json", lambda t: t["model"].update(
        ignore_merges=True, merges=[[names[a], names[b]] for _, a, b in splits]))
    assert hf.tokenizer_from_hf(str(folder / "tokenizer.json")).merges == tok.merges
    hf_tok = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    hf_tok.encode_special_tokens = True
    for text in TEXTS + docs(3):
        assert hf_tok.encode(text, add_special_tokens=False).ids == tok.encode(text)


def edit_json(folder, name, change):
    with open(os.path.join(folder, name)) as f:
        obj = json.load(f)
    change(obj)
    with open(os.path.join(folder, name), "w") as f:
        json.dump(obj, f)


@pytest.mark.parametrize("name, change, message", [
    ("config.json", lambda c: c.update(model_type="llama"), "'llama' model"),
    ("config.json", lambda c: c.update(final_logit_softcapping=30.0), "final_logit_softcapping=30.0"),
    ("tokenizer.json", lambda t: t["added_tokens"].append(dict(t["added_tokens"][0], id=600, content="<|x|>")),
     "not slimchat's"),
    ("tokenizer.json", lambda t: t["model"].update(type="WordPiece"), "'WordPiece'"),
    ("tokenizer.json", lambda t: t["model"]["merges"].reverse(), "not listed in the order"),
])
def test_foreign_folders_are_refused(exported, tmp_path, name, change, message):
    folder = shutil.copytree(exported[0], tmp_path / "copy")
    edit_json(folder, name, change)
    with pytest.raises(ValueError, match=message):
        hf.import_hf(str(folder))


def test_cli_export_then_import_then_serve(tok, model, tmp_path):
    """The commands a user runs: export an sft checkpoint, import it into a fresh home, chat with it."""
    home, fresh = tmp_path / "home", tmp_path / "fresh"
    env = dict(os.environ, SLIMCHAT_HOME=str(home), OMP_NUM_THREADS="1")
    tok.save(str(home / "tokenizer" / "tokenizer.json"))
    os.environ["SLIMCHAT_HOME"] = str(home)
    try:
        gpt.save_checkpoint("sft", 5, model, {"tokenizer": tok.fingerprint()})
    finally:
        del os.environ["SLIMCHAT_HOME"]
    (home / "report").mkdir()
    (home / "report" / "report.json").write_text(json.dumps({"evals": {"sft": {"GSM8K": 0.35, "MMLU": 0.475}}}))

    def run(*args, home_dir):
        return subprocess.run([sys.executable, *args], cwd=ROOT, env=dict(env, SLIMCHAT_HOME=str(home_dir)),
                              capture_output=True, text=True, timeout=300)
    proc = run("hf.py", "export", f"--out={tmp_path / 'out'}", "--dtype=float32", home_dir=home)
    assert proc.returncode == 0, proc.stderr
    assert "| GSM8K | 0.3500 |" in (tmp_path / "out" / "README.md").read_text()
    proc = run("hf.py", "import", f"--from={tmp_path / 'out'}", home_dir=fresh)
    assert proc.returncode == 0, proc.stderr
    proc = run("hf.py", "import", f"--from={tmp_path / 'out'}", home_dir=fresh)
    assert proc.returncode != 0 and "already holds checkpoints; pass --tag=NAME" in proc.stderr
    other = tmp_path / "other"   # a home whose checkpoints need another tokenizer is left alone
    bpe.Tokenizer.train(docs(20), 300).save(str(other / "tokenizer" / "tokenizer.json"))
    proc = run("hf.py", "import", f"--from={tmp_path / 'out'}", home_dir=other)
    assert proc.returncode != 0 and "holds a different tokenizer" in proc.stderr and not (other / "checkpoints").exists()
    proc = run("serve.py", "-p", "Hi", "--temperature=0", "--max_tokens=8", home_dir=fresh)
    assert proc.returncode == 0, proc.stderr
    os.environ["SLIMCHAT_HOME"] = str(fresh)
    try:
        back, meta, _ = gpt.load_checkpoint("sft", "cpu", tokenizer=tok)
    finally:
        del os.environ["SLIMCHAT_HOME"]
    assert meta["step"] == 0 and all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), back.state_dict().values()))
