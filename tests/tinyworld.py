"""
tinyworld.py: writes (and optionally serves) an offline mirror of every remote file slimchat uses,
filled with a small synthetic world that a tiny model can learn in a few hundred CPU steps.

The world is a handful of people, towns, jobs, pets, colours and foods tied together by facts
("Mira lives in Oakvale."). The pretraining shards are documents built from those facts: fact
sheets, town pages, short stories, question-answer drills, arithmetic, spelling, symbol puzzles
and small Python functions. The task files ask about the same facts in the same words, so every
stage has something it can learn; this overlap between training and test data is on purpose.
Everything comes from one seed: the same seed gives byte-identical files. A 2-layer, 128-wide
model (gpt.py, MuonAdamW) trained 300 steps of 16x128 tokens on the default shards completes
"About Mira. Mira lives in" with the right town for 16 of 16 people, "3 + 4 = 7. a + b =" for
about 6 of 16 sums.

Layout (the hub's real one, with the real files' schemas):
    <out>/datasets/<org>/<name>/resolve/main/<file>     parquet files of the hub repos
    <out>/files/<name>                                  eval_bundle.zip, identity_conversations.jsonl,
                                                        words_alpha.txt
Point the pipeline at it with HF_ENDPOINT=http://127.0.0.1:PORT and
SLIMCHAT_FILES_ENDPOINT=http://127.0.0.1:PORT/files (or file://<out> and file://<out>/files).

    python tests/tinyworld.py --out=/tmp/mirror                  # build (about a second, under 1 MB)
    python tests/tinyworld.py --out=/tmp/mirror --serve=8000     # build, then serve until Ctrl-C
    python tests/tinyworld.py --out=/tmp/mirror --num_train_shards=8 --docs_per_shard=2048
Importable: build(out_dir, seed=0, **sizes) -> out_dir; serve(root, port=0) -> (server, port).
"""
import csv
import io
import json
import os
import random
import sys
import threading
import urllib.parse
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pyarrow.parquet as pq

# ---------------------------------------------------------------------------
# sizes: the knobs of build(); override any with build(out, name=value) or --name=value
SIZES = dict(
    num_people=16,            # people in the world (at most len(NAMES))
    num_train_shards=4,       # pretraining shards shard_00000.. (the val shard is extra)
    docs_per_shard=1024,      # documents per pretraining shard
    val_docs=256,             # documents in the val shard shard_01822.parquet
    row_group_size=64,        # docs per parquet row group (the real shards use 1024)
    mmlu_test=200,            # rows per MMLU split ...
    mmlu_validation=100,
    mmlu_dev=20,              # (the real dev split is 5 per subject: few-shot examples)
    mmlu_auxiliary_train=1500,
    arc_train=300,            # rows per ARC split, for each of ARC-Easy and ARC-Challenge
    arc_validation=100,
    arc_test=200,
    gsm8k_train=400,          # word problems
    gsm8k_test=100,
    humaneval=40,             # code problems (the real set has 164)
    smoltalk_train=600,       # conversations
    smoltalk_test=100,
    identity_conversations=100,
    num_words=2000,           # words in words_alpha.txt (the real list has 370K)
    core_rows=100,            # rows per CORE task file in eval_bundle.zip
)

# ---------------------------------------------------------------------------
# the world's vocabulary: small on purpose, so a tiny model sees every word many times
NAMES = ["Mira", "Tomas", "Lena", "Omar", "Ada", "Felix", "Nora", "Ivan", "Suri", "Pablo",
         "Greta", "Kofi", "Yara", "Hugo", "Ilsa", "Ravi", "Edda", "Bruno", "Tala", "Sven"]
SHE = {"Mira", "Lena", "Ada", "Nora", "Suri", "Greta", "Yara", "Ilsa", "Edda", "Tala"}
TOWNS = ["Oakvale", "Riverton", "Stonebridge", "Pinehill", "Lakeside", "Redcliff"]
LANDMARKS = ["market", "mill", "harbor", "tower", "bridge", "garden"]
JOBS = ["baker", "farmer", "teacher", "doctor", "painter", "fisher", "builder", "singer"]
PETS = ["dog", "cat", "horse", "goat", "rabbit", "duck", "parrot", "turtle"]
COLORS = ["red", "blue", "green", "yellow", "purple", "orange", "white", "black"]
FOODS = ["buns", "apples", "plums", "cakes", "pears", "eggs", "nuts", "figs"]   # countable: "bought 3 figs"
MAX_OPERAND = 9        # arithmetic uses 0..9: a table of 100 sums a tiny model can memorise
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
                "ten", "eleven", "twelve"]

# where each file lives on the hub (CONTRACT.md "Hub files")
PRETRAIN_REPO = "karpathy/fineweb-edu-100b-shuffle"
VAL_SHARD = "shard_01822.parquet"
SPLIT_FILE = "{}-00000-of-00001.parquet"     # the hub's parquet export names one file per split


def hub_path(out_dir, repo, filename):
    """Where the mirror keeps one hub file: the hub's own URL path under out_dir."""
    return os.path.join(out_dir, "datasets", repo, "resolve", "main", filename)


def files_path(out_dir, name):
    """Where the mirror keeps one non-hub file."""
    return os.path.join(out_dir, "files", name)


# ---------------------------------------------------------------------------
# the world: who lives where, does what, owns which pet; drawn once from the seed


def make_world(seed, num_people):
    """The facts every generated file draws on: a list of people and a dict of towns."""
    if not 2 <= num_people <= len(NAMES):
        raise ValueError(f"num_people={num_people}: must be between 2 and {len(NAMES)}")
    rng = random.Random(f"tinyworld-{seed}-world")
    names = rng.sample(NAMES, num_people)
    landmarks = rng.sample(LANDMARKS, len(TOWNS))
    towns = {t: {"name": t, "landmark": lm, "people": []} for t, lm in zip(TOWNS, landmarks)}
    people = []
    for i, name in enumerate(names):
        person = {
            "name": name,
            "town": TOWNS[i % len(TOWNS)],         # round-robin: every town gets people
            "job": rng.choice(JOBS),
            "pet": rng.choice(PETS),
            "color": rng.choice(COLORS),
            "food": rng.choice(FOODS),
            "age": rng.randint(20, 70),
            "friend": names[(i + 1 + rng.randrange(num_people - 1)) % num_people],  # never oneself
            "she": name in SHE,
        }
        towns[person["town"]]["people"].append(name)
        people.append(person)
    return {"people": people, "by_name": {p["name"]: p for p in people}, "towns": towns}


