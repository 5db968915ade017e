"""
Tests of evaluate.py: task rendering and graders on hand-made answers (the code sandbox has its own
file, test_sandbox.py), CORE scoring on a stub model with hand-computed accuracies, bits per byte, the
report card, and the CLI end to end on a tiny model against the offline mirror.
"""
import json
import math
import os
import zipfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import bpe
import evaluate as ev
import gpt


# ---------------------------------------------------------------------------
# a small hand-made hub (file:// endpoint), so every grader sees rows we wrote ourselves

def write_parquet(root, repo, filename, rows):
    path = os.path.join(root, "datasets", repo, "resolve", "main", filename)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    root = tmp_path / "hub"
    monkeypatch.setenv("SLIMCHAT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_ENDPOINT", f"file://{root}")
    monkeypatch.setenv("SLIMCHAT_FILES_ENDPOINT", f"file://{root}/files")
    os.makedirs(root / "files")
    return str(root)


def test_mc_answer_letter_is_one_token():
    """Categorical eval reads one logit per letter, so each answer letter must be a single token,
    and the rendered assistant turn must be exactly that token plus <|assistant_end|>."""
    conversation = ev.mc_conversation("What colour is the sky?", ["red", "blue", "green", "grey", "pink"], 1)
    texts = [ev.render_mc(f"Question {i}?", ["cat", "dog", "fish", "bird", "ant"]) for i in range(30)]
    tok = bpe.Tokenizer.train(texts + ["A B C D E"] * 5, 330)
    assert len(ev.letter_ids(tok, list("ABCDE"))) == 5
    ids, mask = tok.render_conversation(conversation)
    assert [i for i, m in zip(ids, mask) if m] == tok.encode("B") + [tok.special("<|assistant_end|>")]
    assert conversation["messages"][0]["content"].splitlines()[1:4] == ["- red=A", "- blue=B", "- green=C"]


def test_arc_numeric_labels_and_odd_choice_counts():
    """ARC rows labelled 1-4 are shown (and answered) as letters; 3- and 5-choice rows work."""
    row = {"id": "x", "question": "2+2?", "answerKey": "3",
           "choices": {"label": ["1", "2", "3"], "text": ["3", "5", "4"]}}
    conversation = ev.ARC.render(row)
    assert conversation["letters"] == ["A", "B", "C"]
    assert conversation["messages"][1]["content"] == "C"
    five = dict(row, answerKey="E", choices={"label": list("ABCDE"), "text": list("12345")})
    assert ev.ARC.render(five)["letters"] == list("ABCDE")
    with pytest.raises(ValueError, match="answerKey"):
        ev.ARC.render(dict(row, answerKey="9"))


def test_mmlu_and_arc_graders(hub):
    """MMLU and ARC load from the hub and grade the letter only."""
    write_parquet(hub, "cais/mmlu", "all/test-00000-of-00001.parquet",
                  [{"question": f"q{i}", "subject": "s", "choices": ["a", "b", "c", "d"], "answer": i % 4}
                   for i in range(6)])
    write_parquet(hub, "allenai/ai2_arc", "ARC-Easy/test-00000-of-00001.parquet",
                  [{"id": "1", "question": "q", "answerKey": "2",
                    "choices": {"label": ["1", "2", "3", "4"], "text": ["a", "b", "c", "d"]}}])
    mmlu = ev.MMLU("test")
    assert len(mmlu) == 6 and mmlu.eval_type == "categorical"
    for i in range(6):
        conversation = mmlu[i]
        right = conversation["messages"][1]["content"]
        wrong = next(l for l in "ABCD" if l != right)
        assert mmlu.evaluate(conversation, right) and mmlu.evaluate(conversation, f" {right}\n")
        assert not mmlu.evaluate(conversation, wrong)
    arc = ev.ARC("ARC-Easy", "test")
    assert arc.evaluate(arc[0], "B") and not arc.evaluate(arc[0], "A")
    with pytest.raises(ValueError, match="ARC split"):
        ev.ARC("ARC-Easy", "dev")


