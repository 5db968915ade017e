"""
hf.py: take a slimchat model to the Hugging Face format and back, as transformers' NanoChat
(NanoChatForCausalLM: the same model family, loaded with no custom code).
reads checkpoints/<stage>/<tag>/ and the tokenizer under $SLIMCHAT_HOME (export), or a folder of
config.json, model.safetensors (or shards) and tokenizer.json (import); writes the other.
  python hf.py export --stage=sft --out=DIR [--step=N] [--tag=d20] [--dtype=bfloat16|float32]
  python hf.py import --from=DIR [--stage=sft|base] [--tag=NAME]
The safetensors files are written and read with the standard library and torch alone: the
safetensors package is not needed at run time.
"""
import json
import math
import os
import sys

import regex
import torch

import bpe
import gpt

HF_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
HF_LAYER_NAMES = [("attn.c_q", "self_attn.q_proj"), ("attn.c_k", "self_attn.k_proj"), ("attn.c_v", "self_attn.v_proj"),
                  ("attn.c_proj", "self_attn.o_proj"), ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")]
# slimchat's chat format (bpe.render_conversation) as a Jinja template. With add_generation_prompt
# it renders what render_for_completion does: a final assistant message is dropped, then
# <|assistant_start|>. One difference it cannot avoid: two adjacent text parts of an assistant
# message are encoded as one text here, separately by bpe.py.
HF_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' -%}{%- set messages = [{'role': 'user', 'content': "
    "messages[0]['content'] + '\\n\\n' + messages[1]['content']}] + messages[2:] -%}{%- endif -%}"
    "{%- if add_generation_prompt and messages[-1]['role'] == 'assistant' -%}"
    "{%- set messages = messages[:-1] -%}{%- endif -%}"
    "<|bos|>{%- for m in messages -%}"
    "{%- if m['role'] != ['user', 'assistant'][loop.index0 % 2] -%}{{ raise_exception("
    "'roles must alternate user, assistant, ... after an optional system message') }}{%- endif -%}"
    "{%- if m['role'] == 'user' -%}<|user_start|>{{ m['content'] }}<|user_end|>"
    "{%- else -%}<|assistant_start|>{%- if m['content'] is string -%}{{ m['content'] }}"
    "{%- else -%}{%- for part in m['content'] -%}"
    "{%- if part['type'] == 'python' -%}<|python_start|>{{ part['text'] }}<|python_end|>"
    "{%- elif part['type'] == 'python_output' -%}<|output_start|>{{ part['text'] }}<|output_end|>"
    "{%- else -%}{{ part['text'] }}{%- endif -%}{%- endfor -%}{%- endif -%}<|assistant_end|>"
    "{%- endif -%}{%- endfor -%}{%- if add_generation_prompt -%}<|assistant_start|>{%- endif -%}")