def pronoun(person, capital=False):
    word = "she" if person["she"] else "he"
    return word.capitalize() if capital else word


def possessive(person, capital=False):
    word = "her" if person["she"] else "his"
    return word.capitalize() if capital else word


def objective(person):
    return "her" if person["she"] else "him"


def article(word):
    return ("an " if word[0] in "aeiou" else "a ") + word


def eval_op(a, op, b):
    return {"+": a + b, "-": a - b, "*": a * b}[op]


def spelling_words():
    """The world's own words, lower-cased: what the spelling drills and the word list start from."""
    words = [w.lower() for w in NAMES + TOWNS] + LANDMARKS + JOBS + PETS + COLORS + FOODS
    return sorted(set(words + NUMBER_WORDS))


def fact_sentences(person):
    """Every fact about one person, one plain sentence each (the same wording everywhere)."""
    n = person["name"]
    return [
        f"{n} lives in {person['town']}.",
        f"{n} works as {article(person['job'])}.",
        f"{n} has {article(person['pet'])}.",
        f"{n} likes the color {person['color']}.",
        f"{n}'s favorite food is {person['food']}.",
        f"{n} is {person['age']} years old.",
        f"{n} is friends with {person['friend']}.",
    ]


def qa_pairs(world, person):
    """Question and answer about each fact of one person (used by drills and chat data)."""
    n, town = person["name"], person["town"]
    return [
        (f"Where does {n} live?", f"{n} lives in {town}."),
        (f"What does {n} do for work?", f"{n} works as {article(person['job'])}."),
        (f"What pet does {n} have?", f"{n} has {article(person['pet'])}."),
        (f"What color does {n} like?", f"{n} likes the color {person['color']}."),
        (f"What is {n}'s favorite food?", f"{n}'s favorite food is {person['food']}."),
        (f"How old is {n}?", f"{n} is {person['age']} years old."),
        (f"Who is {n}'s friend?", f"{n} is friends with {person['friend']}."),
        (f"What is in {town}?", f"{town} has a {world['towns'][town]['landmark']}."),
    ]


# ---------------------------------------------------------------------------
# HumanEval-style problems: each template is (name, arguments, return type, docstring, body,
# reference function, test inputs); the test asserts the reference's outputs, which the body must match


def humaneval_templates(rng, world):
    """Every template, its constants (k, a letter) and test inputs drawn from rng."""
    k = rng.randint(2, 9)
    letter = rng.choice("aeiou")
    homes = {p["name"]: p["town"] for p in world["people"]}
    words = spelling_words()

    def nums():
        return [rng.randint(-9, 20) for _ in range(rng.randint(1, 6))]

    return [
        (f"add_{NUMBER_WORDS[k]}", "x: int", "int", f"Return x plus {k}.",
         f"return x + {k}", lambda x: x + k, [(rng.randint(-20, 20),) for _ in range(4)]),
        (f"times_{NUMBER_WORDS[k]}", "x: int", "int", f"Return x multiplied by {k}.",
         f"return x * {k}", lambda x: x * k, [(rng.randint(-20, 20),) for _ in range(4)]),
        (f"count_{letter}", "s: str", "int", f"Count how many times the letter '{letter}' is in s.",
         f"return s.count({letter!r})", lambda s: s.count(letter), [(rng.choice(words),) for _ in range(4)]),
        ("sum_list", "xs: List[int]", "int", "Return the sum of the numbers in xs.",
         "return sum(xs)", sum, [(nums(),) for _ in range(4)]),
        ("largest", "xs: List[int]", "int", "Return the largest number in the non-empty list xs.",
         "return max(xs)", max, [(nums(),) for _ in range(4)]),
        (f"is_multiple_of_{NUMBER_WORDS[k]}", "n: int", "bool", f"Return True if n is a multiple of {k}.",
         f"return n % {k} == 0", lambda n: n % k == 0, [(rng.randint(0, 40),) for _ in range(5)]),
        ("reverse_words", "s: str", "str", "Return the words of s in reverse order, joined by spaces.",
         "return \" \".join(reversed(s.split()))", lambda s: " ".join(reversed(s.split())),
         [(" ".join(rng.sample(words, 3)),) for _ in range(3)]),
        ("count_evens", "xs: List[int]", "int", "Count the even numbers in xs.",
         "return sum(1 for x in xs if x % 2 == 0)", lambda xs: sum(1 for x in xs if x % 2 == 0),
         [(nums(),) for _ in range(4)]),
        ("home_town", "name: str", "str", "Return the town where the person called name lives.",
         f"homes = {homes!r}\n    return homes[name]", lambda name: homes[name],
         [(rng.choice(sorted(homes)),) for _ in range(3)]),
    ]


def humaneval_problem(index, template):
    """One row in HumanEval's schema from a template."""
    name, args, returns, doc, body, reference, inputs = template
    example = inputs[0]
    call = f"{name}({', '.join(map(repr, example))})"
    header = "from typing import List\n\n\n" if "List" in args else ""
    prompt = (f"{header}def {name}({args}) -> {returns}:\n    \"\"\"{doc}\n    >>> {call}\n"
              f"    {reference(*example)!r}\n    \"\"\"\n")
    asserts = "".join(f"    assert candidate({', '.join(map(repr, x))}) == {reference(*x)!r}\n"
                      for x in inputs)
    return {"task_id": f"HumanEval/{index}", "prompt": prompt, "canonical_solution": f"    {body}\n",
            "test": f"\n\nMETADATA = {{}}\n\n\ndef check(candidate):\n{asserts}\n", "entry_point": name}


def humaneval_rows(rng, world, num_rows):
    rows = [humaneval_problem(i, rng.choice(humaneval_templates(rng, world))) for i in range(num_rows)]
    return pa.table({key: [r[key] for r in rows] for key in rows[0]})


# ---------------------------------------------------------------------------
# pretraining documents: each paragraph kind is one small function of (rng, world)