def test_gsm8k_annotations_become_tool_parts():
    """<<expr=result>> becomes python + python_output parts, split on the last '='."""
    parts = ev.gsm8k_parts("She sold 48/2 = <<48/2=24>>24 clips, then <<a=b=7>>7.\n#### 72")
    assert parts == [{"type": "text", "text": "She sold 48/2 = "},
                     {"type": "python", "text": "48/2"}, {"type": "python_output", "text": "24"},
                     {"type": "text", "text": "24 clips, then "},
                     {"type": "python", "text": "a=b"}, {"type": "python_output", "text": "7"},
                     {"type": "text", "text": "7.\n#### 72"}]
    with pytest.raises(ValueError, match="no '='"):
        ev.gsm8k_parts("bad <<48/2>>")


def test_gsm8k_grader(hub):
    write_parquet(hub, "openai/gsm8k", "main/test-00000-of-00001.parquet",
                  [{"question": "How many?", "answer": "1000+234 = <<1000+234=1234>>1234\n#### 1,234"}])
    task = ev.GSM8K("test")
    conversation = task[0]
    assert conversation["messages"][1]["content"][1] == {"type": "python", "text": "1000+234"}
    assert task.evaluate(conversation, "so 1234 in all.\n#### 1234")
    assert task.evaluate(conversation, "#### 1,234.")
    assert not task.evaluate(conversation, "#### 1233")
    assert not task.evaluate(conversation, "the answer is 1234")


def test_humaneval_grader(hub):
    """The reply's code (inside a ```python block or bare) runs against the dataset's tests."""
    write_parquet(hub, "openai/openai_humaneval", "openai_humaneval/test-00000-of-00001.parquet",
                  [{"task_id": "HumanEval/0", "prompt": "import math\n\ndef add(a, b):\n    \"\"\"Add.\"\"\"\n",
                    "canonical_solution": "    return a + b\n", "entry_point": "add",
                    "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert math.pi > 3\n"}])
    task = ev.HumanEval()
    conversation = task[0]
    assert task.evaluate(conversation, conversation["messages"][1]["content"])
    assert task.evaluate(conversation, "Sure:\n```python\ndef add(a, b):\n    return a + b\n```\nDone.")
    wrong = task.check(conversation, "```python\ndef add(a, b):\n    return a - b\n```")
    assert not wrong.passed and wrong.reason.startswith("error: AssertionError")


def write_words(hub, words):
    with open(os.path.join(hub, "files", "words_alpha.txt"), "w") as f:
        f.write("\n".join(words) + "\n")


def test_spelling_graders(hub):
    """SpellingBee's reference counts right (its calculator step too); SimpleSpelling is exact."""
    write_words(hub, ["strawberry", "banana", "apple", "kiwi"])
    bee = ev.SpellingBee(20, "test")
    for i in range(len(bee)):
        conversation = bee[i]
        parts = conversation["messages"][1]["content"]
        word, letter = parts[1]["text"].split("'")[1], parts[1]["text"].split("'")[3]
        assert parts[2]["text"] == str(word.count(letter)) == gpt.use_calculator(parts[1]["text"])
        assert bee.evaluate(conversation, f"...\n#### {word.count(letter)}")
        assert not bee.evaluate(conversation, f"#### {word.count(letter) + 1}")
    assert bee[3] == ev.SpellingBee(20, "test")[3]          # deterministic
    assert bee[0] != ev.SpellingBee(20, "train")[0] or bee[1] != ev.SpellingBee(20, "train")[1]
    simple = ev.SimpleSpelling(5, "train")
    conversation = simple[0]
    word = conversation["messages"][0]["content"].split(": ")[1]
    assert conversation["messages"][1]["content"] == f"{word}:{','.join(word)}"
    assert simple.evaluate(conversation, f"{word}:{','.join(word)}\n")
    assert not simple.evaluate(conversation, f"{word}:{','.join(word[::-1])}x")


def test_custom_json_names_the_bad_line(tmp_path):
    good = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps({"messages": [{"role": "system", "content": "s"}] + good}) + "\n")
    task = ev.CustomJSON(str(path))
    assert len(task) == 2 and task[0] == {"messages": good}
    path.write_text(json.dumps(good) + "\n\n" + json.dumps(good[::-1]) + "\n")
    with pytest.raises(ValueError, match="line 3: roles must alternate"):
        ev.CustomJSON(str(path))
    path.write_text("{not json\n")
    with pytest.raises(ValueError, match="line 1: not valid JSON"):
        ev.CustomJSON(str(path))


def test_task_mixture_is_deterministic_and_oversamples():
    a, b = ["a0", "a1", "a2"], ["b0"]
    mix = ev.TaskMixture([a, b, b])
    items = [mix[i] for i in range(len(mix))]
    assert sorted(items) == ["a0", "a1", "a2", "b0", "b0"]
    assert items == [ev.TaskMixture([a, b, b])[i] for i in range(5)]


