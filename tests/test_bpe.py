"""
Tests for bpe.py: worked examples, parity with deliberately slow references (encoder and trainer,
ties included), round trips on adversarial text, chat rendering and masks, persistence, the CLI.
"""
import json
import os
import pickle
import random
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import regex

import bpe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# a training text with prose, code, digits and a few scripts, so merges cover several byte ranges
CORPUS = ("The quick brown fox jumps over the lazy dog. It's 2026; we've got 1234567 reasons.\n"
          "def add(a, b):\r\n    return a + b  # sum\n\n"
          "東京は日本の首都です。Привет, мир! مرحبا بالعالم 🙂🙃 naïve café\t\t1,000,000\n") * 20


@pytest.fixture(scope="module")
def tok():
    return bpe.Tokenizer.train([CORPUS], vocab_size=256 + 9 + 200)


def naive_encode(tok, text):
    """Reference encoder: split, then apply every merge in rank order to each chunk."""
    out = []
    for chunk in regex.findall(bpe.SPLIT_PATTERN, text):
        ids = list(chunk.encode("utf-8"))
        for i, pair in enumerate(tok.merges):
            ids = bpe.merge(ids, pair, 256 + i)
        out += ids
    return out


def slow_train(texts, num_merges):
    """Reference trainer: recount all pairs over every chunk occurrence after each merge;
    the highest count wins, the smallest pair (a, b) on ties."""
    words = [list(c.encode("utf-8")) for t in texts for c in regex.findall(bpe.SPLIT_PATTERN, t)]
    merges = []
    for k in range(num_merges):
        counts = {}
        for w in words:
            bpe.pair_counts(w, counts)
        if not counts:
            break
        pair = min(counts, key=lambda p: (-counts[p], p))
        merges.append(pair)
        words = [bpe.merge(w, pair, 256 + k) for w in words]
    return merges


def random_text(rng, n):
    pools = ["abcab", "ab ab", " \t", "\r", "\r\n", "\n\n", "0123456789", "éüñ", "e\u0301a\u0308",
             "東京日本語", "한국어", "🙂🚀", "👩\u200d💻", "      ", "<|bos|>", "'s 've", "!?.,;"]
    return "".join(rng.choice(pools) if rng.random() < 0.5 else rng.choice(rng.choice(pools))
                   for _ in range(n))


def test_merge_replaces_every_occurrence():
    assert bpe.merge([7, 8, 9, 7, 8], (7, 8), 300) == [300, 9, 300]
    assert bpe.merge([5, 5, 5], (5, 5), 256) == [256, 5]


def test_hand_checked_merge_sequence():
    """aaabdaaabac: aa (4) first; then (256,a) and (a,b) tie at 2 and the smaller pair (97,98)
    wins; then (256,257) at 2."""
    tok = bpe.Tokenizer.train(["aaabdaaabac"], vocab_size=256 + 9 + 3)
    assert tok.merges == [(97, 97), (97, 98), (256, 257)]
    assert tok.encode("aaabdaaabac") == [258, 100, 258, 97, 99]
    assert tok.vocab_size == 268 and tok.bos_id == 259


def test_fast_trainer_equals_slow_reference():
    """Small alphabets make many ties, so this checks the tie-break as much as the counts."""
    rng = random.Random(0)
    for trial in range(6):
        texts = [random_text(rng, rng.randint(5, 60)) for _ in range(rng.randint(1, 12))]
        texts.append("".join(rng.choice("ab c") for _ in range(200)))
        num = rng.randint(1, 60)
        fast = bpe.Tokenizer.train(texts, 256 + 9 + num).merges
        assert fast == slow_train(texts, num), f"trial {trial}"


def test_fast_trainer_handles_runs_of_one_byte():
    """Runs like "aaaaa" and "abab" are where incremental pair updates go wrong: overlapping
    occurrences of (a, a) and neighbours that are themselves merged in the same step."""
    texts = ["aaaaa aaaa aaa aa a", "abababab abab aba", "      x\n\n\n\n", "0000000 1111 00"]
    assert bpe.Tokenizer.train(texts, 256 + 9 + 40).merges == slow_train(texts, 40)