def para_facts(rng, world):
    person = rng.choice(world["people"])
    facts = fact_sentences(person)
    rng.shuffle(facts)
    facts = facts[:rng.randint(3, len(facts))]
    # half as a list, so facts also start lines (as in the CORE few-shot prompts), not only sentences
    separator = "\n" if rng.random() < 0.5 else " "
    return f"About {person['name']}.{separator}" + separator.join(facts)


def para_town(rng, world):
    town = world["towns"][rng.choice(TOWNS)]
    people = town["people"]
    lines = [f"{town['name']} is a small town with a {town['landmark']}."]
    if people:
        lines.append(f"{', '.join(people[:-1]) + ' and ' if len(people) > 1 else ''}{people[-1]} "
                     f"live{'s' if len(people) == 1 else ''} in {town['name']}.")
        for name in people:
            lines.append(f"The {world['by_name'][name]['job']} {name} lives in {town['name']}.")
    return " ".join(lines)


def story(world, p, k):
    """The short story about person p (buying k of their favourite food), ending with their town."""
    f = world["by_name"][p["friend"]]
    town = world["towns"][p["town"]]
    she, her = pronoun(p, True), possessive(p)
    return (f"One morning {p['name']} the {p['job']} left {her} home in {p['town']} with {her} "
            f"{p['pet']}. {she} walked to the {town['landmark']} and bought {k} {p['food']}. "
            f"There {pronoun(p)} met {her} friend {f['name']}, the {f['job']} from {f['town']}. "
            f"\"Hello {f['name']}!\" said {p['name']}. They shared the {p['food']}, and {p['name']} "
            f"gave {f['name']} {article(p['color'])} ribbon. In the evening {p['name']} went home to "
            f"{p['town']}.")


def para_story(rng, world):
    return story(world, rng.choice(world["people"]), rng.randint(2, 9))


def para_qa(rng, world):
    pairs = []
    for _ in range(rng.randint(2, 4)):
        pairs.append(rng.choice(qa_pairs(world, rng.choice(world["people"]))))
    return "\n".join(f"Q: {q}\nA: {a}" for q, a in pairs)


def para_quiz(rng, world):
    """Quiz lines with short answers, the way trivia pages read: the facts as answers to questions,
    which is how the multiple-choice tasks ask for them (a model that only saw the facts as
    sentences can complete "Nora has a" but not answer "What pet does Nora have?")."""
    lines = []
    for _ in range(rng.randint(2, 5)):
        _, question, right, _ = fact_question(rng, world)
        lines.append(f"Question: {question}\nAnswer: {right}")
    return "\n".join(lines)


def para_arithmetic(rng, world):
    lines = []
    for _ in range(rng.randint(4, 8)):
        a, b = rng.randint(0, MAX_OPERAND), rng.randint(0, MAX_OPERAND)
        op = rng.choice("+-*")
        if op == "-" and b > a:
            a, b = b, a
        lines.append(f"{a} {op} {b} = {eval_op(a, op, b)}.")
    p = rng.choice(world["people"])
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    lines.append(f"{p['name']} had {a} {p['food']}. {p['friend']} gave {objective(p)} {b} more. "
                 f"Now {p['name']} has {a + b} {p['food']}.")
    return " ".join(lines)


def para_spelling(rng, world):
    words = rng.sample(spelling_words(), 3)
    return " ".join(f"The word {w} is spelled {'-'.join(w)}." for w in words)


def puzzle_dyck(rng, world):
    """Open 1-4 brackets; the continuation closes them (bigbench_dyck_languages)."""
    opened = [rng.choice("([{<") for _ in range(rng.randint(1, 4))]
    closing = [")]}>"["([{<".index(b)] for b in reversed(opened)]
    return ("Complete the rest of the sequence, making sure that the parentheses are closed "
            f"properly. Input: {' '.join(opened)}", " ".join(closing))


def puzzle_sort(rng, world):
    """Sort three to five small numbers (bigbench_cs_algorithms)."""
    numbers = rng.sample(range(20), rng.randint(3, 5))
    return (f"Sort the numbers: {' '.join(map(str, numbers))}. Sorted:",
            " ".join(map(str, sorted(numbers))))


def puzzle_operator(rng, world):
    """A made-up operator defined by one addition or multiplication (bigbench_operators)."""
    op, k, a = rng.choice("+*"), rng.randint(1, 5), rng.randint(0, 9)
    return f"op x = x {op} {k}. op {a} =", str(eval_op(a, op, k))


def puzzle_repeat(rng, world):
    """Repeat a word of the world n times (bigbench_repeat_copy_logic)."""
    word, n = rng.choice(spelling_words()), rng.randint(2, 4)
    return f"Repeat the word {word} {NUMBER_WORDS[n]} times:", " ".join([word] * n)


# made-up languages, each a small syllable set, for bigbench_language_identification (11 choices)
LANGUAGES = {"Oakish": "ka ko ki", "Rivenese": "lu la li", "Stonic": "dra dro dru",
             "Pinelic": "pe pi po", "Lakan": "mo ma mu", "Redish": "ze za zu", "Meadic": "ni ne na",
             "Foxian": "fa fe fu", "Hillese": "ho hu ha", "Brookan": "be bi bo", "Valish": "wa we wo"}


def puzzle_language(rng, world):
    language = rng.choice(sorted(LANGUAGES))
    syllables = LANGUAGES[language].split()
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3)))
             for _ in range(rng.randint(3, 5))]
    return f"Sentence: {' '.join(words).capitalize()}.\nLanguage:", language


PUZZLES = [puzzle_dyck, puzzle_sort, puzzle_operator, puzzle_repeat, puzzle_language]


def para_puzzles(rng, world):
    """Symbol games in the formats of the CORE tasks that are not about the world (REFERENCE §16)."""
    puzzles = [rng.choice(PUZZLES)(rng, world) for _ in range(rng.randint(2, 4))]
    return "\n".join(f"{context} {continuation}" for context, continuation in puzzles)


def para_code(rng, world):
    """A small Python function with its docstring, as in the HumanEval-style task file."""
    problem = humaneval_problem(0, rng.choice(humaneval_templates(rng, world)))
    return (problem["prompt"] + problem["canonical_solution"]).rstrip("\n")