def test_task_first_keeps_the_first_rows_and_the_class():
    class Doubled(ev.Task):
        def render(self, row):
            return 2 * row
    task = Doubled(range(20))
    head = task.first(5)
    assert type(head) is Doubled and len(head) == 5 and len(task) == 20
    assert [head[i] for i in range(5)] == [task[i] for i in range(5)]
    assert len(task.first(100)) == 20


def test_training_tasks_have_no_grader(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]) + "\n")
    task = ev.CustomJSON(str(path))
    with pytest.raises(ValueError, match="training task"):
        task.evaluate(task[0], "yo")


# ---------------------------------------------------------------------------
# CORE and bits per byte on stub models

class CopyModel(torch.nn.Module):
    """Predicts that the next token repeats the current one (logit 10 there, 0 elsewhere)."""
    def __init__(self, vocab_size, sequence_len=64):
        super().__init__()
        self.vocab_size = vocab_size
        self.config = gpt.GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size)
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, idx):
        return 10.0 * torch.nn.functional.one_hot(idx, self.vocab_size).float()   # (B, T, V)


def write_bundle(root, tasks_data, baselines):
    bundle = os.path.join(root, "eval_bundle")
    for filename, items in tasks_data.items():
        os.makedirs(os.path.dirname(os.path.join(bundle, "eval_data", filename)), exist_ok=True)
        with open(os.path.join(bundle, "eval_data", filename), "w") as f:
            f.write("".join(json.dumps(item) + "\n" for item in items))
    with open(os.path.join(bundle, "eval_meta_data.csv"), "w") as f:
        f.write("Eval Task,Task Category,Random baseline\n")
        f.write("".join(f"{label},x,{b}\n" for label, b in baselines.items()))
    return bundle


def test_core_on_a_stub_model_matches_hand_computed_scores(tmp_path):
    """The copy model picks the option whose continuation repeats the token before it. MC: 3 of 4
    right (baseline 25%) -> centered 2/3; schema: 2 of 3 (50%) -> 1/3; LM: 1 of 4 (0%) -> 1/4."""
    letters = ["a", "b", "c", "d"]
    mc = [{"query": "pa", "choices": letters, "gold": 0}, {"query": "pb", "choices": letters, "gold": 1},
          {"query": "pc", "choices": letters, "gold": 2}, {"query": "pd", "choices": letters, "gold": 0}]
    schema = [{"context_options": ["xa", "xb"], "continuation": "aa", "gold": 0},
              {"context_options": ["xa", "xb"], "continuation": "bb", "gold": 1},
              {"context_options": ["xa", "xb"], "continuation": "bb", "gold": 0}]
    lm = [{"context": "qb", "continuation": "bb"}, {"context": "qb", "continuation": "bc"},
          {"context": "qb", "continuation": "cc"}, {"context": "qc", "continuation": "cb"}]
    bundle = write_bundle(tmp_path, {"t/mc.jsonl": mc, "t/schema.jsonl": schema, "t/lm.jsonl": lm},
                          {"mc": 25, "schema": 50, "lm": 0})
    core_tasks = [("mc", "t/mc.jsonl", "multiple_choice", 2, ""), ("schema", "t/schema.jsonl", "schema", 0, ""),
                  ("lm", "t/lm.jsonl", "language_modeling", 1, "")]
    tok = bpe.Tokenizer.train(["x"], 265)            # bytes only: one character = one token
    records = {}
    result = ev.evaluate_core(CopyModel(tok.vocab_size), tok, bundle, core_tasks, records=records)
    got = {label: round(r["centered"], 6) for label, r in result["tasks"].items()}
    assert got == {"mc": round(2 / 3, 6), "schema": round(1 / 3, 6), "lm": 0.25}
    assert result["CORE"] == pytest.approx((2 / 3 + 1 / 3 + 1 / 4) / 3)
    assert sum(r["verdict"] for r in records["mc"]) == 3 and len(records["lm"]) == 4


