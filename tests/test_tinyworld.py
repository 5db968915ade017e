"""
Tests for the offline mirror (tests/tinyworld.py): deterministic, in the hub's layout and schemas,
served over loopback HTTP with byte ranges, and with task data that is internally right.
"""
import csv
import filecmp
import io
import json
import os
import re
import subprocess
import sys
import urllib.error
import urllib.request
import zipfile

import pyarrow.parquet as pq
import pytest

import tinyworld

SHARDS = "datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main"


@pytest.fixture(scope="module")
def mirror(tmp_path_factory):
    """One default-sized mirror shared by the read-only tests of this file."""
    return tinyworld.build(str(tmp_path_factory.mktemp("mirror")), seed=0)


def all_files(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def test_same_seed_gives_byte_identical_files(mirror, tmp_path):
    """Tests and runs compare against each other, so a rebuild must not change a single byte."""
    again = tinyworld.build(str(tmp_path / "again"), seed=0)
    assert all_files(again) == all_files(mirror)
    match, mismatch, errors = filecmp.cmpfiles(mirror, again, all_files(mirror), shallow=False)
    assert mismatch == [] and errors == []


def test_other_seed_changes_the_world(mirror, tmp_path):
    other = tinyworld.build(str(tmp_path / "other"), seed=1, num_train_shards=1)
    name = f"{SHARDS}/shard_00000.parquet"
    assert not filecmp.cmp(os.path.join(mirror, name), os.path.join(other, name), shallow=False)


def test_pretraining_shards_are_named_and_shaped_like_the_real_ones(mirror):
    names = sorted(os.listdir(os.path.join(mirror, SHARDS)))
    assert names == [f"shard_{i:05d}.parquet" for i in range(4)] + ["shard_01822.parquet"]
    for name in names:
        f = pq.ParquetFile(os.path.join(mirror, SHARDS, name))
        assert f.schema_arrow.names == ["text"]
        assert str(f.schema_arrow.field("text").type) == "string"
        assert f.metadata.row_group(0).num_rows == 64
        assert f.metadata.row_group(0).column(0).compression == "ZSTD"
    docs = pq.read_table(os.path.join(mirror, SHARDS, "shard_00000.parquet")).column("text").to_pylist()
    assert len(docs) == 1024 and all(docs)


def test_sizes_are_knobs_and_bad_ones_are_rejected(tmp_path):
    out = tinyworld.build(str(tmp_path / "m"), num_train_shards=2, docs_per_shard=100,
                          row_group_size=32)
    f = pq.ParquetFile(os.path.join(out, SHARDS, "shard_00001.parquet"))
    assert f.metadata.num_rows == 100 and f.metadata.num_row_groups == 4
    assert not os.path.exists(os.path.join(out, SHARDS, "shard_00002.parquet"))
    with pytest.raises(ValueError, match="docs_per_shrad"):
        tinyworld.build(str(tmp_path / "x"), docs_per_shrad=3)


def test_the_world_repeats_its_facts_across_documents(mirror):
    """Learnability rests on repetition: each person's home town is stated many times per shard."""
    world = tinyworld.make_world(0, tinyworld.SIZES["num_people"])
    docs = pq.read_table(os.path.join(mirror, SHARDS, "shard_00000.parquet")).column("text").to_pylist()
    text = "\n".join(docs)
    for person in world["people"]:
        assert text.count(f"{person['name']} lives in {person['town']}.") >= 20


def get(url, headers=None, method="GET"):
    """(status, headers, body) of one request; HTTP errors are answers too."""
    req = urllib.request.Request(url, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


@pytest.fixture(scope="module")
def served(mirror):
    server, port = tinyworld.serve(mirror)
    yield f"http://127.0.0.1:{port}"
    server.shutdown()
    server.server_close()


def test_served_mirror_answers_range_requests(mirror, served):
    """gpt.download resumes partial files with Range: the mirror must honour it exactly."""
    data = open(os.path.join(mirror, SHARDS, "shard_00001.parquet"), "rb").read()
    url = f"{served}/{SHARDS}/shard_00001.parquet"
    status, headers, body = get(url)
    assert status == 200 and body == data and int(headers["Content-Length"]) == len(data)
    status, headers, body = get(url, {"Range": "bytes=100-"})
    assert status == 206 and body == data[100:]
    assert headers["Content-Range"] == f"bytes 100-{len(data) - 1}/{len(data)}"
    assert int(headers["Content-Length"]) == len(data) - 100
    status, headers, body = get(url, {"Range": "bytes=10-19"})
    assert (status, body, headers["Content-Range"]) == (206, data[10:20], f"bytes 10-19/{len(data)}")
    status, headers, body = get(url, {"Range": f"bytes={len(data)}-"})
    assert status == 416 and headers["Content-Range"] == f"bytes */{len(data)}"


def test_served_mirror_head_and_missing_files(mirror, served):
    size = os.path.getsize(os.path.join(mirror, SHARDS, "shard_01822.parquet"))
    status, headers, body = get(f"{served}/{SHARDS}/shard_01822.parquet", method="HEAD")
    assert (status, int(headers["Content-Length"]), body) == (200, size, b"")
    assert get(f"{served}/{SHARDS}/shard_09999.parquet")[0] == 404
    assert get(f"{served}/../../etc/passwd")[0] == 404


def test_command_line_builds_the_same_files_in_another_process(mirror, tmp_path):
    """A fresh interpreter with another hash seed (set order!) must write the same bytes; the task
    files have their own random streams, so a smaller pretraining part leaves them unchanged."""
    script = os.path.join(os.path.dirname(__file__), "tinyworld.py")
    out = str(tmp_path / "cli")
    proc = subprocess.run([sys.executable, script, f"--out={out}", "--num_train_shards=1", "--docs_per_shard=64"],
                          capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONHASHSEED": "123"})
    assert proc.returncode == 0, proc.stderr
    same = [f for f in all_files(mirror) if "fineweb" not in f]
    assert all_files(out) == sorted(same + [f"{SHARDS}/shard_00000.parquet", f"{SHARDS}/shard_01822.parquet"])
    match, mismatch, errors = filecmp.cmpfiles(mirror, out, same + [f"{SHARDS}/shard_01822.parquet"], shallow=False)
    assert mismatch == [] and errors == []


def test_command_line_rejects_unknown_options(tmp_path):
    script = os.path.join(os.path.dirname(__file__), "tinyworld.py")
    proc = subprocess.run([sys.executable, script, f"--out={tmp_path}", "--shards=2"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "unknown option --shards" in proc.stderr


# --- task files (issue 5) -----------------------------------------------------------------------

def hub_table(mirror, repo, filename):
    return pq.read_table(os.path.join(mirror, "datasets", repo, "resolve", "main", filename))


HUB_SCHEMAS = {   # REFERENCE.md §17: every file the code fetches, with its columns
    ("cais/mmlu", "all/{}-00000-of-00001.parquet", ("test", "validation", "dev", "auxiliary_train")):
        ["question", "subject", "choices", "answer"],
    ("allenai/ai2_arc", "ARC-Easy/{}-00000-of-00001.parquet", ("train", "validation", "test")):
        ["id", "question", "choices", "answerKey"],
    ("allenai/ai2_arc", "ARC-Challenge/{}-00000-of-00001.parquet", ("train", "validation", "test")):
        ["id", "question", "choices", "answerKey"],
    ("openai/gsm8k", "main/{}-00000-of-00001.parquet", ("train", "test")): ["question", "answer"],
    ("openai/openai_humaneval", "openai_humaneval/{}-00000-of-00001.parquet", ("test",)):
        ["task_id", "prompt", "canonical_solution", "test", "entry_point"],
    ("HuggingFaceTB/smol-smoltalk", "data/{}-00000-of-00001.parquet", ("train", "test")):
        ["messages", "source"],
}


def test_every_hub_file_opens_with_the_real_columns(mirror):
    for (repo, pattern, splits), columns in HUB_SCHEMAS.items():
        for split in splits:
            table = hub_table(mirror, repo, pattern.format(split))
            assert table.column_names == columns, (repo, split)
            assert 0 < table.num_rows <= 2000, (repo, split, table.num_rows)


def test_mmlu_rows_have_four_choices_and_an_int_answer(mirror):
    for split in ["test", "auxiliary_train"]:
        table = hub_table(mirror, "cais/mmlu", f"all/{split}-00000-of-00001.parquet")
        assert str(table.schema.field("answer").type) == "int64"
        for row in table.to_pylist():
            assert len(row["choices"]) == 4 and len(set(row["choices"])) == 4
            assert 0 <= row["answer"] < 4
    assert hub_table(mirror, "cais/mmlu", "all/auxiliary_train-00000-of-00001.parquet").num_rows == 1500


def test_mmlu_answers_agree_with_the_world(mirror):
    """Learnable means true: the marked answer to 'Where does X live?' is X's town in the world."""
    world = tinyworld.make_world(0, tinyworld.SIZES["num_people"])
    checked = 0
    for row in hub_table(mirror, "cais/mmlu", "all/test-00000-of-00001.parquet").to_pylist():
        if row["question"].startswith("Where does "):
            name = row["question"][len("Where does "):-len(" live?")]
            assert row["choices"][row["answer"]] == world["by_name"][name]["town"]
            checked += 1
    assert checked > 5


def test_arc_has_numeric_labels_and_three_and_five_choice_rows(mirror):
    """Like the real ARC, which trips up code that assumes labels A-D and four choices."""
    rows = []
    for subset in ["ARC-Easy", "ARC-Challenge"]:
        rows += hub_table(mirror, "allenai/ai2_arc", f"{subset}/train-00000-of-00001.parquet").to_pylist()
    for row in rows:
        assert row["answerKey"] in row["choices"]["label"]
        assert len(row["choices"]["label"]) == len(row["choices"]["text"])
    assert any(row["choices"]["label"][0] == "1" for row in rows)
    assert {len(row["choices"]["label"]) for row in rows} == {3, 4, 5}
    assert len({row["id"] for row in rows}) == len(rows)


def test_gsm8k_annotations_are_right_and_answers_end_with_the_result(mirror):
    for split in ["train", "test"]:
        for row in hub_table(mirror, "openai/gsm8k", f"main/{split}-00000-of-00001.parquet").to_pylist():
            *steps, last = row["answer"].split("\n")
            assert re.fullmatch(r"#### -?\d+", last), last
            annotations = re.findall(r"<<([^=<>]+)=([^<>]+)>>", row["answer"])
            assert annotations and len(annotations) == len(steps)
            for expr, result in annotations:
                assert re.fullmatch(r"\d+[-+*/]\d+", expr)
                assert eval(expr) == float(result), (expr, result)    # our own digits-and-operator strings
            assert annotations[-1][1] == last[len("#### "):]


def test_humaneval_canonical_solutions_pass_their_own_tests(mirror, tmp_path):
    """Run every problem the way the HumanEval grader does: prompt + solution + test + check()."""
    rows = hub_table(mirror, "openai/openai_humaneval", "openai_humaneval/test-00000-of-00001.parquet").to_pylist()
    assert len({row["task_id"] for row in rows}) == len(rows) == 40
    program = ""
    for i, row in enumerate(rows):
        assert row["test"].lstrip().startswith("METADATA") and "def check(candidate):" in row["test"]
        code = row["prompt"] + row["canonical_solution"] + row["test"] + f"\ncheck({row['entry_point']})\n"
        program += f"exec(compile({code!r}, {row['task_id']!r}, 'exec'), {{}})\n"
        wrong = row["prompt"] + "    return None\n" + row["test"] + f"\ncheck({row['entry_point']})\n"
        program += f"try:\n    exec({wrong!r}, {{}})\n    raise SystemExit('wrong solution passed {i}')\n" \
                   f"except AssertionError:\n    pass\n"
    path = tmp_path / "run.py"
    path.write_text(program)
    proc = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_smoltalk_messages_alternate_with_an_optional_system_first(mirror):
    rows = hub_table(mirror, "HuggingFaceTB/smol-smoltalk", "data/train-00000-of-00001.parquet").to_pylist()
    systems = 0
    for row in rows:
        messages = row["messages"]
        if messages[0]["role"] == "system":
            systems += 1
            messages = messages[1:]
        assert [m["role"] for m in messages] == ["user", "assistant"] * (len(messages) // 2)
        assert all(m["content"] for m in messages) and row["source"]
    assert 0 < systems < len(rows)


def test_identity_conversations_and_word_list(mirror):
    lines = open(os.path.join(mirror, "files", "identity_conversations.jsonl")).read().splitlines()
    assert len(lines) == 100
    for line in lines:
        messages = json.loads(line)
        assert [m["role"] for m in messages] == ["user", "assistant"] * (len(messages) // 2)
        assert "slimchat" in " ".join(m["content"] for m in messages)
    words = open(os.path.join(mirror, "files", "words_alpha.txt")).read().split("\n")
    assert words[-1] == "" and len(words[:-1]) == 2000
    assert all(re.fullmatch(r"[a-z]+", w) for w in words[:-1]) and words[:-1] == sorted(set(words[:-1]))


def test_eval_bundle_has_the_real_layout_and_all_22_tasks_parse(mirror):
    with zipfile.ZipFile(os.path.join(mirror, "files", "eval_bundle.zip")) as zf:
        names = set(zf.namelist())
        assert {"eval_bundle/core.yaml", "eval_bundle/eval_meta_data.csv"} <= names
        assert all(name.startswith("eval_bundle/") for name in names)
        meta = list(csv.DictReader(io.StringIO(zf.read("eval_bundle/eval_meta_data.csv").decode())))
        baselines = {row["Eval Task"]: float(row["Random baseline"]) for row in meta}
        yaml = zf.read("eval_bundle/core.yaml").decode()
        fields = {"multiple_choice": {"query", "choices", "gold"}, "language_modeling": {"context", "continuation"},
                  "schema": {"context_options", "continuation", "gold"}}
        for label, uri, kind, shots, delimiter, baseline, *_ in tinyworld.CORE_TASKS:
            assert baselines[label] == baseline and f"- label: {label}\n  dataset_uri: {uri}\n" in yaml
            rows = [json.loads(line) for line in zf.read(f"eval_bundle/eval_data/{uri}").decode().splitlines()]
            assert len(rows) == 100, label
            for row in rows:
                assert set(row) == fields[kind], (label, row)
                if kind != "language_modeling":
                    options = row["choices" if kind == "multiple_choice" else "context_options"]
                    assert 0 <= row["gold"] < len(options) and len(set(options)) == len(options), (label, row)
    assert len(baselines) == len(tinyworld.CORE_TASKS) == 22