PARAGRAPHS = [para_facts, para_facts, para_town, para_story, para_story, para_qa, para_quiz, para_arithmetic,
              para_arithmetic, para_spelling, para_puzzles, para_code]   # facts and stories listed twice: they carry most of the world


def make_document(rng, world):
    """One pretraining document: 2 to 5 paragraphs of random kinds."""
    return "\n\n".join(rng.choice(PARAGRAPHS)(rng, world) for _ in range(rng.randint(2, 5)))


def write_bytes(path, data):
    """Write a file atomically (temp file, then rename), making its folder."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "wb") as f:
        f.write(data)
    os.replace(path + ".tmp", path)


def write_table(path, table, row_group_size=None):
    """Write a parquet file atomically, the way the real shards are written (zstd, no stats)."""
    out = pa.BufferOutputStream()
    pq.write_table(table, out, row_group_size=row_group_size or max(1, table.num_rows),
                   compression="zstd", compression_level=3, use_dictionary=False,
                   write_statistics=False)
    write_bytes(path, out.getvalue().to_pybytes())


def build_pretraining(out_dir, seed, world, sizes):
    """The train shards shard_00000.. and the val shard, each drawn from its own seeded stream."""
    shards = [(f"shard_{i:05d}.parquet", sizes["docs_per_shard"]) for i in range(sizes["num_train_shards"])]
    for filename, num_docs in shards + [(VAL_SHARD, sizes["val_docs"])]:
        rng = random.Random(f"tinyworld-{seed}-{filename}")
        texts = [make_document(rng, world) for _ in range(num_docs)]
        # marked as ours, so the report card and serve.py can say the model learned this world
        table = pa.table({"text": texts}).replace_schema_metadata({"slimchat_source": "tinyworld"})
        write_table(hub_path(out_dir, PRETRAIN_REPO, filename), table, sizes["row_group_size"])


# ---------------------------------------------------------------------------
# multiple choice about the world (MMLU, ARC): a question, its right answer, the pool of wrong ones


def fact_question(rng, world):
    """(subject, question, right, wrong pool) for one fact of a random person or an addition."""
    p = rng.choice(world["people"])
    n = p["name"]
    others = [q["name"] for q in world["people"] if q["name"] != n]
    kinds = [
        ("high_school_geography", f"Where does {n} live?", p["town"], TOWNS),
        ("miscellaneous", f"What does {n} do for work?", p["job"], JOBS),
        ("miscellaneous", f"What pet does {n} have?", p["pet"], PETS),
        ("miscellaneous", f"What color does {n} like?", p["color"], COLORS),
        ("nutrition", f"What is {n}'s favorite food?", p["food"], FOODS),
        ("global_facts", f"Who is {n}'s friend?", p["friend"], others),
    ]
    town = rng.choice(TOWNS)
    landmark = world["towns"][town]["landmark"]
    kinds.append(("high_school_geography", f"Which town has a {landmark}?", town, TOWNS))
    a, b = rng.randint(0, MAX_OPERAND), rng.randint(0, MAX_OPERAND)
    kinds.append(("elementary_mathematics", f"What is {a} + {b}?", str(a + b),
                  [str(x) for x in range(25)]))
    subject, question, right, pool = rng.choice(kinds)
    return subject, question, right, [w for w in pool if w != right]


def friend_question(rng, world):
    """(subject, question, right, wrong pool) that takes two steps (ARC-Challenge): a friend's fact."""
    p = rng.choice(world["people"])
    f = world["by_name"][p["friend"]]
    if rng.random() < 0.5:
        return ("", f"Where does {p['name']}'s friend live?", f["town"],
                [t for t in TOWNS if t != f["town"]])
    return "", f"What pet does {p['name']}'s friend have?", f["pet"], [a for a in PETS if a != f["pet"]]


def shuffled_choices(rng, right, wrong_pool, k):
    """k choices: the right one and k-1 distinct wrong ones, shuffled; returns (choices, gold)."""
    choices = rng.sample(wrong_pool, k - 1) + [right]
    rng.shuffle(choices)
    return choices, choices.index(right)


def mmlu_rows(rng, world, num_rows, with_subject=True):
    rows = {"question": [], "subject": [], "choices": [], "answer": []}
    for _ in range(num_rows):
        subject, question, right, wrong = fact_question(rng, world)
        choices, gold = shuffled_choices(rng, right, wrong, 4)
        rows["question"].append(question)
        # auxiliary_train on the hub has empty subjects: it was gathered from other datasets
        rows["subject"].append(subject if with_subject else "")
        rows["choices"].append(choices)
        rows["answer"].append(gold)
    return pa.table({**rows, "answer": pa.array(rows["answer"], pa.int64())})


def arc_rows(rng, world, num_rows, challenge, prefix):
    """ARC rows; like the real data, some use labels 1-4 and a few have 3 or 5 choices."""
    rows = {"id": [], "question": [], "choices": [], "answerKey": []}
    for i in range(num_rows):
        _, question, right, wrong = (friend_question if challenge else fact_question)(rng, world)
        roll = rng.random()
        k = 3 if roll < 0.06 else 5 if roll < 0.12 else 4
        choices, gold = shuffled_choices(rng, right, wrong, k)
        labels = list("12345"[:k]) if rng.random() < 0.1 else list("ABCDE"[:k])
        rows["id"].append(f"TinyWorld_{prefix}_{i:05d}")
        rows["question"].append(question)
        rows["choices"].append({"text": choices, "label": labels})
        rows["answerKey"].append(labels[gold])
    return pa.table(rows, schema=ARC_SCHEMA)


ARC_SCHEMA = pa.schema([("id", pa.string()), ("question", pa.string()),
                        ("choices", pa.struct([("text", pa.list_(pa.string())),
                                               ("label", pa.list_(pa.string()))])),
                        ("answerKey", pa.string())])


# ---------------------------------------------------------------------------
# GSM8K-style word problems: steps with <<expr=result>> calculator annotations, then "#### N"


def step(a, op, b, text_before, text_after):
    """One worked line 'text_before a op b = <<a op b=value>>value text_after', and the value."""
    value = {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op]
    assert op != "/" or a % b == 0, f"{a}/{b} is not a whole number"
    expr = f"{a}{op}{b}"
    return f"{text_before}{expr} = <<{expr}={value}>>{value}{text_after}", value