CORE_RENDER_CASES = [
    # (kind, delimiter, shots, item, expected prompts, expected continuation text of each)
    ("multiple_choice", "\nAnswer: ", [{"query": " Q1?", "choices": ["no ", "yes"], "gold": 0}],
     {"query": "Capital of France? ", "choices": ["Paris", " Lyon "], "gold": 0},
     [" Q1?\nAnswer: no \n\nCapital of France? \nAnswer: Paris",
      " Q1?\nAnswer: no \n\nCapital of France? \nAnswer:  Lyon "], ["Paris", " Lyon "]),
    ("schema", " ", [{"context_options": ["A dog ", "A cat"], "continuation": "barks.", "gold": 0}],
     {"context_options": ["The trophy", " The case"], "continuation": " was too big. ", "gold": 0},
     ["A dog  barks.\n\nThe trophy  was too big. ", "A dog  barks.\n\n The case  was too big. "],
     ["  was too big. ", "  was too big. "]),
    ("language_modeling", " ", [{"context": "  The sky is ", "continuation": "blue"}],
     {"context": "\tGrass is ", "continuation": "green "},
     ["The sky is blue\n\nGrass is", "The sky is blue\n\nGrass is green "], [" green "]),
    ("language_modeling", "\nAnswer: ", [], {"context": "Q: 2+2? ", "continuation": "4"},
     ["Q: 2+2?\nAnswer:", "Q: 2+2?\nAnswer: 4"], [" 4"]),
]


@pytest.mark.parametrize("kind,delimiter,shots,item,prompts,continuations", CORE_RENDER_CASES,
                         ids=[c[0] + repr(c[1]) for c in CORE_RENDER_CASES])
def test_core_prompts_and_spans_match_the_reference(kind, delimiter, shots, item, prompts, continuations):
    """Prompts are rendered as the reference's templates render them (REFERENCE §14.1): data kept as
    it is, except LM contexts, which are stripped at both ends, and the LM prompt without its
    continuation, stripped as a whole. The scored span is what follows the choices' common prefix
    (MC), the options' common suffix (schema) or the stripped prompt (LM)."""
    tok = bpe.Tokenizer.train(["x"], 265)            # bytes only: one character = one token
    assert ev.core_texts(item, shots, kind, delimiter) == prompts
    seqs, spans = ev.core_spans(tok, prompts, kind)
    assert [tok.decode(s[a:b]) for s, (a, b) in zip(seqs, spans)] == continuations
    assert all(s[0] == tok.bos_id and tok.decode(s[1:]) in prompts for s in seqs)


def test_core_lm_continuation_is_one_clean_token_span():
    """With real merges, a context ending in a space must not leave a stray space token: the scored
    span is exactly the tokens of " green", as in the reference (slimchat used to score "  green")."""
    tok = bpe.Tokenizer.train(["Grass is green. The sky is blue. " * 50], 300)
    item = {"context": "Grass is ", "continuation": "green"}
    seqs, spans = ev.core_spans(tok, ev.core_texts(item, [], "language_modeling", " "), "language_modeling")
    (start, end), = spans
    assert seqs[0][start:end] == tok.encode(" green") and len(tok.encode(" green")) == 1


def test_core_bundle_unzips_atomically_and_refuses_escapes(hub, tmp_path, monkeypatch):
    with zipfile.ZipFile(os.path.join(hub, "files", "eval_bundle.zip"), "w") as zf:
        zf.writestr("eval_bundle/eval_meta_data.csv", "Eval Task,Random baseline\ncopa,50\n")
        zf.writestr("eval_bundle/eval_data/x.jsonl", "{}\n")
    bundle = ev.core_bundle()
    assert bundle == os.path.join(str(tmp_path / "home"), "eval_bundle")
    assert ev.core_baselines(bundle) == {"copa": 50.0}
    assert [n for n in os.listdir(tmp_path / "home") if n.startswith(".eval_bundle")] == []
    monkeypatch.setenv("SLIMCHAT_HOME", str(tmp_path / "home2"))
    with zipfile.ZipFile(os.path.join(hub, "files", "eval_bundle.zip"), "w") as zf:
        zf.writestr("eval_bundle/../../escaped.txt", "x")
    with pytest.raises(ValueError, match="outside"):
        ev.core_bundle()
    assert not os.path.exists(tmp_path / "home2" / "eval_bundle")
    assert not os.path.exists(tmp_path / "escaped.txt")


def test_centered_and_chatcore():
    assert ev.centered(0.25, 25) == 0 and ev.centered(1.0, 62) == 1
    accs = {"ARC-Easy": 0.625, "ARC-Challenge": 0.25, "MMLU": 0.25, "GSM8K": 0.5, "HumanEval": 0.0,
            "SpellingBee": 0.1}
    assert ev.chatcore(accs) == pytest.approx((0.5 + 0 + 0 + 0.5 + 0 + 0.1) / 6)
    del accs["HumanEval"]
    assert ev.chatcore(accs) is None