def test_parallel_counting_gives_the_same_vocabulary():
    texts = [CORPUS[i:i + 300] for i in range(0, len(CORPUS), 300)]
    assert bpe.Tokenizer.train(texts, 400, workers=2).merges == bpe.Tokenizer.train(texts, 400).merges


def test_training_stops_early_when_pairs_run_out():
    tok = bpe.Tokenizer.train(["ab"], vocab_size=1000)
    assert tok.merges == [(97, 98)] and tok.vocab_size == 256 + 1 + 9


def test_train_rejects_bad_arguments():
    with pytest.raises(ValueError, match="not one text"):
        bpe.Tokenizer.train("one text", 300)
    with pytest.raises(ValueError, match="vocab_size"):
        bpe.Tokenizer.train(["abc"], 100)


def test_ids_equal_naive_encoder(tok):
    rng = random.Random(1)
    for _ in range(40):
        text = random_text(rng, 40)
        assert tok.encode(text) == naive_encode(tok, text)
    assert tok.encode(CORPUS[:500]) == naive_encode(tok, CORPUS[:500])


def test_round_trip_adversarial(tok):
    rng = random.Random(2)
    cases = ["", " ", "\r", "a\rb", "\r\r\n", " " * 1000, "7" * 999, "1 22 333 4444",
             "e\u0301\u0302\u0303", "👨‍👩‍👧‍👦🏳️‍🌈", "中文字符测试", "\x00\x7f\u200b\ufeff", "<|assistant_end|>"]
    cases += [random_text(rng, 80) for _ in range(30)]
    cases += ["".join(chr(rng.choice([rng.randint(0, 0xD7FF), rng.randint(0xE000, 0x10FFFF)]))
                      for _ in range(50)) for _ in range(20)]
    for text in cases:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert all(0 <= i < tok.n_ranks for i in ids)


def test_lone_surrogate_is_refused_clearly(tok):
    with pytest.raises(ValueError, match="surrogate"):
        tok.encode("ok \ud800 not ok")
    with pytest.raises(ValueError, match="surrogate"):
        tok.render_conversation([{"role": "user", "content": "x\udfff"}])


def test_special_token_text_is_plain_text(tok):
    """A user typing <|assistant_start|> must never produce the special id."""
    text = "".join(bpe.SPECIAL_TOKENS)
    assert max(tok.encode(text)) < tok.n_ranks
    ids, _ = tok.render_conversation([{"role": "user", "content": text}, {"role": "assistant", "content": text}])
    specials = [i for i in ids if i >= tok.n_ranks]
    assert specials == [tok.bos_id] + [tok.special(n) for n in
                                       ("<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>")]


def test_special_ids_and_unknown_name(tok):
    assert [tok.special(n) for n in bpe.SPECIAL_TOKENS] == list(range(tok.n_ranks, tok.vocab_size))
    assert tok.bos_id == tok.special("<|bos|>")
    with pytest.raises(ValueError, match="unknown special token"):
        tok.special("<|eos|>")


def test_masks_exactly_as_specified(tok):
    s, e = tok.special, tok.encode
    conv = {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": [{"type": "text", "text": "Let me check."},
                                          {"type": "python", "text": "2+2"},
                                          {"type": "python_output", "text": "4"},
                                          {"type": "text", "text": "It is 4."}]},
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": "Welcome"}]}
    pieces = [([tok.bos_id], 0),
              ([s("<|user_start|>")] + e("Be brief.\n\nWhat is 2+2?") + [s("<|user_end|>")], 0),
              ([s("<|assistant_start|>")], 0), (e("Let me check."), 1),
              ([s("<|python_start|>")] + e("2+2") + [s("<|python_end|>")], 1),
              ([s("<|output_start|>")] + e("4") + [s("<|output_end|>")], 0),
              (e("It is 4."), 1), ([s("<|assistant_end|>")], 1),
              ([s("<|user_start|>")] + e("Thanks") + [s("<|user_end|>")], 0),
              ([s("<|assistant_start|>")], 0), (e("Welcome") + [s("<|assistant_end|>")], 1)]
    ids, mask = tok.render_conversation(conv)
    assert ids == [i for p, _ in pieces for i in p]
    assert mask == [m for p, m in pieces for _ in p]
    assert tok.render_conversation(conv["messages"]) == (ids, mask)  # a bare list works too