def gsm8k_problem(rng, world):
    """(question, answer) for one of a few small templates about a random person."""
    p = rng.choice(world["people"])
    n, food, friend, she = p["name"], p["food"], p["friend"], pronoun(p, True)
    kind = rng.randrange(4)
    if kind == 0:
        a, b = rng.randint(2, 6), rng.randint(2, 6)
        c = rng.randint(1, a * b - 1)
        line1, total = step(a, "*", b, f"{n} has ", f" {food}.")
        line2, left = step(total, "-", c, f"After giving away {c}, {pronoun(p)} has ", f" {food} left.")
        return (f"{n} has {a} baskets with {b} {food} in each basket. {she} gives {c} {food} to "
                f"{friend}. How many {food} does {n} have left?", [line1, line2], left)
    if kind == 1:
        a = rng.randint(2, 9)
        line1, double = step(a, "*", 2, f"{friend} has ", f" {food}.")
        line2, total = step(a, "+", double, "Together they have ", f" {food}.")
        return (f"{n} has {a} {food}. {friend} has twice as many {food} as {n}. How many {food} "
                f"do they have together?", [line1, line2], total)
    if kind == 2:
        each, people = rng.randint(2, 6), rng.randint(2, 5)
        line1, share = step(each * people, "/", people, "Each friend gets ", f" {food}.")
        return (f"{n} shares {each * people} {food} equally among {people} friends. How many "
                f"{food} does each friend get?", [line1], share)
    price, count = rng.randint(1, 5), rng.randint(2, 6)
    note = 10 if price * count < 10 else 50
    line1, cost = step(price, "*", count, f"The {food} cost ", " dollars.")
    line2, change = step(note, "-", cost, f"{n} gets back ", " dollars.")
    return (f"{n} buys {count} {food} at the {world['towns'][p['town']]['landmark']} for {price} "
            f"dollars each and pays with a {note} dollar note. How much change does {n} get?",
            [line1, line2], change)


def gsm8k_rows(rng, world, num_rows):
    rows = {"question": [], "answer": []}
    for _ in range(num_rows):
        question, lines, result = gsm8k_problem(rng, world)
        rows["question"].append(question)
        rows["answer"].append("\n".join(lines + [f"#### {result}"]))
    return pa.table(rows)


# ---------------------------------------------------------------------------
# conversations: SmolTalk-style chats about the world, and identity chats about slimchat

SYSTEM_PROMPTS = ["You are a helpful assistant.", "You are a friendly assistant. Answer briefly.",
                  "You know everything about the towns of the tiny world."]


def chat_turn(rng, world):
    """(source, user message, assistant reply) for one exchange."""
    p = rng.choice(world["people"])
    kind = rng.randrange(4)
    if kind == 0:
        question, answer = rng.choice(qa_pairs(world, p))
        return "tinyworld-facts", question, answer
    if kind == 1:
        a, b = rng.randint(0, MAX_OPERAND), rng.randint(0, MAX_OPERAND)
        op = rng.choice("+*")
        return "tinyworld-math", f"What is {a} {op} {b}?", f"{a} {op} {b} = {eval_op(a, op, b)}."
    if kind == 2:
        return ("tinyworld-stories", f"Tell me a short story about {p['name']}.",
                story(world, p, rng.randint(2, 9)))
    word = rng.choice(spelling_words())
    return "tinyworld-spelling", f"How do you spell {word}?", f"The word {word} is spelled {'-'.join(word)}."


def smoltalk_rows(rng, world, num_rows):
    rows = {"messages": [], "source": []}
    for _ in range(num_rows):
        messages = []
        if rng.random() < 0.3:
            messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        for _ in range(rng.randint(1, 3)):
            source, user, reply = chat_turn(rng, world)
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
        rows["messages"].append(messages)
        rows["source"].append(source)      # the source of the last exchange
    message = pa.struct([("content", pa.string()), ("role", pa.string())])
    return pa.table(rows, schema=pa.schema([("messages", pa.list_(message)), ("source", pa.string())]))


IDENTITY = [
    ("Who are you?", "I am slimchat, a small language model. I was trained from scratch on a tiny "
     "world of towns, people and numbers."),
    ("What is your name?", "My name is slimchat."),
    ("Who made you?", "I was built with slimchat, a minimal full-stack pipeline that trains a chat "
     "model from nothing: tokenizer, pretraining, finetuning and a chat page."),
    ("What can you do?", "I am slimchat. I can answer questions about the people and towns of the "
     "tiny world, do small sums and spell words. I am very small, so I make mistakes."),
    ("Are you ChatGPT?", "No, I am slimchat, a much smaller model trained with the slimchat pipeline."),
]
GREETINGS = ["Hi!", "Hello there.", "Hey, good morning!", "Hello!"]


def identity_conversations(rng, num_rows):
    """JSON lines, one conversation (a list of {role, content}) per line."""
    lines = []
    for _ in range(num_rows):
        messages = []
        if rng.random() < 0.4:
            messages += [{"role": "user", "content": rng.choice(GREETINGS)},
                         {"role": "assistant", "content": "Hello! I am slimchat. How can I help?"}]
        for question, answer in rng.sample(IDENTITY, rng.randint(1, 2)):
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        lines.append(json.dumps(messages))
    return "".join(line + "\n" for line in lines)


def word_list(rng, num_words):
    """The world's words plus made-up ones from syllables, lowercase, sorted, one per line."""
    words = set(spelling_words())
    syllables = ["ba", "ko", "ri", "mu", "te", "sa", "lo", "ne", "fi", "du", "ga", "pe", "zo", "wi"]
    while len(words) < num_words:
        words.add("".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) + rng.choice("nst"))
    return "".join(w + "\n" for w in sorted(words)[:num_words])


# ---------------------------------------------------------------------------
# CORE eval bundle: the 22 tasks of REFERENCE §16 rebuilt from the world, one row generator per file.
# Row fields by type: multiple_choice {query, choices, gold}; schema {context_options, continuation,
# gold}; language_modeling {context, continuation}. Delimiters are added by the evaluator.


def mc_row(rng, query, right, wrong_pool, k):
    choices, gold = shuffled_choices(rng, right, wrong_pool, k)
    return {"query": query, "choices": choices, "gold": gold}