def save_safetensors(tensors, path):
    """Write {name: tensor} in the safetensors layout: the header's length (8 bytes, little-endian),
    the JSON header {name: {dtype, shape, data_offsets}}, then every tensor's raw bytes."""
    assert sys.byteorder == "little", "safetensors holds little-endian bytes; this machine is big-endian"
    codes = {dtype: code for code, dtype in HF_DTYPES.items()}
    header, offset = {"__metadata__": {"format": "pt"}}, 0   # older transformers insist on the format tag
    for name, t in tensors.items():
        size = t.numel() * t.element_size()
        header[name] = {"dtype": codes[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)   # the format pads the header to a multiple of 8 bytes
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little") + blob)
        for t in tensors.values():
            f.write(t.contiguous().view(-1).view(torch.uint8).numpy())


def load_safetensors(path):
    """{name: tensor} from a safetensors file of F32, BF16 or F16 tensors."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        try:
            header = json.loads(f.read(n)) if 8 + n <= size else None
        except (UnicodeDecodeError, json.JSONDecodeError):
            header = None
        if not isinstance(header, dict):
            raise ValueError(f"{path} is not a safetensors file (no readable header)")
        header.pop("__metadata__", None)
        tensors = {}
        for name, info in header.items():
            if info["dtype"] not in HF_DTYPES:
                raise ValueError(f"{path}: tensor {name} is {info['dtype']}; only F32, BF16 and F16 are read")
            dtype, (start, end) = HF_DTYPES[info["dtype"]], info["data_offsets"]
            f.seek(8 + n + start)
            data = bytearray(f.read(end - start))
            if len(data) != end - start or len(data) != math.prod(info["shape"]) * dtype.itemsize:
                raise ValueError(f"{path}: tensor {name} is truncated or does not match its shape {info['shape']}")
            tensors[name] = torch.frombuffer(data, dtype=torch.uint8).view(dtype).reshape(info["shape"])
    return tensors


def _hf_names(n_layer):
    """slimchat parameter name -> transformers NanoChat parameter name."""
    names = {"wte.weight": "model.embed_tokens.weight", "lm_head.weight": "lm_head.weight"}
    for i in range(n_layer):
        for ours, theirs in HF_LAYER_NAMES:
            names[f"blocks.{i}.{ours}.weight"] = f"model.layers.{i}.{theirs}.weight"
    return names


def _flip_rotary(w, head_dim):
    """Negate the rows of c_q / c_k that feed the second half of each head. Both sides rotate the
    pairs (x[i], x[i + D/2]), in opposite directions; with that half negated, transformers' rotation
    gives our rotated q, k with the same half negated, which QK-norm and q·k do not see. Its own inverse."""
    w = w.clone().view(-1, 2, head_dim // 2, w.size(-1))   # (heads, half, D/2, C)
    w[:, 1] = -w[:, 1]
    return w.view(-1, w.size(-1))


def _byte_chars():
    """GPT-2's printable stand-in for each byte: byte-level BPE files spell token bytes with these."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


def hf_tokenizer_json(tok):
    """The tokenizer as a `tokenizers` BPE (tokenizer.json): the same split pattern, byte ids, merges
    (in id order, which is the priority order on both sides) and special tokens. With
    add_special_tokens (transformers' default) it prepends <|bos|>, as our generation prompts do."""
    chars = _byte_chars()
    names = ["".join(chars[b] for b in tok.decode_bytes([i])) for i in range(tok.n_ranks)]
    if len(set(names)) != len(names):
        raise ValueError("two merges of this tokenizer make the same bytes; tokenizer.json maps each byte "
                         "string to one id, so it cannot hold this tokenizer")
    specials = [{"id": tok.special(s), "content": s, "single_word": False, "lstrip": False, "rstrip": False,
                 "normalized": False, "special": True} for s in bpe.SPECIAL_TOKENS]
    bos, seq = {"SpecialToken": {"id": "<|bos|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": specials, "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": tok.pattern}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
        "post_processor": {"type": "TemplateProcessing", "single": [bos, seq],
                           "pair": [bos, seq, {"Sequence": {"id": "B", "type_id": 1}}],
                           "special_tokens": {"<|bos|>": {"id": "<|bos|>", "ids": [tok.bos_id], "tokens": ["<|bos|>"]}}},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": dict(zip(names, range(tok.n_ranks))),
                  "merges": [[names[a], names[b]] for a, b in tok.merges]}}


def _model_card(model, meta, report, dtype):
    """README.md for the hub: what the model is, how to run it, the report card's numbers."""
    c, n = model.config, model.num_params()["total"]
    lines = ["---", "library_name: transformers", "pipeline_tag: text-generation", "tags: [slimchat, nanochat]", "---",
             f"# slimchat d{c.n_layer} ({meta['stage']}, step {meta['step']})", "",
             f"A {n:,}-parameter {meta['stage']} model of slimchat, a minimal pipeline that trains a chat model from "
             f"scratch (tokenizer, pretraining, mid-training, SFT, RL). transformers' NanoChat architecture: "
             f"{c.n_layer} layers, width {c.n_embd}, "
             f"{c.n_head} heads ({c.n_kv_head} for keys and values), vocabulary {c.vocab_size:,}, "
             f"trained context {c.sequence_len} tokens; weights in {dtype}.", "", "```python",
             "from transformers import AutoModelForCausalLM, AutoTokenizer",
             "tok = AutoTokenizer.from_pretrained(PATH)", "model = AutoModelForCausalLM.from_pretrained(PATH)",
             "ids = tok.apply_chat_template([{'role': 'user', 'content': 'Hi!'}], add_generation_prompt=True, "
             "return_tensors='pt')['input_ids']",
             "print(tok.decode(model.generate(ids, max_new_tokens=64)[0, ids.size(1):], skip_special_tokens=True))",
             "```", "", "Text that looks like a special token (`<|user_end|>`) is plain text to slimchat: pass "
             "`split_special_tokens=True` to `tok.encode` and `sanitize_control_tokens=True` to "
             "`apply_chat_template` for the same ids."]
    evals = (report or {}).get("evals") or {}
    metrics = sorted({k for scores in evals.values() for k, v in scores.items() if isinstance(v, (int, float))})
    if metrics:
        lines += ["", "## Report card", "", "| metric | " + " | ".join(evals) + " |", "|---|" + "---|" * len(evals)]
        lines += [f"| {m} | " + " | ".join(f"{evals[s][m]:.4f}" if isinstance(evals[s].get(m), (int, float)) else "–"
                                           for s in evals) + " |" for m in metrics]
    return "\n".join(lines) + "\n"