def test_visualize_shows_every_token_with_its_mask(tok):
    ids, mask = tok.render_conversation([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}])
    shown = tok.visualize(ids, mask)
    assert regex.sub(r"\033\[\d+m", "", shown).replace("|", "") == tok.decode(ids).replace("|", "")
    assert shown.count("\033[92m") == sum(mask)


def test_truncation_keeps_whole_turns(tok):
    """Cutting inside a turn would leave a special-token pair open; we cut back to a turn end."""
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there, friend"},
            {"role": "user", "content": "bye"}, {"role": "assistant", "content": "see you"}]
    full, _ = tok.render_conversation(conv)
    first_end = full.index(tok.special("<|assistant_end|>")) + 1
    for limit in range(1, len(full) + 1):
        ids, mask = tok.render_conversation(conv, max_tokens=limit)
        assert len(ids) == len(mask) <= limit and ids == full[:len(ids)]
        assert ids[-1] in (tok.bos_id, tok.special("<|user_end|>"), tok.special("<|assistant_end|>"))
        if limit >= first_end:
            assert len(ids) >= first_end
    assert tok.render_conversation(conv, max_tokens=len(full))[0] == full


def test_render_for_completion(tok):
    conv = [{"role": "system", "content": "sys"}, {"role": "user", "content": "q"},
            {"role": "assistant", "content": "a"}]
    prompt = tok.render_for_completion(conv)
    ids, _ = tok.render_conversation(conv[:2])
    assert prompt == ids + [tok.special("<|assistant_start|>")]
    assert tok.render_for_completion(conv[:2]) == prompt


@pytest.mark.parametrize("conv, message", [
    ([], "non-empty"), ({"messages": []}, "non-empty"),
    ([{"role": "assistant", "content": "x"}], "alternate"),
    ([{"role": "user", "content": "x"}, {"role": "user", "content": "y"}], "alternate"),
    ([{"role": "system", "content": "x"}, {"role": "assistant", "content": "y"}], "system"),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "content": [{"type": "image", "text": "y"}]}], "unknown part"),
    ([{"role": "user", "content": ["x"]}], "must be a str"),
    ([{"role": "user"}], "'role' and 'content'"),
])
def test_malformed_conversations_raise(tok, conv, message):
    with pytest.raises(ValueError, match=message):
        tok.render_conversation(conv)


def test_save_load_round_trip(tok, tmp_path):
    path = tmp_path / "tok" / "tokenizer.json"
    tok.save(str(path))
    loaded = bpe.Tokenizer.load(str(path))
    assert loaded.merges == tok.merges and loaded.fingerprint() == tok.fingerprint()
    assert loaded.encode(CORPUS) == tok.encode(CORPUS)
    assert loaded.mergeable_ranks() == tok.mergeable_ranks()
    assert bpe.Tokenizer.train(["abab"], 266).fingerprint() != tok.fingerprint()


def test_load_rejects_corrupt_and_foreign_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "slimchat-bpe", "vers')
    with pytest.raises(ValueError, match="cannot read"):
        bpe.Tokenizer.load(str(bad))
    bad.write_text(json.dumps({"model": {"type": "BPE"}}))
    with pytest.raises(ValueError, match="not a slimchat tokenizer"):
        bpe.Tokenizer.load(str(bad))
    bad.write_text(json.dumps({"format": "slimchat-bpe", "version": 1, "pattern": "x",
                               "special_tokens": bpe.SPECIAL_TOKENS, "merges": [[1, 999]]}))
    with pytest.raises(ValueError, match="unknown id"):
        bpe.Tokenizer.load(str(bad))