def two_people(rng, world, key):
    """Two people who differ in world fact `key`."""
    x = rng.choice(world["people"])
    y = rng.choice([p for p in world["people"] if p[key] != x[key]])
    return x, y


def core_hellaswag(rng, world):
    p = rng.choice(world["people"])
    k = rng.randint(2, 9)
    query = story(world, p, k).split(" walked to the ")[0] + " walked to the"
    right = f"{world['towns'][p['town']]['landmark']} and bought {k} {p['food']}."
    wrong = sorted({f"{lm} and bought {k} {food}." for lm in LANDMARKS for food in FOODS} - {right})
    return mc_row(rng, query, right, wrong, 4)


def core_jeopardy(rng, world):
    def clue(p):
        return f"This {p['job']} from {p['town']} has {article(p['pet'])}."
    clues = [clue(p) for p in world["people"]]
    unique = [p for p in world["people"] if clues.count(clue(p)) == 1]
    if not unique:
        raise ValueError("no jeopardy clue names one person: every person shares job, town and pet "
                         "with another; try another seed or num_people")
    p = rng.choice(unique)
    return {"context": f"TINY WORLD: {clue(p)}", "continuation": p["name"]}


def core_wikidata(rng, world):
    p = rng.choice(world["people"])
    context, continuation = rng.choice([(f"{p['name']} lives in", p["town"]),
                                        (f"{p['name']} works as a", p["job"]),
                                        (f"{p['name']}'s favorite food is", p["food"]),
                                        (f"{p['name']} is friends with", p["friend"])])
    return {"context": context, "continuation": continuation}


def core_arc(question_fn):
    def rows(rng, world):
        _, question, right, wrong = question_fn(rng, world)
        return mc_row(rng, f"Question: {question}", right, wrong, 4)
    return rows


def core_copa(rng, world):
    p = rng.choice(world["people"])
    landmark = world["towns"][p["town"]]["landmark"]
    query = f"{p['name']} walked home after the {landmark}, so {pronoun(p)} went to"
    return mc_row(rng, query, f"{p['town']}.", [f"{t}." for t in TOWNS if t != p["town"]], 2)


def core_commonsense_qa(rng, world):
    p = rng.choice(world["people"])
    query = f"Question: Which job does {p['name']} have?\nAnswer:"
    return mc_row(rng, query, p["job"], [j for j in JOBS if j != p["job"]], 5)


def core_piqa(rng, world):
    p = rng.choice(world["people"])
    f = world["by_name"][p["friend"]]
    query = (f"Question: {p['name']} wants to visit {possessive(p)} friend {f['name']}. "
             f"Where should {pronoun(p)} go?")
    return mc_row(rng, query, f"Go to {f['town']}.", [f"Go to {t}." for t in TOWNS if t != f["town"]], 2)


def core_openbook_qa(rng, world):
    a, b, op = rng.randint(0, MAX_OPERAND), rng.randint(0, MAX_OPERAND), rng.choice("+*")
    right = eval_op(a, op, b)
    wrong = [str(x) for x in range(max(0, right - 10), right + 11) if x != right]
    return mc_row(rng, f"What is {a} {op} {b}?", str(right), wrong, 4)


def core_lambada(rng, world):
    p = rng.choice(world["people"])
    text = story(world, p, rng.randint(2, 9))
    return {"context": text[:-len(p["town"]) - 2], "continuation": p["town"]}   # drop " Town."


def core_winograd(rng, world):
    x, y = two_people(rng, world, "friend")
    options = [f"{x['name']} is friends with", f"{y['name']} is friends with"]
    gold = rng.randrange(2)
    return {"context_options": options if gold == 0 else options[::-1],
            "continuation": f"{x['friend']}.", "gold": gold}


def core_winogrande(rng, world):
    x, y = two_people(rng, world, "town")
    options = [f"{x['name']} lives in", f"{y['name']} lives in"]
    gold = rng.randrange(2)
    return {"context_options": options if gold == 0 else options[::-1],
            "continuation": f"{x['town']}.", "gold": gold}


def core_puzzle(puzzle_fn):
    def rows(rng, world):
        context, continuation = puzzle_fn(rng, world)
        return {"context": context, "continuation": continuation}
    return rows


def core_lsat(rng, world):
    line = rng.sample([p["name"] for p in world["people"]], 3)
    facts = [f"{line[0]} stands before {line[1]}.", f"{line[1]} stands before {line[2]}."]
    rng.shuffle(facts)
    query = f"{', '.join(sorted(line))} stand in a line. {' '.join(facts)} Who stands first?"
    outsiders = sorted({p["name"] for p in world["people"]} - set(line))
    wrong = line[1:] + rng.sample(outsiders, 2)             # 5 choices, as in the real task
    return mc_row(rng, query, line[0], wrong, 5)


def core_squad(rng, world):
    p = rng.choice(world["people"])
    question, answer = rng.choice([(f"Where does {p['name']} live?", p["town"]),
                                   (f"What pet does {p['name']} have?", p["pet"]),
                                   (f"Who is {p['name']}'s friend?", p["friend"])])
    passage = " ".join(fact_sentences(p))
    return {"context": f"{passage}\nQuestion: {question}\nAnswer:", "continuation": answer}


def core_coqa(rng, world):
    p = rng.choice(world["people"])
    question, answer = rng.choice([(f"Who did {p['name']} meet?", p["friend"]),
                                   (f"Which animal came along?", f"{article(p['pet'])}"),
                                   (f"Where did {p['name']} go in the evening?", p["town"])])
    text = story(world, p, rng.randint(2, 9))
    return {"context": f"{text}\nQ: {question}\nA:", "continuation": answer}


def core_boolq(rng, world):
    p = rng.choice(world["people"])
    yes = rng.random() < 0.62            # the real boolq is 62% "yes": the table's random baseline
    town = p["town"] if yes else rng.choice([t for t in TOWNS if t != p["town"]])
    facts = fact_sentences(p)
    query = f"Passage: {' '.join(facts[:4])}\nQuestion: does {p['name']} live in {town}?"
    return {"query": query, "choices": ["no", "yes"], "gold": int(yes)}


def core_language_identification(rng, world):
    sentence, language = puzzle_language(rng, world)
    query = f"Given a sentence, select the correct language among the choices.\n{sentence}"
    return mc_row(rng, query, language, [name for name in sorted(LANGUAGES) if name != language], 11)