def export_hf(model, tok, out_dir, dtype, meta, report=None):
    """
    Write a folder that transformers (5.x) loads as NanoChatForCausalLM with no custom code:
    config.json, model.safetensors (in `dtype`), generation_config.json, tokenizer.json,
    tokenizer_config.json (with the chat template) and README.md (the model card, with the report
    card's numbers when `report` is given). Where the two implementations differ, it maps exactly;
    a float32 export comes back bit for bit through import_hf:
    - names: wte -> model.embed_tokens; blocks.i.attn.c_q/c_k/c_v/c_proj -> model.layers.i.self_attn.
      q/k/v/o_proj; blocks.i.mlp.c_fc/c_proj -> model.layers.i.mlp.fc1/fc2; lm_head -> lm_head. Layouts
      are the same: (out, in), heads of head_dim rows, no biases, untied head.
    - rotary direction: both rotate the pairs (x[i], x[i + D/2]), but in opposite directions, so
      the second half of each head's c_q, c_k rows is negated (_flip_rotary).
    - rotary tables: ours are computed once in fp32 for 10 x sequence_len positions, theirs per
      call in fp32 for any position; both cast to the activations' dtype. Base 10,000 (rope_theta).
      max_position_embeddings is the trained context, sequence_len.
    - RMSNorm eps: F.rms_norm's default is float32's epsilon (also for bf16 inputs, it computes in
      fp32); transformers' default is 1e-6, so rms_norm_eps is written out (config.norm_eps).
    - QK-norm (after the rotary, no weights) and the norm after the embedding: the same on both sides.
    - soft-cap 15·tanh(x/15): ours in fp32, theirs in the weights' dtype (equal in float32 only).
    - stops: <|assistant_end|> and <|bos|> (the Engine's) are eos_token_id; <|bos|> pads.
    The folder is written under a temporary name and renamed when complete.
    """
    c = model.config
    if os.path.exists(out_dir) and os.listdir(out_dir):
        raise FileExistsError(f"{out_dir} exists and is not empty; choose a new --out or remove it")
    stops = [tok.special("<|assistant_end|>"), tok.bos_id]
    dtype_name = str(dtype).removeprefix("torch.")
    config = {"architectures": ["NanoChatForCausalLM"], "model_type": "nanochat", "vocab_size": c.vocab_size,
              "hidden_size": c.n_embd, "intermediate_size": 4 * c.n_embd, "num_hidden_layers": c.n_layer,
              "num_attention_heads": c.n_head, "num_key_value_heads": c.n_kv_head,
              "max_position_embeddings": c.sequence_len, "hidden_act": "relu2", "rms_norm_eps": c.norm_eps,
              "rope_parameters": {"rope_type": "default", "rope_theta": gpt.ROPE_BASE},
              "final_logit_softcapping": gpt.LOGIT_SOFTCAP, "attention_bias": False, "attention_dropout": 0.0,
              "tie_word_embeddings": False, "bos_token_id": tok.bos_id, "eos_token_id": stops,
              "pad_token_id": tok.bos_id, "dtype": dtype_name, "use_cache": True}
    tok_config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|bos|>", "eos_token": "<|assistant_end|>",
                  "pad_token": "<|bos|>", "clean_up_tokenization_spaces": False,
                  "chat_template": HF_CHAT_TEMPLATE}
    files = {"config.json": config, "tokenizer.json": hf_tokenizer_json(tok), "tokenizer_config.json": tok_config,
             "generation_config.json": {"bos_token_id": tok.bos_id, "eos_token_id": stops, "pad_token_id": tok.bos_id}}
    state = {k.removeprefix("_orig_mod."): v for k, v in model.state_dict().items()}
    head_dim = c.n_embd // c.n_head
    weights = {theirs: (_flip_rotary(state[ours], head_dim) if ours.endswith(("c_q.weight", "c_k.weight"))
                        else state[ours]).to(dtype) for ours, theirs in _hf_names(c.n_layer).items()}
    tmp = f"{out_dir.rstrip(os.sep)}.tmp{os.getpid()}"
    os.makedirs(tmp)
    for name, obj in files.items():
        with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=1, ensure_ascii=False)
    with open(os.path.join(tmp, "README.md"), "w", encoding="utf-8") as f:
        f.write(_model_card(model, meta, report, dtype_name))
    save_safetensors(weights, os.path.join(tmp, "model.safetensors"))
    if os.path.exists(out_dir):
        os.rmdir(out_dir)   # empty, checked above
    os.replace(tmp, out_dir)
    return out_dir