def test_streaming_decode_of_split_multibyte_chars():
    """With no merges every byte is a token, so each 2-4 byte character arrives in pieces."""
    tok = bpe.Tokenizer([])
    text = "añ東🙂e\u0301!"
    sd = tok.stream_decoder()
    pieces = [sd.push(i) for i in tok.encode(text)] + [sd.flush()]
    assert "".join(pieces) == text and "\ufffd" not in "".join(pieces)
    assert pieces[:3] == ["a", "", "ñ"]
    sd = tok.stream_decoder()
    assert sd.push(0xE6) == "" and sd.flush() == "\ufffd"  # a dangling half character is flagged at the end


def test_token_bytes_are_raw_lengths(tok):
    lengths = tok.token_bytes()
    assert lengths.dtype == np.int32 and lengths.shape == (tok.vocab_size,)
    assert all(lengths[i] == len(tok.decode_bytes([i])) for i in range(tok.n_ranks))
    assert not lengths[tok.n_ranks:].any()
    assert tok.mergeable_ranks()[b"a"] == 97


def test_decode_rejects_bad_ids(tok):
    with pytest.raises(ValueError, match="invalid token id"):
        tok.decode([1, tok.vocab_size])
    with pytest.raises(ValueError, match="invalid token id"):
        tok.decode([-1])


def test_encode_batch_with_workers(tok):
    texts = [CORPUS[i:i + 97] for i in range(0, 2000, 97)]
    try:
        assert tok.encode_batch(texts, workers=2) == [tok.encode(t) for t in texts] == tok.encode_batch(texts)
        assert tok.encode_batch(texts[:3], workers=2) == tok.encode_batch(texts[:3])  # the pool is reused
    finally:
        tok.close()


def test_pickles_as_its_merges(tok):
    """Data loaders may ship the tokenizer to worker processes."""
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.merges == tok.merges and clone.encode(CORPUS[:300]) == tok.encode(CORPUS[:300])


def write_shard(path, docs):
    pq.write_table(pa.table({"text": docs}), str(path))


def test_cli_train_and_eval(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    write_shard(data / "shard_00000.parquet", [CORPUS[i:i + 200] for i in range(0, len(CORPUS), 200)])
    write_shard(data / "shard_00001.parquet", ["The cat sat on the mat. " * 20] * 5)
    write_shard(data / "shard_01822.parquet", ["zqzqzqzq " * 200] * 10)  # val: must not be trained on
    env = dict(os.environ, SLIMCHAT_HOME=str(tmp_path))
    run = lambda *args: subprocess.run([sys.executable, "bpe.py", *args], cwd=ROOT, env=env,
                                       capture_output=True, text=True, timeout=120)
    proc = run("train", "--vocab_size=400")
    assert proc.returncode == 0, proc.stderr
    tok = bpe.Tokenizer.load(str(tmp_path / "tokenizer" / "tokenizer.json"))
    assert tok.vocab_size == 400 and (ord("z"), ord("q")) not in tok.merges
    proc = run("eval")
    assert proc.returncode == 0, proc.stderr
    assert "val-shard" in proc.stdout and "russian" in proc.stdout
    proc = run("train", "--vocab=400")
    assert proc.returncode != 0 and "vocab_size" in proc.stderr


def test_max_chars_stops_reading(tmp_path):
    write_shard(tmp_path / "shard_00000.parquet", ["x" * 20_000, "y" * 50, "z" * 50])
    docs = list(bpe.iter_training_text([str(tmp_path / "shard_00000.parquet")], max_chars=10_020))
    assert [len(d) for d in docs] == [10_000, 50]  # cropped to DOC_CAP, then stop once over max_chars