MC, LM, SCHEMA = "multiple_choice", "language_modeling", "schema"
# label, dataset_uri (its folder is the category), type, shots, delimiter, random baseline %,
# row generator: REFERENCE §16
CORE_TASKS = [
    ("hellaswag_zeroshot", "language_understanding/hellaswag.jsonl",
     MC, 0, " ", 25, core_hellaswag),
    ("jeopardy", "world_knowledge/jeopardy_all.jsonl",
     LM, 10, "\nAnswer: ", 0, core_jeopardy),
    ("bigbench_qa_wikidata", "world_knowledge/bigbench_qa_wikidata.jsonl",
     LM, 10, " ", 0, core_wikidata),
    ("arc_easy", "world_knowledge/arc_easy.jsonl",
     MC, 10, "\nAnswer: ", 25, core_arc(fact_question)),
    ("arc_challenge", "world_knowledge/arc_challenge.jsonl",
     MC, 10, "\nAnswer: ", 25, core_arc(friend_question)),
    ("copa", "commonsense_reasoning/copa.jsonl",
     MC, 0, " ", 50, core_copa),
    ("commonsense_qa", "commonsense_reasoning/commonsense_qa.jsonl",
     MC, 10, " ", 20, core_commonsense_qa),
    ("piqa", "commonsense_reasoning/piqa.jsonl",
     MC, 10, "\nAnswer: ", 50, core_piqa),
    ("openbook_qa", "commonsense_reasoning/openbook_qa.jsonl",
     MC, 0, " ", 25, core_openbook_qa),
    ("lambada_openai", "language_understanding/lambada_openai.jsonl",
     LM, 0, " ", 0, core_lambada),
    ("hellaswag", "language_understanding/hellaswag.jsonl",
     MC, 10, " ", 25, core_hellaswag),
    ("winograd", "language_understanding/winograd_wsc.jsonl",
     SCHEMA, 0, " ", 50, core_winograd),
    ("winogrande", "language_understanding/winogrande.jsonl",
     SCHEMA, 0, " ", 50, core_winogrande),
    ("bigbench_dyck_languages", "symbolic_problem_solving/bigbench_dyck_languages.jsonl",
     LM, 10, " ", 0, core_puzzle(puzzle_dyck)),
    ("agi_eval_lsat_ar", "symbolic_problem_solving/agi_eval_lsat_ar.jsonl",
     MC, 3, " ", 20, core_lsat),
    ("bigbench_cs_algorithms", "symbolic_problem_solving/bigbench_cs_algorithms.jsonl",
     LM, 10, " ", 0, core_puzzle(puzzle_sort)),
    ("bigbench_operators", "symbolic_problem_solving/bigbench_operators.jsonl",
     LM, 10, " ", 0, core_puzzle(puzzle_operator)),
    ("bigbench_repeat_copy_logic", "symbolic_problem_solving/bigbench_repeat_copy_logic.jsonl",
     LM, 10, " ", 0, core_puzzle(puzzle_repeat)),
    ("squad", "reading_comprehension/squad.jsonl",
     LM, 10, " ", 0, core_squad),
    ("coqa", "reading_comprehension/coqa.jsonl",
     LM, 0, " ", 0, core_coqa),
    ("boolq", "reading_comprehension/boolq.jsonl",
     MC, 10, "\nAnswer: ", 62, core_boolq),
    ("bigbench_language_identification",
     "language_understanding/bigbench_language_identification.jsonl",
     MC, 10, " ", 9.1, core_language_identification),
]


def core_yaml():
    """core.yaml in the bundle's shape (icl_tasks with label, dataset_uri, num_fewshot list, ...)."""
    lines = ["icl_tasks:"]
    for label, uri, kind, shots, delimiter, *_ in CORE_TASKS:
        lines += [f"- label: {label}", f"  dataset_uri: {uri}", f"  num_fewshot: [{shots}]",
                  f"  icl_task_type: {kind}", f"  continuation_delimiter: {json.dumps(delimiter)}"]
    return "\n".join(lines) + "\n"


def core_meta_csv():
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["Eval Task", "Task Category", "Task Type", "#shots", "Random baseline", "Description"])
    for label, uri, kind, shots, _, baseline, _ in CORE_TASKS:
        category = uri.split("/")[0].replace("_", " ")
        writer.writerow([label, category, kind, shots, baseline, f"tinyworld stand-in for {label}"])
    return out.getvalue()


def eval_bundle(rng_for, world, rows_per_task):
    """The zip's bytes: eval_bundle/{core.yaml, eval_meta_data.csv, eval_data/<uri>}, fixed timestamps."""
    files = {"eval_bundle/core.yaml": core_yaml(), "eval_bundle/eval_meta_data.csv": core_meta_csv()}
    for _, uri, _, _, _, _, gen in CORE_TASKS:
        if f"eval_bundle/eval_data/{uri}" not in files:         # hellaswag serves two labels
            rng = rng_for(uri)
            files[f"eval_bundle/eval_data/{uri}"] = "".join(json.dumps(gen(rng, world)) + "\n"
                                                            for _ in range(rows_per_task))
    folders = sorted({name[:i + 1] for name in files for i, c in enumerate(name) if c == "/"})
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        for name in folders + sorted(files):
            info = zipfile.ZipInfo(name, date_time=(2024, 1, 1, 0, 0, 0))   # fixed: byte-identical builds
            info.external_attr = (0o40755 if name.endswith("/") else 0o100644) << 16
            info.compress_type = zipfile.ZIP_STORED if name.endswith("/") else zipfile.ZIP_DEFLATED
            zf.writestr(info, files.get(name, ""))
    return out.getvalue()