class UniformModel(torch.nn.Module):
    """Equal logits over V tokens: every target costs ln V nats."""
    def __init__(self, vocab_size):
        super().__init__()
        self.vocab_size = vocab_size
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x, y, loss_reduction="none"):
        logits = torch.zeros(*x.shape, self.vocab_size)
        return torch.nn.functional.cross_entropy(logits.transpose(1, 2), y, ignore_index=-1, reduction="none")


def test_bits_per_byte_by_hand():
    """Targets 1 (2 bytes), 2 (3 bytes), 0 (a special: left out), -1 (ignored): 2 counted tokens of
    ln 8 nats = 3 bits each over 5 bytes -> 6/5 bits per byte."""
    token_bytes = torch.tensor([0, 2, 3, 1, 1, 1, 1, 1])
    x = torch.zeros(1, 4, dtype=torch.long)
    y = torch.tensor([[1, 2, 0, -1]])
    bpb = ev.evaluate_bpb(UniformModel(8), iter([(x, y)] * 3), 2, token_bytes)
    assert bpb == pytest.approx(6 / 5)


# ---------------------------------------------------------------------------
# the report card

def fabricate_home(home):
    logs = os.path.join(home, "logs")
    os.makedirs(logs)
    with open(os.path.join(logs, "base.jsonl"), "w") as f:
        for step in range(5):
            f.write(json.dumps({"step": step, "loss": 5.0 - step, "dt": 0.5}) + "\n")
        f.write(json.dumps({"step": 4, "val_bpb": 1.25}) + "\n")
        f.write('{"step": 5, "loss"')                       # torn last line of a killed run
    with open(os.path.join(logs, "eval.jsonl"), "w") as f:
        f.write(json.dumps({"stage": "base", "results": {"CORE": 0.1234}}) + "\n")
        f.write(json.dumps({"stage": "sft", "results": {"MMLU": 0.3, "GSM8K": 0.05}}) + "\n")
        f.write(json.dumps({"stage": "sft", "results": {"GSM8K": 0.07}}) + "\n")
    ckpt = os.path.join(home, "checkpoints", "base", "d2")
    os.makedirs(ckpt)
    with open(os.path.join(ckpt, "meta_000004.json"), "w") as f:
        json.dump({"step": 4, "config": {"depth": 2, "num_steps": 4}}, f)


def test_report_from_fabricated_logs(tmp_path):
    """Missing stages show '–'; later eval runs override earlier ones; curves become SVG files."""
    home = str(tmp_path / "home")
    fabricate_home(home)
    md_path, json_path = ev.write_report(home)
    md = open(md_path).read()
    data = json.load(open(json_path))
    assert "| CORE | 0.1234 | – | – | – |" in md
    assert "| GSM8K | – | – | 0.0700 | – |" in md and "| MMLU | – | – | 0.3000 | – |" in md
    # val_bpb has a single point: no chart; the loss chart is a file beside report.md, linked
    assert "<svg" not in md and "](charts/base_loss.svg)" in md and data["charts"] == {"base": {"loss": "charts/base_loss.svg"}}
    assert "config: depth=2, num_steps=4" in md and "## RL (rl)\n\n–" in md
    base = data["stages"]["base"]
    assert base["train_time_s"] == 2.5 and base["final"]["min_val_bpb"] == 1.25
    assert data["header"]["code"]["files"] > 0 and "mid" not in data["stages"]


def test_report_with_nothing_logged(tmp_path):
    md_path, _ = ev.write_report(str(tmp_path))
    assert "| ChatCORE | – | – | – | – |" in open(md_path).read()


# ---------------------------------------------------------------------------
# end to end on the tiny base model and the mirror (conftest's session fixtures)

from conftest import copy_home, run_script   # noqa: E402  (conftest puts the repo on sys.path)