def _bpe_parts(data, ranks):
    """Byte-level BPE of `data` (bytes) with ranks {(a, b): merged id}, lowest merged id first."""
    ids = list(data)
    while len(ids) > 1:
        pair_ranks = [ranks.get(p, math.inf) for p in zip(ids, ids[1:])]
        best = min(pair_ranks)
        if best == math.inf:
            break
        j = pair_ranks.index(best)
        ids[j:j + 2] = [best]
    return ids


def tokenizer_from_hf(path):
    """
    A bpe.Tokenizer from a tokenizer.json, or ValueError saying why it cannot be one. It must be a
    byte-level BPE behind one regex Split, with the 256 bytes as ids 0..255 in byte order, one id per
    merge in merge order, then exactly slimchat's 9 special tokens. Files converted from tiktoken
    (nanochat's published models) list every split of each token; we keep the split that BPE on the
    token's own bytes reaches (what minbpe does for GPT-4), which encodes every vocabulary entry to
    itself, as tiktoken does. tiktoken merges any adjacent pair whose bytes form a token, we merge only
    listed pairs: we know of no ordinary text where the two differ, but it is not proven for all text.
    """
    with open(path, encoding="utf-8") as f:
        state = json.load(f)
    model, pre = state.get("model") or {}, state.get("pre_tokenizer") or {}

    def refuse(why):
        raise ValueError(f"{path}: {why}; slimchat's tokenizer is a byte-level BPE behind a regex split, with "
                         f"ids 0..255 the bytes in order, then one id per merge, then its 9 special tokens")

    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else [pre]
    if model.get("type") != "BPE" or model.get("byte_fallback") or state.get("normalizer"):
        refuse(f"the model is {model.get('type')!r} (byte_fallback {model.get('byte_fallback')}, "
               f"normalizer {state.get('normalizer')})")
    if (len(steps) != 2 or steps[0].get("type") != "Split" or "Regex" not in steps[0].get("pattern", {})
            or steps[0].get("behavior") != "Isolated" or steps[0].get("invert")
            or steps[1].get("type") != "ByteLevel" or steps[1].get("use_regex") or steps[1].get("add_prefix_space")):
        refuse(f"its pre-tokenizer is not a regex Split then a plain ByteLevel: {json.dumps(pre)[:200]}")
    unchar = {ch: b for b, ch in enumerate(_byte_chars())}
    vocab = model.get("vocab") or {}
    token_bytes = [None] * len(vocab)
    for name, i in vocab.items():
        if not 0 <= i < len(vocab) or token_bytes[i] is not None or any(ch not in unchar for ch in name):
            refuse(f"vocab entry {name!r} -> {i} is not a byte-level token with a unique id below {len(vocab)}")
        token_bytes[i] = bytes(unchar[ch] for ch in name)
    if token_bytes[:256] != [bytes([b]) for b in range(256)]:
        refuse("ids 0..255 are not the 256 bytes in byte order")
    ranks, order = {}, []   # (a, b) -> merged id; merged ids in the order the file lists their merges
    candidates = {}
    for pair in model.get("merges", []):
        a, b = pair.split(" ") if isinstance(pair, str) else pair
        if a in vocab and b in vocab and a + b in vocab:
            candidates.setdefault(vocab[a + b], []).append((vocab[a], vocab[b]))
            order.append(vocab[a + b])
    for i in range(256, len(vocab)):
        pairs = candidates.get(i, [])
        parts = pairs[0] if len(pairs) == 1 else tuple(_bpe_parts(token_bytes[i], ranks))
        if len(parts) != 2 or token_bytes[parts[0]] + token_bytes[parts[1]] != token_bytes[i]:
            refuse(f"token {i} ({token_bytes[i]!r}) is not made by one merge of two earlier tokens")
        ranks[parts] = i
    first = list(dict.fromkeys(order))   # each merged id where the file first lists a merge for it
    if first != sorted(first):
        refuse("its merges are not listed in the order of the ids they make (the order both sides merge in)")
    specials = [(t["id"], t["content"]) for t in state.get("added_tokens", [])]
    if specials != [(len(vocab) + k, s) for k, s in enumerate(bpe.SPECIAL_TOKENS)]:
        refuse(f"its added tokens are {[s for _, s in specials][:12]}, not slimchat's {bpe.SPECIAL_TOKENS} after the vocab")
    try:
        return bpe.Tokenizer(sorted(ranks, key=ranks.get), steps[0]["pattern"]["Regex"])
    except regex.error as e:
        refuse(f"its split pattern does not compile with the regex package: {e}")