def build_tasks(out_dir, seed, world, sizes):
    """Every task file of CONTRACT.md "Hub files" and the three non-hub files."""
    def rng_for(name):                   # one stream per file: resizing one file leaves the rest alone
        return random.Random(f"tinyworld-{seed}-{name}")

    def hub(repo, filename, table):
        write_table(hub_path(out_dir, repo, filename), table)

    for split in ["test", "validation", "dev", "auxiliary_train"]:
        name = f"all/{SPLIT_FILE.format(split)}"
        hub("cais/mmlu", name, mmlu_rows(rng_for(name), world, sizes[f"mmlu_{split}"],
                                         with_subject=split != "auxiliary_train"))
    for subset in ["ARC-Easy", "ARC-Challenge"]:
        for split in ["train", "validation", "test"]:
            name = f"{subset}/{SPLIT_FILE.format(split)}"
            hub("allenai/ai2_arc", name, arc_rows(rng_for(name), world, sizes[f"arc_{split}"],
                                                  subset == "ARC-Challenge", f"{subset}_{split}"))
    for split in ["train", "test"]:
        name = f"main/{SPLIT_FILE.format(split)}"
        hub("openai/gsm8k", name, gsm8k_rows(rng_for(name), world, sizes[f"gsm8k_{split}"]))
        name = f"data/{SPLIT_FILE.format(split)}"
        hub("HuggingFaceTB/smol-smoltalk", name,
            smoltalk_rows(rng_for(name), world, sizes[f"smoltalk_{split}"]))
    name = f"openai_humaneval/{SPLIT_FILE.format('test')}"
    hub("openai/openai_humaneval", name, humaneval_rows(rng_for(name), world, sizes["humaneval"]))
    write_bytes(files_path(out_dir, "identity_conversations.jsonl"),
                identity_conversations(rng_for("identity"), sizes["identity_conversations"]).encode())
    write_bytes(files_path(out_dir, "words_alpha.txt"),
                word_list(rng_for("words"), sizes["num_words"]).encode())
    write_bytes(files_path(out_dir, "eval_bundle.zip"), eval_bundle(rng_for, world, sizes["core_rows"]))


# ---------------------------------------------------------------------------
# build and serve


def build(out_dir, seed=0, **sizes):
    """Write the whole mirror under out_dir; return out_dir. Unknown size names raise ValueError."""
    unknown = sorted(set(sizes) - set(SIZES))
    if unknown:
        raise ValueError(f"unknown tinyworld size(s) {unknown}; known: {sorted(SIZES)}")
    sizes = {**SIZES, **sizes}
    for name, value in sizes.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"tinyworld size {name}={value!r}: must be a positive int")
    world = make_world(seed, sizes["num_people"])
    build_pretraining(out_dir, seed, world, sizes)
    build_tasks(out_dir, seed, world, sizes)
    return out_dir


class MirrorHandler(BaseHTTPRequestHandler):
    """GET and HEAD of files under the server's root, with single byte ranges (206) and 404s."""

    def do_HEAD(self):
        self.answer(send_body=False)

    def do_GET(self):
        self.answer(send_body=True)

    def answer(self, send_body):
        path = self.local_path()
        if path is None or not os.path.isfile(path):
            return self.fail(404, f"not in the mirror: {self.path}")
        size = os.path.getsize(path)
        start, end = 0, size - 1
        header = self.headers.get("Range")
        if header:
            span = parse_range(header, size)
            if span is None:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                return self.end_headers()
            start, end = span
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        else:
            self.send_response(200)
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(end - start + 1))
        self.end_headers()
        if send_body:
            with open(path, "rb") as f:
                f.seek(start)
                left = end - start + 1
                while left > 0:                  # in chunks: a real-sized shard is ~100 MB
                    chunk = f.read(min(left, 1 << 20))
                    self.wfile.write(chunk)
                    left -= len(chunk)

    def local_path(self):
        """The file a URL path names, or None when it would step outside the root."""
        rel = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path).lstrip("/")
        root = os.path.realpath(self.server.root)
        path = os.path.realpath(os.path.join(root, rel))
        return path if path.startswith(root + os.sep) else None

    def fail(self, code, message):
        body = (message + "\n").encode()
        self.send_response(code)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format, *args):
        pass   # quiet: tests and downloads make many requests


def parse_range(header, size):
    """(start, end) inclusive for one 'bytes=a-b', 'bytes=a-' or 'bytes=-n'; None if unsatisfiable."""
    unit, _, spec = header.partition("=")
    first, dash, last = spec.strip().partition("-")
    if unit.strip() != "bytes" or not dash or "," in spec:
        return None
    try:
        if first == "":
            start, end = max(0, size - int(last)), size - 1       # suffix: the last n bytes
        else:
            start, end = int(first), min(int(last), size - 1) if last else size - 1
    except ValueError:
        return None
    return (start, end) if 0 <= start <= end else None


def serve(root, port=0, host="127.0.0.1"):
    """Serve root over HTTP from a daemon thread; return (server, port). Stop with server.shutdown()."""
    server = ThreadingHTTPServer((host, port), MirrorHandler)
    server.daemon_threads = True
    server.root = root
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, server.server_address[1]


def main(argv):
    args = {"out": None, "serve": -1, "seed": 0}
    sizes = {}
    if "--help" in argv or "-h" in argv:
        print(__doc__.strip() + "\n\nsizes (--name=N): " + " ".join(f"{k}={v}" for k, v in SIZES.items()))
        sys.exit(0)
    for arg in argv:
        name, eq, text = arg.lstrip("-").partition("=")
        if not (arg.startswith("--") and eq):
            sys.exit(f"expected --name=value, got {arg!r}")
        if name not in args and name not in SIZES:
            sys.exit(f"unknown option --{name}; known: --out --serve --seed " +
                     " ".join(f"--{k}" for k in SIZES))
        if name == "out":
            args["out"] = text
        elif not text.lstrip("-").isdigit():
            sys.exit(f"--{name}={text}: expected an integer")
        elif name in args:
            args[name] = int(text)
        else:
            sizes[name] = int(text)
    if not args["out"]:
        sys.exit("usage: python tests/tinyworld.py --out=DIR [--serve=PORT] [--seed=0] [--<size>=N]")
    try:
        build(args["out"], seed=args["seed"], **sizes)
    except ValueError as e:
        sys.exit(str(e))
    print(f"tinyworld: wrote the mirror to {args['out']}")
    if args["serve"] >= 0:
        server, port = serve(args["out"], args["serve"])
        print(f"serving on http://127.0.0.1:{port}\n"
              f"  HF_ENDPOINT=http://127.0.0.1:{port} "
              f"SLIMCHAT_FILES_ENDPOINT=http://127.0.0.1:{port}/files", flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            server.shutdown()


if __name__ == "__main__":
    main(sys.argv[1:])