def test_cli_base_eval_and_report_end_to_end(base_home, mirror, tmp_path):
    """`evaluate.py --stage=base` runs all 22 CORE tasks and bpb on the tiny model, writes records,
    results and the eval log; `--report=1` then puts CORE in the BASE column."""
    home = copy_home(base_home, tmp_path / "home")
    env = dict(mirror["env"], SLIMCHAT_HOME=home)
    run_script(["evaluate.py", "--stage=base", "--device=cpu", "--tasks=CORE,bpb", "--max_per_task=1",
                "--bpb_tokens=2048", "--batch_size=4"], env)
    results = json.load(open(os.path.join(home, "eval", "base", "results.json")))["results"]
    assert len(results["CORE_tasks"]) == 22 and -1 <= results["CORE"] <= 1
    assert 0 < results["val_bpb"] < math.log2(512)      # better than guessing among 512 one-byte tokens
    record = json.loads(open(os.path.join(home, "eval", "base", "copa.jsonl")).readline())
    assert set(record) == {"index", "prompt", "output", "verdict"}
    assert json.loads(open(os.path.join(home, "logs", "eval.jsonl")).readline())["stage"] == "base"
    run_script(["evaluate.py", "--report=1"], env)
    md = open(os.path.join(home, "report", "report.md")).read()
    assert f"| CORE | {results['CORE']:.4f} | – | – | – |" in md
    assert "](charts/base_loss.svg)" in md and "vocab_size: 512" in md
    assert os.path.exists(os.path.join(home, "report", "charts", "base_loss.svg"))
    assert "synthetic offline mirror" in md   # the shards came from tests/tinyworld.py


def test_chat_evals_end_to_end(base_home, mirror, tmp_path, monkeypatch):
    """Every chat task runs through its eval path on a real model (categorical letters, Engine
    generation, the sandbox); batching does not change a categorical answer."""
    for key in ("HF_ENDPOINT", "SLIMCHAT_FILES_ENDPOINT"):
        monkeypatch.setenv(key, mirror["env"][key])
    monkeypatch.setenv("SLIMCHAT_HOME", copy_home(base_home, tmp_path / "home"))
    tok = gpt.load_tokenizer()
    model, _, _ = gpt.load_checkpoint("base", torch.device("cpu"), tokenizer=tok)
    model.eval()
    engine = gpt.Engine(model, tok)
    accuracies = {}
    for name, make in ev.CHAT_TASKS.items():
        records = []
        accuracies[name] = ev.run_chat_eval(make(), model, tok, engine, max_problems=3, batch_size=3,
                                            max_new_tokens=12, records=records)
        assert [r["index"] for r in records] == [0, 1, 2] and 0 <= accuracies[name] <= 1
        if name == "HumanEval":   # each record says why its program passed or failed
            assert all(r["reason"] == "passed" or not r["verdict"] for r in records)
    assert ev.chatcore(accuracies) is not None
    arc = ev.ARC("ARC-Easy", "test")
    one_by_one = [r["output"] for r in ev.categorical_eval(arc, model, tok, list(range(6)), 1)]
    batched = [r["output"] for r in ev.categorical_eval(arc, model, tok, list(range(6)), 6)]
    assert one_by_one == batched


def test_torchrun_splits_examples_across_ranks(base_home, mirror, tmp_path, monkeypatch):
    """Two gloo ranks under torchrun take disjoint shares of the examples, yet report the same
    accuracies and the same per-example records as one process does."""
    home = copy_home(base_home, tmp_path / "home")
    for key in ("HF_ENDPOINT", "SLIMCHAT_FILES_ENDPOINT"):
        monkeypatch.setenv(key, mirror["env"][key])
    monkeypatch.setenv("SLIMCHAT_HOME", home)
    tok = gpt.load_tokenizer()
    model, _, _ = gpt.load_checkpoint("base", torch.device("cpu"), tokenizer=tok)
    model.eval()
    single, records = {}, {}
    for name in ("ARC-Easy", "GSM8K"):
        records[name] = []
        single[name] = ev.run_chat_eval(ev.CHAT_TASKS[name](), model, tok, gpt.Engine(model, tok), 5,
                                        max_new_tokens=8, records=records[name])
    run_script(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "evaluate.py",
                "--stage=base", "--device=cpu", "--tasks=ARC-Easy,GSM8K", "--max_per_task=5",
                "--max_new_tokens=8"], dict(mirror["env"], SLIMCHAT_HOME=home))
    assert json.load(open(os.path.join(home, "eval", "base", "results.json")))["results"] == single
    for name in ("ARC-Easy", "GSM8K"):
        written = [json.loads(line) for line in open(os.path.join(home, "eval", "base", f"{name}.jsonl"))]
        assert written == records[name]