def import_hf(src):
    """(model in fp32 on the cpu, tokenizer) from a transformers NanoChat folder (export_hf's, or one
    from the hub); ValueError naming the reason for anything slimchat's model cannot be."""
    path = os.path.join(src, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no config.json in {src}: not a Hugging Face model folder")
    with open(path, encoding="utf-8") as f:
        c = json.load(f)
    if c.get("model_type") != "nanochat":
        raise ValueError(f"{src} holds a {c.get('model_type')!r} model {c.get('architectures')}; only transformers' "
                         f"NanoChat (NanoChatForCausalLM) has slimchat's architecture")
    heads = c.get("num_attention_heads", 6)
    head_dim = c["hidden_size"] // heads
    rope = c.get("rope_parameters") or {"rope_type": "default", "rope_theta": c.get("rope_theta", 10000.0)}
    for name, have, ours in [("hidden_act", c.get("hidden_act", "relu2"), "relu2"),
                             ("attention_bias", c.get("attention_bias", False), False),
                             ("final_logit_softcapping", c.get("final_logit_softcapping", 15.0), gpt.LOGIT_SOFTCAP),
                             ("rope_type", rope.get("rope_type"), "default"), ("rope_theta", rope.get("rope_theta"), gpt.ROPE_BASE),
                             ("intermediate_size", c.get("intermediate_size"), 4 * c["hidden_size"]),
                             ("head_dim", c.get("head_dim") or head_dim, head_dim)]:
        if have != ours:
            raise ValueError(f"{src}: {name}={have!r}, where slimchat's model has {ours!r} (gpt.py); "
                             f"this model cannot be represented")
    config = gpt.GPTConfig(sequence_len=c.get("max_position_embeddings", 2048), vocab_size=c["vocab_size"],
                       n_layer=c["num_hidden_layers"], n_head=heads, n_kv_head=c.get("num_key_value_heads") or heads,
                       n_embd=c["hidden_size"], norm_eps=c.get("rms_norm_eps", 1e-6))
    if not os.path.isfile(os.path.join(src, "tokenizer.json")):
        raise FileNotFoundError(f"no tokenizer.json in {src}: import reads the tokenizer in the `tokenizers` format")
    tok = tokenizer_from_hf(os.path.join(src, "tokenizer.json"))
    if tok.vocab_size > config.vocab_size:
        raise ValueError(f"{src}: the tokenizer has {tok.vocab_size} ids but the model only {config.vocab_size}")
    index = os.path.join(src, "model.safetensors.index.json")
    files = ["model.safetensors"]
    if os.path.exists(index):
        with open(index, encoding="utf-8") as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    state = {}
    for name in files:
        if not os.path.exists(os.path.join(src, name)):
            raise FileNotFoundError(f"no {name} in {src} (only safetensors weights are read)")
        state.update(load_safetensors(os.path.join(src, name)))
    if c.get("tie_word_embeddings") and "lm_head.weight" not in state:
        state["lm_head.weight"] = state.get("model.embed_tokens.weight")
    names = _hf_names(config.n_layer)
    missing, extra = set(names.values()) - set(state), set(state) - set(names.values())
    if missing or extra:
        raise ValueError(f"{src}: weights missing {sorted(missing)[:4]}, unexpected {sorted(extra)[:4]}")
    model = gpt.new_model(config, "cpu", torch.float32)
    ours = {k: (_flip_rotary(state[v], head_dim) if k.endswith(("c_q.weight", "c_k.weight")) else state[v]).float()
            for k, v in names.items()}
    try:
        model.load_state_dict(ours)
    except RuntimeError as e:
        raise ValueError(f"{src}: weights do not fit {config}: {e}") from None
    return model, tok


USAGE = ("usage: python hf.py export [--stage=sft] [--step=N] [--tag=d20] --out=DIR [--dtype=bfloat16|float32]\n"
         "       python hf.py import --from=DIR [--stage=sft|base] [--tag=NAME]")


def main(argv):
    """The CLI: export or import, with its knobs as --name=value."""
    command = argv[0] if argv else ""
    if command in ("-h", "--help"):
        print(__doc__.strip() + "\n\n" + USAGE)
        return
    try:
        if command == "export":
            knobs = gpt.apply_overrides({"stage": "sft", "step": -1, "tag": "", "out": "", "dtype": "bfloat16"}, argv[1:])
            if not knobs["out"] or knobs["dtype"] not in ("bfloat16", "float32"):
                sys.exit("export needs --out=DIR, and --dtype is bfloat16 or float32\n" + USAGE)
            tokenizer = gpt.load_tokenizer()
            model, meta, _ = gpt.load_checkpoint(knobs["stage"], "cpu", step=None if knobs["step"] < 0 else knobs["step"],
                                                 tag=knobs["tag"] or None, tokenizer=tokenizer, dtype=torch.float32)
            report_path = os.path.join(gpt.home(), "report", "report.json")
            report = json.load(open(report_path, encoding="utf-8")) if os.path.exists(report_path) else None
            export_hf(model, tokenizer, knobs["out"], getattr(torch, knobs["dtype"]), meta, report)
            print(f"wrote {knobs['out']}: {knobs['stage']} step {meta['step']} as transformers' NanoChatForCausalLM "
                  f"({knobs['dtype']}{', with the report card' if report else ''})")
        elif command == "import":
            knobs = gpt.apply_overrides({"from": "", "stage": "sft", "tag": ""}, argv[1:])
            if not knobs["from"] or knobs["stage"] not in ("base", "sft"):
                sys.exit("import needs --from=DIR, and --stage is base or sft\n" + USAGE)
            model, tokenizer = import_hf(knobs["from"])
            tok_path = os.path.join(gpt.home(), "tokenizer", "tokenizer.json")
            if os.path.exists(tok_path) and bpe.Tokenizer.load(tok_path).fingerprint() != tokenizer.fingerprint():
                sys.exit(f"{tok_path} holds a different tokenizer, which this home's checkpoints need; import into "
                         f"a fresh home (SLIMCHAT_HOME=DIR python hf.py import ...) or move it away")
            tag = knobs["tag"] or f"d{model.config.n_layer}"
            if gpt.latest_step(knobs["stage"], tag) is not None:
                sys.exit(f"checkpoints/{knobs['stage']}/{tag} under {gpt.home()} already holds checkpoints; pass --tag=NAME")
            tokenizer.save(tok_path)
            ckpt_dir = gpt.save_checkpoint(knobs["stage"], 0, model, {"tokenizer": tokenizer.fingerprint(),
                                           "imported_from": os.path.abspath(knobs["from"])}, tag=tag)
            print(f"imported {knobs['from']} ({model.num_params()['total']:,} params) as {ckpt_dir} step 0, "
                  f"tokenizer {tok_path} (vocab {tokenizer.vocab_size:,})")
        else:
            sys.exit(USAGE)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        sys.exit(f"{command}: {e}")


if __name__ == "__main__":
    main(sys.argv[1:])
