"""
evaluate.py: the benchmarks. Each task's loading, rendering and grading; CORE and bits-per-byte for
base models; categorical and generative chat evals and ChatCORE for chat models; a process sandbox
for generated code; and the report card that gathers every stage's logs.

reads:  the latest checkpoint of --stage and the tokenizer under $SLIMCHAT_HOME; task datasets from
        the hub and the CORE eval bundle through gpt.fetch_hub / gpt.fetch_file (REFERENCE §16, §17)
writes: $SLIMCHAT_HOME/eval/<stage>/<task>.jsonl  one record per example: prompt, output, verdict
        $SLIMCHAT_HOME/eval/<stage>/results.json  the numbers of this run
        $SLIMCHAT_HOME/logs/eval.jsonl            one summary line per run (the report reads it)
        $SLIMCHAT_HOME/report/report.md, report.json   with --report=1

smoke:    python evaluate.py --stage=sft --device=cpu --max_per_task=16
one GPU:  python evaluate.py --stage=base          (CORE + bpb; mid/sft/rl run the chat tasks)
torchrun: torchrun --standalone --nproc_per_node=8 evaluate.py --stage=sft   (examples split by rank)
report:   python evaluate.py --report=1

The training stages import the task classes (MMLU, ARC, GSM8K, ...) so that training and evaluation
render a task the same way. Importing this file does no work.
"""
import copy
import csv
import functools
import glob
import json
import math
import os
import platform
import random
import re
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass

import pyarrow.parquet as pq
import torch
import torch.distributed as dist
import torch.nn.functional as F

import bpe
import gpt

# ---------------------------------------------------------------------------
# knobs: edit here, or override any of them with --name=value
stage = "sft"              # base | mid | sft | rl: whose latest checkpoint to evaluate
tasks = ""                 # comma list; "" = the stage's default (base: CORE,bpb; others: the chat tasks)
max_per_task = -1          # examples per task (CORE task or chat task); -1 = all
batch_size = 8             # prompts per forward pass (categorical chat eval, bpb rows)
num_samples = 1            # samples per generative problem; a problem passes if any does (pass@k)
temperature = 0.0          # 0.0 = greedy decoding
top_k = 50                 # top-k sampling cutoff when temperature > 0
max_new_tokens = 512       # generation budget per sample
bpb_tokens = 10_485_760    # tokens per split for bits-per-byte (20 x 524,288, E's base_loss)
device = ""                # "" = autodetect (cuda > mps > cpu)
report = False             # True: write the report card from $SLIMCHAT_HOME/logs and exit
# ---------------------------------------------------------------------------

LETTERS = "ABCDEFGHIJ"     # answer letters; each is one byte, hence always one token
SHUFFLE_SEED = 42          # every hub task is presented in this fixed shuffled order (E: .shuffle(42))


# ===========================================================================
# tasks: one class per dataset. task[i] is a conversation {"messages": [...]} for bpe's renderer;
# task.evaluate(conversation, completion_text) grades a reply.

def read_rows(repo, filename):
    """All rows of one hub parquet file as dicts (downloaded once, then read from the cache)."""
    return pq.read_table(gpt.fetch_hub(repo, filename)).to_pylist()


def check_choice(value, allowed, what):
    if value not in allowed:
        raise ValueError(f"{what} must be one of {', '.join(map(str, allowed))}; got {value!r}")


class Task:
    """A list of rows rendered on access. Training-only tasks have no grader."""
    eval_type = "generative"

    def __init__(self, rows, shuffle=True):
        self.rows = list(rows)
        if shuffle:
            random.Random(SHUFFLE_SEED).shuffle(self.rows)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.render(self.rows[i])

    def render(self, row):
        return row

    def first(self, n):
        """The same task cut to its first n examples (all of them when it is shorter)."""
        head = copy.copy(self)
        head.rows = self.rows[:n]
        return head

    def evaluate(self, conversation, completion):
        raise ValueError(f"{type(self).__name__} is a training task: it has no grader")


def render_mc(question, choices):
    """The multiple-choice prompt. The letter comes after its choice with no space after '=', so in
    the prompt it is the same bare-letter token the assistant answers with (REFERENCE §2.3)."""
    lines = [f"Multiple Choice question: {question}"]
    lines += [f"- {choice}={letter}" for letter, choice in zip(LETTERS, choices)]
    return "\n".join(lines) + "\n\nRespond only with the letter of the correct answer."


def mc_conversation(question, choices, answer):
    """Conversation for a question whose correct choice is choices[answer]."""
    if not 2 <= len(choices) <= len(LETTERS):
        raise ValueError(f"a multiple-choice question needs 2..{len(LETTERS)} choices, got {len(choices)}")
    letters = list(LETTERS[:len(choices)])
    return {"messages": [{"role": "user", "content": render_mc(question, choices)},
                         {"role": "assistant", "content": letters[answer]}],
            "letters": letters}


class MultipleChoice(Task):
    """Graded by the letter alone; the categorical eval reads the letter logits."""
    eval_type = "categorical"

    def letters(self, conversation):
        return conversation["letters"]

    def evaluate(self, conversation, completion):
        return completion.strip() == conversation["messages"][-1]["content"]


class MMLU(MultipleChoice):
    """cais/mmlu 'all': 57 subjects, 4 choices, answer index 0-3. auxiliary_train is for training."""
    SPLITS = ("test", "validation", "dev", "auxiliary_train")

    def __init__(self, split):
        check_choice(split, self.SPLITS, "MMLU split")
        super().__init__(read_rows("cais/mmlu", f"all/{split}-00000-of-00001.parquet"))

    @staticmethod
    def render(row):
        row = row.get("train", row)   # older exports wrap auxiliary_train rows in a 'train' struct
        return mc_conversation(row["question"], row["choices"], row["answer"])


class ARC(MultipleChoice):
    """allenai/ai2_arc. Labels are usually A-D but some rows use 1-4 and some have 3 or 5 choices;
    we always show letters A.. and map the answer key through its position among the labels."""
    SUBSETS = ("ARC-Easy", "ARC-Challenge")
    SPLITS = ("train", "validation", "test")

    def __init__(self, subset, split):
        check_choice(subset, self.SUBSETS, "ARC subset")
        check_choice(split, self.SPLITS, "ARC split")
        super().__init__(read_rows("allenai/ai2_arc", f"{subset}/{split}-00000-of-00001.parquet"))

    @staticmethod
    def render(row):
        labels = list(row["choices"]["label"])
        if row["answerKey"] not in labels:
            raise ValueError(f"ARC row {row.get('id')}: answerKey {row['answerKey']!r} is not among {labels}")
        return mc_conversation(row["question"], list(row["choices"]["text"]), labels.index(row["answerKey"]))


FINAL_ANSWER = re.compile(r"#### (\-?[0-9\.\,]+)")


def final_answer(text):
    """The number after '#### ' (commas and a trailing full stop dropped), or None."""
    match = FINAL_ANSWER.search(text)
    return match.group(1).replace(",", "").rstrip(".") if match else None


def gsm8k_parts(answer):
    """GSM8K's worked answer as assistant parts: each <<expr=result>> calculator annotation becomes a
    python part (expr) and a python_output part (result), split on the last '='.
    'She sold 48/2 = <<48/2=24>>24 clips.' -> text 'She sold 48/2 = ', python '48/2',
    python_output '24', text '24 clips.'"""
    parts = []
    for k, piece in enumerate(re.split(r"<<(.*?)>>", answer)):
        if k % 2 == 0:
            if piece:
                parts.append({"type": "text", "text": piece})
            continue
        expr, eq, result = piece.rpartition("=")
        if not eq:
            raise ValueError(f"GSM8K annotation <<{piece}>> has no '=' (expected <<expr=result>>)")
        parts += [{"type": "python", "text": expr}, {"type": "python_output", "text": result}]
    return parts


class GSM8K(Task):
    """openai/gsm8k 'main': grade-school word problems; graded on the final '#### N'."""
    SPLITS = ("train", "test")

    def __init__(self, split):
        check_choice(split, self.SPLITS, "GSM8K split")
        super().__init__(read_rows("openai/gsm8k", f"main/{split}-00000-of-00001.parquet"))

    @staticmethod
    def render(row):
        return {"messages": [{"role": "user", "content": row["question"]},
                             {"role": "assistant", "content": gsm8k_parts(row["answer"])}]}

    def evaluate(self, conversation, completion):
        reference = final_answer(conversation["messages"][-1]["content"][-1]["text"])
        predicted = final_answer(completion)
        return predicted is not None and predicted == reference


def extract_code(completion):
    """The first ```python (or bare ```) block of a reply, else the whole reply."""
    match = re.search(r"```(?:python|py)?[ \t]*\n(.*?)```", completion, re.DOTALL)
    return match.group(1) if match else completion


class HumanEval(Task):
    """openai/openai_humaneval: write a function; graded by running the dataset's tests in the sandbox."""

    def __init__(self):
        super().__init__(read_rows("openai/openai_humaneval", "openai_humaneval/test-00000-of-00001.parquet"))

    @staticmethod
    def render(row):
        return {"messages": [{"role": "user", "content": row["prompt"]},
                             {"role": "assistant", "content": row["prompt"] + row["canonical_solution"]}],
                "entry_point": row["entry_point"], "test": row["test"], "prompt": row["prompt"]}

    def check(self, conversation, completion):
        """The solution is the prompt (its imports and helpers) and the reply's code; the sandbox runs the
        dataset's tests and check() apart from it."""
        solution = conversation["prompt"] + "\n" + extract_code(completion)
        return run_sandboxed(solution, judge={k: conversation[k] for k in ("prompt", "test", "entry_point")})

    def evaluate(self, conversation, completion):
        return self.check(conversation, completion).passed


def load_words():
    """The English word list (words_alpha.txt, one lowercase word a line)."""
    with open(gpt.fetch_file("words_alpha.txt"), encoding="utf-8") as f:
        words = [w.strip() for w in f if w.strip().isalpha()]
    if not words:
        raise ValueError("words_alpha.txt holds no words")
    return words


def word_seeds(size, split):
    """Per-example seeds; train and test draw from disjoint seed ranges (Random(-s) == Random(s),
    so negating the index, as E does, would repeat train examples in test)."""
    check_choice(split, ("train", "test"), "split")
    if size < 1:
        raise ValueError(f"size must be a positive number of examples, got {size}")
    offset = 0 if split == "train" else 10**9
    return [offset + i for i in range(size)]


BEE_TEMPLATES = [
    "How many {letter} are in the word {word}?",
    "How many times does the letter {letter} appear in {word}?",
    "Count the number of {letter} in {word}",
    "In the word {word}, how many times does {letter} occur?",
    "What is the count of the letter {letter} in {word}?",
    "how many {letter}s are there in {word}",
    "{word}: how many {letter}?",
    "¿Cuántas {letter} hay en la palabra {word}?",
    "Combien de {letter} y a-t-il dans le mot {word} ?",
    "Wie oft kommt der Buchstabe {letter} im Wort {word} vor?",
]


def spelling_bee_conversation(word, letter, question):
    """Spell the word out, counting hits, then check with the calculator tool, then '#### n'."""
    count, lines = 0, []
    for k, c in enumerate(word, 1):
        count += c == letter
        lines.append(f"{k}:{c}" + (f" hit! count={count}" if c == letter else ""))
    manual = (f"Let me spell '{word}' and count the letter '{letter}'.\n\n{word}:{','.join(word)}\n\n"
              + "\n".join(lines) + f"\n\nThat gives {count}. Let me double check with Python:\n\n")
    parts = [{"type": "text", "text": manual},
             {"type": "python", "text": f"'{word}'.count('{letter}')"},
             {"type": "python_output", "text": str(count)},
             {"type": "text", "text": f"\n\nPython agrees: {count}.\n\n#### {count}"}]
    return {"messages": [{"role": "user", "content": question},
                         {"role": "assistant", "content": parts}]}


class SpellingBee(Task):
    """'How many r in strawberry?': counting letters, graded on the final '#### N'."""

    def __init__(self, size, split):
        super().__init__(word_seeds(size, split), shuffle=False)
        self.words = load_words()

    def render(self, seed):
        rng = random.Random(seed)
        word = rng.choice(self.words)
        letter = rng.choice(word) if rng.random() < 0.9 else rng.choice("abcdefghijklmnopqrstuvwxyz")
        quote = rng.choice(["", "'", '"'])
        question = rng.choice(BEE_TEMPLATES).format(letter=quote + letter + quote, word=quote + word + quote)
        if rng.random() < 0.3:
            question = question.lower()
        return spelling_bee_conversation(word, letter, question)

    def evaluate(self, conversation, completion):
        reference = final_answer(conversation["messages"][-1]["content"][-1]["text"])
        return final_answer(completion) == reference


class SimpleSpelling(Task):
    """'Spell the word: apple' -> 'apple:a,p,p,l,e'; graded by exact match."""

    def __init__(self, size, split):
        super().__init__(word_seeds(size, split), shuffle=False)
        self.words = load_words()

    def render(self, seed):
        word = random.Random(seed).choice(self.words)
        return {"messages": [{"role": "user", "content": f"Spell the word: {word}"},
                             {"role": "assistant", "content": f"{word}:{','.join(word)}"}]}

    def evaluate(self, conversation, completion):
        return completion.strip() == conversation["messages"][-1]["content"]


class SmolTalk(Task):
    """HuggingFaceTB/smol-smoltalk: general conversations, some with a system message (training only)."""

    def __init__(self, split):
        check_choice(split, ("train", "test"), "SmolTalk split")
        super().__init__(read_rows("HuggingFaceTB/smol-smoltalk", f"data/{split}-00000-of-00001.parquet"))

    @staticmethod
    def render(row):
        return {"messages": row["messages"]}


def conversation_problem(messages):
    """What is wrong with a list of messages as a training conversation, or None."""
    if not isinstance(messages, list) or not messages:
        return "expected a non-empty JSON list of messages (or an object with a 'messages' list)"
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            return f"message {k} needs a role of system, user or assistant"
        if not isinstance(m.get("content"), str):
            return f"message {k} needs a string content"
    body = messages[1:] if messages[0]["role"] == "system" else messages
    for k, m in enumerate(body):
        if m["role"] != ("user", "assistant")[k % 2]:
            return "roles must alternate user, assistant, ... (after an optional first system message)"
    if len(body) < 2 or body[-1]["role"] != "assistant":
        return "a conversation must end with an assistant message"
    return None


OWN_MESSAGE_CHARS = 100_000   # longer messages of --data are cropped at load: no row holds more (2,048 tokens are
                              # about 10,000 chars), and rendering a 50 MB message took 9 s, every epoch


class CustomJSON(Task):
    """Conversations from a JSONL file: one JSON list of {role, content} messages a line (E's identity
    file) or one {"messages": [...]} object a line. Every line is checked when the file is loaded;
    a message over OWN_MESSAGE_CHARS is cropped to it, and the crops reported once."""

    def __init__(self, path):
        rows, cropped = [], []
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise ValueError(f"{path} line {lineno}: not UTF-8 (byte 0x{raw[e.start]:02x} at byte "
                                     f"{e.start + 1} of the line); save the file as UTF-8") from None
                if not line.strip():
                    continue
                try:
                    data = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path} line {lineno}: not valid JSON ({e})") from None
                except RecursionError:
                    raise ValueError(f"{path} line {lineno}: JSON nested too deeply to read; a conversation "
                                     "is a flat list of {role, content} messages") from None
                messages = data.get("messages") if isinstance(data, dict) else data
                problem = conversation_problem(messages)
                if problem:
                    raise ValueError(f"{path} line {lineno}: {problem}")
                for k, m in enumerate(messages):
                    if len(m["content"]) > OWN_MESSAGE_CHARS:
                        cropped.append((lineno, k, len(m["content"])))
                        messages[k] = dict(m, content=m["content"][:OWN_MESSAGE_CHARS])
                rows.append({"messages": messages})
        if not rows:
            raise ValueError(f"{path} holds no conversations")
        if cropped:
            lineno, k, size = cropped[0]
            gpt.print0(f"{path}: {len(cropped)} message(s) over {OWN_MESSAGE_CHARS:,} characters cropped to "
                       f"that, as no row holds more (first: line {lineno}, message {k}, {size:,} characters)")
        super().__init__(rows, shuffle=False)


def load_own_data(path):
    """A stage's --data=PATH conversations as a CustomJSON task; SystemExit naming the bad line."""
    try:
        return CustomJSON(path)
    except (OSError, ValueError) as e:   # ValueError includes a file that is not UTF-8
        raise SystemExit(f"--data={path}: {e}") from None


class TaskMixture:
    """Every example of every task, in one fixed shuffled order. A task listed twice is seen twice."""

    def __init__(self, parts):
        self.parts = list(parts)
        self.index = [(t, i) for t, part in enumerate(self.parts) for i in range(len(part))]
        random.Random(SHUFFLE_SEED).shuffle(self.index)

    def __len__(self):
        return len(self.index)

    def __getitem__(self, i):
        t, j = self.index[i]
        return self.parts[t][j]


# ===========================================================================
# the code sandbox. A program runs in a fresh interpreter inside bubblewrap: its own PID, network,
# IPC and UTS namespaces (and user namespace unless we are root), the system read-only, a small
# private /tmp as the only writable place, never as root, under limits on memory, CPU time,
# processes and output. Without bwrap the same child runs unisolated, after one warning. Inside,
# a thin in-process layer makes honest mistakes and plain escapes fail fast with a clear reason;
# it is no boundary (it can be undone), the namespaces are. A program passes only when the harness
# reports, with a per-run secret, that it returned. A whole program shares its interpreter with the
# harness, so it could find the secret; HumanEval's solution runs in a process of its own instead,
# and its tests in the harness (split() below): the solution can only answer the tests' calls.

SANDBOX_TIMEOUT = 5.0      # seconds of wall time per program (E, H: 5 s)
SANDBOX_MEMORY_MB = 256    # address-space limit (E, H: 256 MB)
SANDBOX_FILE_MB = 16       # largest file (stdout/stderr captures included) the program may write
SANDBOX_TMP_MB = 64        # size of the program's private /tmp under bwrap
SANDBOX_USER = 65534       # "nobody": whom the program runs as when the evaluator runs as root
SANDBOX_PYTHON = os.path.realpath(getattr(sys, "_base_executable", sys.executable))   # not the venv's

SANDBOX_PRELUDE = r'''
import builtins, io, json, os, posix, resource, shutil, signal, subprocess, _posixsubprocess, sys

class SandboxViolation(BaseException):   # BaseException: a bare `except Exception` cannot swallow it
    pass

def refuse(name):
    def refused(*args, **kwargs):
        raise SandboxViolation(name)
    return refused

def guard(tmp):
    """Second layer: refuse process and network functions, writes outside tmp, and such imports."""
    def inside(path, dir_fd=None):
        if not isinstance(path, (str, bytes, os.PathLike)):
            return False
        path = os.fsdecode(path)
        if dir_fd is not None:   # shutil.rmtree works relative to open directories (Linux: /proc names them)
            try:
                path = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), path)
            except OSError:
                return False
        real = os.path.realpath(path)
        return real == tmp or real.startswith(tmp + os.sep)

    def only_inside(name, fn, paths=1):   # rename, link and the like take two paths (given by position)
        def checked(*args, **kwargs):
            if len(args) < paths or not all(inside(path, kwargs.get("dir_fd")) for path in args[:paths]):
                raise SandboxViolation(f"{name} outside the temp dir")
            return fn(*args, **kwargs)
        return checked

    real_open, real_os_open = builtins.open, os.open
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    def guarded_open(file, mode="r", *args, **kwargs):
        if isinstance(file, int) or not any(c in mode for c in "wax+") or inside(file):
            return real_open(file, mode, *args, **kwargs)
        raise SandboxViolation("writing outside the temp dir")
    def guarded_os_open(path, flags, *args, **kwargs):
        if flags & write_flags and not inside(path, kwargs.get("dir_fd")):
            raise SandboxViolation("writing outside the temp dir")
        return real_os_open(path, flags, *args, **kwargs)
    builtins.open = io.open = guarded_open
    for module in (os, posix):
        module.open = guarded_os_open
        for name in ("remove", "unlink", "rmdir", "removedirs", "rename", "renames", "replace", "truncate",
                     "chmod", "chown", "lchown", "mkdir", "makedirs", "link", "symlink"):
            if hasattr(module, name):
                two = name in ("rename", "renames", "replace", "link", "symlink")
                setattr(module, name, only_inside(f"os.{name}", getattr(module, name), 2 if two else 1))
        # not os.register_at_fork: `import random` (tempfile, logging, ...) calls it
        for name in ("system", "popen", "fork", "forkpty", "vfork", "kill", "killpg", "execv", "execve",
                     "execl", "execle", "execlp", "execlpe", "execvp", "execvpe", "spawnl", "spawnle",
                     "spawnlp", "spawnlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe", "posix_spawn",
                     "posix_spawnp", "setuid", "setgid", "seteuid", "setegid", "chroot", "fchdir", "fchmod",
                     "fchown"):
            if hasattr(module, name):
                setattr(module, name, refuse(f"os.{name}"))
    for name in ("rmtree", "move", "chown"):
        setattr(shutil, name, only_inside(f"shutil.{name}", getattr(shutil, name)))
    for name in ("Popen", "run", "call", "check_call", "check_output", "getoutput", "getstatusoutput"):
        setattr(subprocess, name, refuse(f"subprocess.{name}"))
    _posixsubprocess.fork_exec = refuse("subprocess")

    blocked = {"socket", "_socket", "ssl", "ctypes", "_ctypes", "multiprocessing", "_multiprocessing", "pty",
               "resource", "urllib", "http", "ftplib", "smtplib"}
    class ImportBlocker:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in blocked:
                raise SandboxViolation(f"import {name}")
            return None
    for name in list(sys.modules):
        if name.split(".")[0] in blocked:
            del sys.modules[name]
    sys.meta_path.insert(0, ImportBlocker())

def limit(user, memory, cpu, fsize):
    if user >= 0:   # not root: RLIMIT_NPROC binds, and no host file or process is the program's own
        os.setgroups([])
        os.setgid(user)
        os.setuid(user)
    if memory > 0:   # macOS does not enforce RLIMIT_AS
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))   # SIGXCPU at cpu seconds, SIGKILL a second later
    resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

def no_new_processes():
    resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))   # no new processes or threads

def reporter(report_fd, secret):
    # bound now: a whole program may replace them (and any global of this module)
    write, exit_now, flush = os.write, os._exit, sys.stdout.flush
    def report(kind, detail=""):
        try:
            flush()
        except BaseException:
            pass
        try:
            write(report_fd, f"{secret} {kind}: {detail}"[:500].encode("utf-8", "replace"))
        except OSError:   # the program closed or replaced the report fd: no report, so no pass
            pass
        exit_now(0 if kind == "passed" else 1)
    return report

def ends_run(e):
    """(kind, detail) for an exception no test may catch: a refusal, memory, an exit; else None."""
    if isinstance(e, SandboxViolation):
        return "blocked", str(e)
    if isinstance(e, MemoryError):
        return "memory", "MemoryError"
    if isinstance(e, SystemExit):
        return "exited", f"SystemExit({e.code!r}) before the tests returned"
    return None

def run(source, namespace, report):
    """exec source; on any exception report why and end, else return."""
    try:
        exec(compile(source, "program.py", "exec"), namespace)
    except BaseException as e:
        report(*(ends_run(e) or ("error", f"{type(e).__name__}: {e}")))

def whole(report_fd, *limits):
    """A whole program in this interpreter; it passes when it returns. The program could search
    this interpreter for the secret and forge the report: HumanEval uses split() instead."""
    # stdin brings the run's secret, then the program; the program itself gets an empty stdin
    secret, _, source = sys.stdin.buffer.read().decode("utf-8").partition("\n")
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    limit(*limits)
    no_new_processes()
    os.set_inheritable(report_fd, False)
    report = reporter(report_fd, secret)
    guard(os.getcwd())
    run(source, {"__name__": "__main__", "__builtins__": builtins}, report)
    report("passed")

# HumanEval: the trusted harness T runs only the dataset's code (prompt, tests, check); the
# candidate's solution runs in a forked child U, which gets neither the secret (read after the fork)
# nor the report pipe (closed), and cannot reach into T (T is not dumpable: no ptrace, no
# /proc/T/mem or /proc/T/fd for the same user). Calls and values cross a pipe as tagged JSON that
# T decodes without running anything; a pass is T seeing check() return.

def encode(value):
    """value as JSON: scalars as themselves, everything else as [tag, items]; objects are refused."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, complex):
        return ["complex", [value.real, value.imag]]
    if isinstance(value, (bytes, bytearray)):
        return ["bytes", bytes(value).hex()]
    if isinstance(value, dict):
        return ["dict", [[encode(k), encode(v)] for k, v in value.items()]]
    for kind in (list, tuple, set, frozenset):
        if isinstance(value, kind):
            return [kind.__name__, [encode(v) for v in value]]
    raise Unsendable(f"a {type(value).__name__} cannot cross between the solution and the tests")

class Unsendable(Exception):
    pass

CONTAINERS = {"list": list, "tuple": tuple, "set": set, "frozenset": frozenset}

def decode(data):
    """encode's inverse, strict: builds builtin values only, so no code of the sender's runs."""
    if data is None or type(data) in (bool, int, float, str):
        return data
    if type(data) is not list or len(data) != 2 or type(data[1]) not in (list, str):
        raise ValueError("malformed value")
    tag, items = data
    if tag == "bytes":
        return bytes.fromhex(items)
    if type(items) is not list:
        raise ValueError("malformed value")
    if tag == "complex" and len(items) == 2 and all(type(x) in (int, float) for x in items):
        return complex(*items)
    if tag == "dict":
        return {decode(k): decode(v) for k, v in items}
    return CONTAINERS[tag](decode(v) for v in items)

def send(f, message):
    f.write(message if isinstance(message, bytes) else json.dumps(message).encode("utf-8") + b"\n")
    f.flush()

class Verdict(BaseException):   # T's tests may catch Exception, never this
    pass

def split(report_fd, *limits):
    limit(*limits)
    if sys.platform.startswith("linux"):   # before the fork: U must never ptrace T or open its /proc files
        import ctypes
        if ctypes.CDLL(None, use_errno=True).prctl(4, 0, 0, 0, 0) != 0:   # PR_SET_DUMPABLE, 0
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE, 0)")
    calls, u_calls = os.pipe()
    u_replies, replies = os.pipe()
    exit_now, pid = os._exit, os.fork()
    if pid == 0:
        try:
            untrusted(calls, replies)
        finally:   # whatever happens in U, it never goes on as T
            exit_now(1)
    os.close(calls), os.close(replies)
    no_new_processes()
    # U may signal T (the same user): SIGINT alone would raise inside the tests, which might catch it;
    # any other signal stops or ends T, so no report
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    secret, _, job = sys.stdin.buffer.read().decode("utf-8").partition("\n")
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    trusted(json.loads(job), pid, open(u_calls, "wb"), open(u_replies, "rb"), reporter(report_fd, secret))

def untrusted(calls, replies):
    """U: drop everything but its pipe to T, then run the solution and answer T's calls."""
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    low, high = sorted((calls, replies))
    os.closerange(3, low), os.closerange(low + 1, high), os.closerange(high + 1, 65536)
    no_new_processes()
    inbox, outbox = open(calls, "rb"), open(replies, "wb")
    def answer(message):
        try:   # the solution's prints, for the record
            sys.stdout.flush()
        except BaseException:
            pass
        send(outbox, message)
    def fail(kind, detail=""):
        answer(["fail", kind, str(detail)[:300]])
        os._exit(1)
    namespace = {"__name__": "__main__", "__builtins__": builtins}
    job = json.loads(inbox.readline())
    guard(os.getcwd())
    run(job["code"], namespace, fail)
    if not callable(namespace.get(job["entry_point"])):
        fail("error", f"NameError: the solution defines no function {job['entry_point']}")
    answer(["ready"])
    for line in inbox:
        args, kwargs = json.loads(line)
        try:
            result = namespace[job["entry_point"]](*decode(args), **decode(kwargs))
        except BaseException as e:
            if ends_run(e):
                fail(*ends_run(e))
            answer(["raise", type(e).__name__, str(e)[:1000]])   # the tests may expect it: raised there
            continue
        try:
            answer(json.dumps(["return", encode(result)]).encode("utf-8") + b"\n")
        except (Unsendable, ValueError, RecursionError) as e:   # ValueError: an int too long for str()
            fail("error", f"the result: {e}")
    os._exit(0)

def trusted(job, pid, to_u, from_u, report):
    """T: the dataset's prompt (for its helpers), tests and check(), the entry point a proxy to U."""
    failures = []
    def receive():
        line = from_u.readline(2**26)
        if not line:
            _, status = os.waitpid(pid, 0)
            raise Verdict(*ended(status))
        try:
            message = json.loads(line)
            if message[0] == "fail":   # U says why it failed; it can never say "passed"
                if message[1] not in ("blocked", "memory", "exited", "error"):
                    raise ValueError(message[1])
                raise Verdict(message[1], str(message[2]))
            return message[0], [decode(item) for item in message[1:]]
        except (ValueError, TypeError, KeyError, IndexError, RecursionError) as e:
            raise Verdict("error", f"the solution's process sent a malformed reply ({type(e).__name__})")

    def proxy(*args, **kwargs):
        if failures:
            raise failures[0]
        try:
            send(to_u, [encode(list(args)), encode(kwargs)])
            kind, items = receive()
            if kind == "return":
                return items[0]
            error = exception(*items) if kind == "raise" else None
        except BaseException as e:   # only the candidate's own exception reaches the tests as theirs
            failures.append(e if isinstance(e, Verdict) else Verdict("error", f"{type(e).__name__}: {e}"))
            raise failures[-1]   # kept too: a test that swallows it still fails
        if error is None:
            failures.append(Verdict("error", "the solution's process sent a malformed reply"))
            raise failures[-1]
        raise error
    send(to_u, {"code": job["code"], "entry_point": job["entry_point"]})
    namespace = {"__name__": "__main__", "__builtins__": builtins}
    try:
        exec(compile(job["prompt"], "prompt.py", "exec"), namespace)   # while U runs the solution
        if receive()[0] != "ready":
            raise Verdict("error", "the solution's process sent a malformed reply")
        namespace[job["entry_point"]] = proxy
        exec(compile(job["test"], "test.py", "exec"), namespace)
        exec(f"check({job['entry_point']})", namespace)
        if failures:
            raise failures[0]
    except Verdict as e:
        report(*e.args)
    except MemoryError:
        report("memory", "MemoryError")
    except BaseException as e:
        report("error", f"{type(e).__name__}: {e}")
    os.kill(pid, signal.SIGKILL)
    report("passed")

def ended(status):
    """(kind, detail) for U's end before it answered."""
    if os.WIFSIGNALED(status):
        name = signal.Signals(os.WTERMSIG(status)).name
        return "killed", {"SIGXCPU": "cpu time limit", "SIGXFSZ": "output too large"}.get(name, name)
    return "exited", f"status {os.waitstatus_to_exitcode(status)} before the tests returned"

def exception(name, message):
    """The candidate's exception as the tests can catch it: the builtin of that name, else an Exception."""
    kind = getattr(builtins, str(name), None)
    if isinstance(kind, type) and issubclass(kind, Exception):
        try:
            return kind(message)
        except TypeError:   # UnicodeDecodeError and the like take more arguments
            pass
    return Exception(f"{name}: {message}")

{"whole": whole, "split": split}[sys.argv[1]](*map(int, sys.argv[2:7]))
'''


@functools.lru_cache(maxsize=None)
def bwrap_command():
    """bubblewrap's command line for the sandbox, or None (with one warning) where it cannot run.
    As root there is no user namespace: bwrap would map the program to the host's root, for whom
    RLIMIT_NPROC does not bind; the harness becomes nobody instead. A Python outside /usr (pyenv,
    conda) is bound where it lives, below directories made traversable for nobody."""
    bwrap = shutil.which("bwrap")
    cmd = [bwrap, "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--die-with-parent",
           "--clearenv", "--ro-bind", "/usr", "/usr", "--ro-bind-try", "/etc", "/etc"]
    cmd += [] if os.geteuid() == 0 else ["--unshare-user"]
    for path in ("/bin", "/sbin", "/lib", "/lib32", "/lib64"):
        if os.path.islink(path):
            cmd += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            cmd += ["--ro-bind", path, path]
    prefix = os.path.dirname(os.path.dirname(SANDBOX_PYTHON))   # .../bin/python3.11 -> ...
    if not (prefix + "/").startswith("/usr/"):
        parents, parent = [], os.path.dirname(prefix)
        while parent != "/":
            parents, parent = [parent] + parents, os.path.dirname(parent)
        for parent in parents:
            cmd += ["--perms", "0755", "--dir", parent]
        cmd += ["--ro-bind", prefix, prefix]
    cmd += ["--proc", "/proc", "--dev", "/dev", "--perms", "1777", "--size", str(SANDBOX_TMP_MB * 2**20),
            "--tmpfs", "/tmp", "--chdir", "/tmp", "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", "/tmp",
            "--setenv", "TMPDIR", "/tmp"]
    why = "bwrap is not installed" if not bwrap else None
    if bwrap:
        probe = subprocess.run(cmd + [SANDBOX_PYTHON, "-I", "-S", "-c", "import os"], capture_output=True,
                               text=True, env={}, timeout=60)
        why = probe.returncode and f"bwrap failed here: {probe.stderr.strip()[:200]}"
    if why:
        print(f"warning: generated code (HumanEval) runs WITHOUT OS isolation ({why}); only resource limits "
              "and in-process guards, which a hostile program can undo, stand between it and this machine. "
              "Install bubblewrap (Debian/Ubuntu: apt-get install bubblewrap; Fedora: dnf install bubblewrap) "
              "and let it create namespaces (README: the code sandbox).", file=sys.stderr, flush=True)
        return None
    return cmd


@dataclass
class SandboxResult:
    passed: bool
    reason: str            # "passed", "timeout ...", "memory", "blocked: ...", "error: ...", "exited: ...", "killed: ..."
    stdout: str = ""
    stderr: str = ""
    isolated: bool = True  # ran under bubblewrap

    def __bool__(self):
        return self.passed


def run_sandboxed(code, timeout=SANDBOX_TIMEOUT, memory_mb=SANDBOX_MEMORY_MB, isolated=True, judge=None):
    """Run a Python program in a sandboxed child process; never raises for anything the program does.
    judge={"prompt", "test", "entry_point"} (HumanEval): code is only the candidate's solution, run in
    a child of the harness; the harness runs the tests and check() against it, so a pass cannot be
    forged from inside the solution's interpreter. isolated=False skips bubblewrap (the tests use it
    to see what the fallback holds)."""
    bwrap = bwrap_command() if isolated else None
    secret = secrets.token_hex(16)
    memory = memory_mb * 2**20 if sys.platform.startswith("linux") else 0
    limits = [str(memory), str(math.ceil(timeout) + 1), str(SANDBOX_FILE_MB * 2**20)]
    # root runs the program as nobody, unisolated too if nobody can reach this Python's files
    user = SANDBOX_USER if os.geteuid() == 0 and (bwrap or others_can_enter(SANDBOX_PYTHON)) else -1
    report_r, report_w = os.pipe()
    with tempfile.TemporaryDirectory(prefix="slimchat-sandbox-") as tmp:
        work = os.path.join(tmp, "work")   # the program's cwd without bwrap (a tmpfs /tmp with it)
        os.mkdir(work)
        if user >= 0:
            os.chmod(tmp, 0o711)
            os.chown(work, user, user)
        argv = [SANDBOX_PYTHON, "-I", "-S", "-c", SANDBOX_PRELUDE, "split" if judge else "whole", str(report_w),
                str(user), *limits]
        job = json.dumps(dict(judge, code=code)) if judge else code
        env = {} if bwrap else {"PATH": "/usr/bin:/bin", "HOME": work, "TMPDIR": work}
        # stdout/stderr go to files, not pipes: RLIMIT_FSIZE then also caps a program that prints forever
        with open(os.path.join(tmp, "stdout"), "w+b") as out, open(os.path.join(tmp, "stderr"), "w+b") as err:
            proc = subprocess.Popen((bwrap or []) + argv, cwd=work, stdin=subprocess.PIPE, stdout=out,
                                    stderr=err, env=env, pass_fds=(report_w,), start_new_session=True)
            os.close(report_w)
            try:   # the harness reads all of it before anything else
                proc.stdin.write(f"{secret}\n{job}".encode("utf-8", "replace"))
                proc.stdin.close()
            except BrokenPipeError:   # it did not start; its status says why
                pass
            timed_out = not ended_within(proc, timeout)
            kill_group(proc)
            out.seek(0), err.seek(0)
            stdout, stderr = (f.read()[-4096:].decode("utf-8", "replace") for f in (out, err))
    os.set_blocking(report_r, False)
    with open(report_r, "rb") as f:
        report = (f.read(65536) or b"").decode("utf-8", "replace")
    report = report.partition(f"{secret} ")[2] if secret in report else ""   # anything else is forged
    passed, reason = sandbox_verdict(proc.returncode, report, timed_out, timeout)
    return SandboxResult(passed, reason, stdout, stderr, bwrap is not None)


def ended_within(proc, timeout):
    """Whether proc ended within timeout seconds. Linux: wait on a pidfd, because Popen.wait(timeout)
    polls with sleeps doubling up to 50 ms, which made a 45 ms program take 65."""
    try:
        pidfd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):   # macOS, or a kernel before 5.3
        try:
            proc.wait(timeout)
            return True
        except subprocess.TimeoutExpired:
            return False
    try:
        return bool(select.select([pidfd], [], [], timeout)[0])
    finally:
        os.close(pidfd)


def others_can_enter(path):
    """Whether other users may pass through every directory above path (pyenv under /root: no)."""
    parent = os.path.dirname(path)
    while parent != "/" and os.stat(parent).st_mode & 0o001:
        parent = os.path.dirname(parent)
    return parent == "/"


def kill_group(proc):
    """SIGKILL the child's whole session (under bwrap the PID namespace then takes everything with it)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def sandbox_verdict(returncode, report, timed_out, timeout):
    """(passed, reason) from the harness's report ("kind: detail") and how the child ended."""
    kind, _, detail = report.partition(": ")
    if timed_out:
        return False, f"timeout after {timeout:g}s"
    if kind == "passed" and returncode == 0:
        return True, "passed"
    if kind == "memory":
        return False, "memory"
    if kind and kind != "passed":
        return False, f"{kind}: {detail}"
    signum = -returncode if returncode < 0 else returncode - 128   # bwrap exits 128 + the signal's number
    if signum in {s.value for s in signal.Signals}:
        meaning = {"SIGXCPU": "cpu time limit", "SIGXFSZ": "output too large", "SIGKILL": "killed"}
        name = signal.Signals(signum).name
        return False, f"killed: {meaning.get(name, name)}"
    return False, f"exited: status {returncode} before the tests returned"


# ===========================================================================
# chat evals: categorical (letter logits at <|assistant_start|>) and generative (Engine)

def dist_rank_world():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def model_device(model):
    return next(model.parameters()).device


def crop_left(ids, max_len):
    """Keep the last max_len tokens (the end of a prompt is what the next token depends on)."""
    return ids[-max_len:] if len(ids) > max_len else ids


def letter_ids(tokenizer, letters):
    ids = [tokenizer.encode(letter) for letter in letters]
    for letter, tok in zip(letters, ids):
        if len(tok) != 1:
            raise ValueError(f"answer letter {letter!r} encodes to {len(tok)} tokens; it must be one")
    return [tok[0] for tok in ids]


def categorical_eval(task, model, tokenizer, indices, batch_size):
    """One record per example: the answer letter with the highest logit at the assistant start."""
    device, max_len = model_device(model), model.config.sequence_len
    records = []
    for start in range(0, len(indices), batch_size):
        batch = indices[start:start + batch_size]
        conversations = [task[i] for i in batch]
        prompts = [crop_left(tokenizer.render_for_completion(c), max_len) for c in conversations]
        width = max(map(len, prompts))
        x = torch.tensor([p + [tokenizer.bos_id] * (width - len(p)) for p in prompts], device=device)
        with torch.no_grad():
            logits = model(x)                                      # (B, T, V)
        for row, (i, conversation, prompt) in enumerate(zip(batch, conversations, prompts)):
            letters = task.letters(conversation)
            scores = logits[row, len(prompt) - 1, letter_ids(tokenizer, letters)]
            answer = letters[int(scores.argmax())]
            records.append({"index": i, "prompt": tokenizer.decode(prompt), "output": answer,
                            "verdict": bool(task.evaluate(conversation, answer))})
    return records


def generative_eval(task, tokenizer, engine, indices, num_samples, max_new_tokens, temperature, top_k):
    """One record per problem: num_samples replies decoded in one batch; passes if any reply does."""
    records, max_len = [], engine.model.config.sequence_len
    for i in indices:
        conversation = task[i]
        prompt = crop_left(tokenizer.render_for_completion(conversation), max_len)
        sequences, _ = engine.generate_batch(prompt, num_samples=num_samples, max_tokens=max_new_tokens,
                                             temperature=temperature, top_k=top_k, seed=SHUFFLE_SEED + i)
        outputs = [tokenizer.decode(seq[len(prompt):]) for seq in sequences]
        grade = getattr(task, "check", task.evaluate)   # HumanEval's check also says why (a SandboxResult)
        results = [grade(conversation, out) for out in outputs]
        verdicts = [bool(r) for r in results]
        records.append({"index": i, "prompt": tokenizer.decode(prompt),
                        "output": outputs[0] if num_samples == 1 else outputs,
                        "verdict": any(verdicts), "passes": sum(verdicts)})
        if isinstance(results[0], SandboxResult):   # HumanEval: why each program passed or failed
            reasons = [r.reason for r in results]
            records[-1]["reason"] = reasons[0] if num_samples == 1 else reasons
    return records


def gather_records(records):
    """Every rank's records, on every rank, in index order."""
    if dist_rank_world()[1] == 1:
        return records
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, records)
    return sorted((r for part in everyone for r in part), key=lambda r: (r.get("task", ""), r["index"]))


def run_chat_eval(task, model, tokenizer, engine, max_problems=-1, batch_size=8, num_samples=1,
                  max_new_tokens=512, temperature=0.0, top_k=50, records=None):
    """Accuracy on the first max_problems examples (-1 = all), split across ranks: the fraction of
    letters right (categorical) or of problems with a passing sample (generative, pass@num_samples).
    Per-example records of all ranks are appended to `records` when given."""
    rank, world = dist_rank_world()
    n = len(task) if max_problems < 0 else min(len(task), max_problems)
    indices = list(range(rank, n, world))
    if task.eval_type == "categorical":
        mine = categorical_eval(task, model, tokenizer, indices, batch_size)
    else:
        mine = generative_eval(task, tokenizer, engine, indices, num_samples, max_new_tokens,
                               temperature, top_k)
    passed = sum_over_ranks([sum(r["verdict"] for r in mine)], model_device(model))[0]
    if records is not None:
        records.extend(gather_records(mine))
    return passed / max(1, n)


def sum_over_ranks(values, device):
    """Elementwise sum of a list of numbers over all ranks (plain floats back)."""
    if dist_rank_world()[1] == 1:
        return [float(v) for v in values]
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


CHATCORE_BASELINES = {"ARC-Easy": 0.25, "ARC-Challenge": 0.25, "MMLU": 0.25,   # 4-way guessing
                      "GSM8K": 0.0, "HumanEval": 0.0, "SpellingBee": 0.0}        # open-ended


def chatcore(accuracies):
    """Mean centered accuracy over the six chat tasks (REFERENCE §9.2, E's set with SpellingBee);
    None unless every one of them was measured."""
    if not all(name in accuracies for name in CHATCORE_BASELINES):
        return None
    centered = [(accuracies[n] - b) / (1 - b) for n, b in CHATCORE_BASELINES.items()]
    return sum(centered) / len(centered)


# ===========================================================================
# bits per byte: a tokenizer-independent loss (REFERENCE §0.13)

@torch.no_grad()   # no graph: at d20 x 32 rows x 2048 one val batch's saved activations are ~74 GB
def evaluate_bpb(model, batches, steps, token_bytes):
    """Sum of the loss in nats over target tokens that stand for bytes, divided by ln 2 times their
    byte count, over `steps` (x, y) batches and all ranks. Targets < 0 and special tokens
    (0 bytes) are left out of both sums."""
    device = model_device(model)
    token_bytes = torch.as_tensor(token_bytes, device=device)
    nats, nbytes = 0.0, 0.0
    for _, (x, y) in zip(range(steps), batches):
        loss = model(x, y, loss_reduction="none").reshape(-1)     # (B*T,) nats per target
        y = y.reshape(-1)
        counted = token_bytes[y.clamp(min=0)] * (y >= 0)
        nats += (loss * (counted > 0)).sum().item()
        nbytes += counted.sum().item()
    nats, nbytes = sum_over_ranks([nats, nbytes], device)
    if nbytes == 0:
        raise ValueError("bits per byte: no target bytes seen (no batches, or only special tokens)")
    return nats / (math.log(2) * nbytes)


PRETRAIN_REPO = "karpathy/fineweb-edu-100b-shuffle"
TRAIN_SHARD, VAL_SHARD = "shard_00000.parquet", "shard_01822.parquet"


def pretrain_shard(name):
    """A pretraining shard: the copy pretrain.py downloaded to $SLIMCHAT_HOME/data, else the hub's."""
    local = os.path.join(gpt.home(), "data", name)
    return local if os.path.exists(local) else gpt.fetch_hub(PRETRAIN_REPO, name)


def shard_batches(tokenizer, path, batch_size, seq_len, device, rank=0, world=1):
    """Endless (inputs, targets) batches of one text shard: documents with BOS in front, concatenated
    and cut into rows of seq_len + 1 tokens; rank r takes rows r, r + world, ..."""
    stream, rows, row_number = [], [], 0
    while True:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=128, columns=["text"]):
            for ids in tokenizer.encode_batch(batch.column(0).to_pylist()):
                stream += [tokenizer.bos_id] + ids
                while len(stream) >= seq_len + 1:
                    if row_number % world == rank:
                        rows.append(stream[:seq_len + 1])
                    stream, row_number = stream[seq_len + 1:], row_number + 1
                    if len(rows) == batch_size:
                        t = torch.tensor(rows, dtype=torch.long, device=device)
                        yield t[:, :-1], t[:, 1:]
                        rows = []


def split_bpb(model, tokenizer, tokens, rows_per_batch):
    """{'train_bpb', 'val_bpb'} over about `tokens` tokens of each split."""
    rank, world = dist_rank_world()
    seq_len, device = model.config.sequence_len, model_device(model)
    steps = max(1, tokens // (rows_per_batch * seq_len * world))
    token_bytes = tokenizer.token_bytes()
    result = {}
    for split, name in (("train", TRAIN_SHARD), ("val", VAL_SHARD)):
        batches = shard_batches(tokenizer, pretrain_shard(name), rows_per_batch, seq_len, device, rank, world)
        with torch.no_grad():
            result[f"{split}_bpb"] = evaluate_bpb(model, batches, steps, token_bytes)
    return result


# ===========================================================================
# CORE (REFERENCE §9.1, §16): 22 in-context tasks of DCLM, scored by the base model's losses

CORE_TASKS = [  # label, file under eval_bundle/eval_data/, kind, few-shot examples, continuation delimiter
    ("hellaswag_zeroshot", "language_understanding/hellaswag.jsonl", "multiple_choice", 0, " "),
    ("jeopardy", "world_knowledge/jeopardy_all.jsonl", "language_modeling", 10, "\nAnswer: "),
    ("bigbench_qa_wikidata", "world_knowledge/bigbench_qa_wikidata.jsonl", "language_modeling", 10, " "),
    ("arc_easy", "world_knowledge/arc_easy.jsonl", "multiple_choice", 10, "\nAnswer: "),
    ("arc_challenge", "world_knowledge/arc_challenge.jsonl", "multiple_choice", 10, "\nAnswer: "),
    ("copa", "commonsense_reasoning/copa.jsonl", "multiple_choice", 0, " "),
    ("commonsense_qa", "commonsense_reasoning/commonsense_qa.jsonl", "multiple_choice", 10, " "),
    ("piqa", "commonsense_reasoning/piqa.jsonl", "multiple_choice", 10, "\nAnswer: "),
    ("openbook_qa", "commonsense_reasoning/openbook_qa.jsonl", "multiple_choice", 0, " "),
    ("lambada_openai", "language_understanding/lambada_openai.jsonl", "language_modeling", 0, " "),
    ("hellaswag", "language_understanding/hellaswag.jsonl", "multiple_choice", 10, " "),
    ("winograd", "language_understanding/winograd_wsc.jsonl", "schema", 0, " "),
    ("winogrande", "language_understanding/winogrande.jsonl", "schema", 0, " "),
    ("bigbench_dyck_languages", "symbolic_problem_solving/bigbench_dyck_languages.jsonl", "language_modeling", 10, " "),
    ("agi_eval_lsat_ar", "symbolic_problem_solving/agi_eval_lsat_ar.jsonl", "multiple_choice", 3, " "),
    ("bigbench_cs_algorithms", "symbolic_problem_solving/bigbench_cs_algorithms.jsonl", "language_modeling", 10, " "),
    ("bigbench_operators", "symbolic_problem_solving/bigbench_operators.jsonl", "language_modeling", 10, " "),
    ("bigbench_repeat_copy_logic", "symbolic_problem_solving/bigbench_repeat_copy_logic.jsonl", "language_modeling", 10, " "),
    ("squad", "reading_comprehension/squad.jsonl", "language_modeling", 10, " "),
    ("coqa", "reading_comprehension/coqa.jsonl", "language_modeling", 0, " "),
    ("boolq", "reading_comprehension/boolq.jsonl", "multiple_choice", 10, "\nAnswer: "),
    ("bigbench_language_identification", "language_understanding/bigbench_language_identification.jsonl", "multiple_choice", 10, " "),
]
CORE_DATA_SEED = 1337      # examples are shuffled with this seed, then cut to max_per_task
CORE_FEWSHOT_SEED = 1234   # example i draws its shots with Random(1234 + i)


def safe_extract(zip_path, out_dir):
    """Unzip, refusing members that would land outside out_dir (absolute paths, '..', symlinks)."""
    root = os.path.realpath(out_dir)
    with zipfile.ZipFile(zip_path) as zf:
        for info in zf.infolist():
            target = os.path.realpath(os.path.join(root, info.filename))
            if target != root and not target.startswith(root + os.sep):
                raise ValueError(f"{zip_path}: member {info.filename!r} would unpack outside {out_dir}")
            if (info.external_attr >> 16) & 0o170000 == 0o120000:
                raise ValueError(f"{zip_path}: member {info.filename!r} is a symlink")
        zf.extractall(root)


def core_bundle():
    """The unpacked eval bundle, $SLIMCHAT_HOME/eval_bundle/, fetched and unzipped on first use.
    The unzip goes to a private temp dir that is renamed into place, so concurrent ranks or a killed
    run never leave a half-unpacked bundle behind."""
    dest = os.path.join(gpt.home(), "eval_bundle")
    if os.path.isdir(dest):
        return dest
    zip_path = gpt.fetch_file("eval_bundle.zip")
    tmp = tempfile.mkdtemp(prefix=".eval_bundle-", dir=gpt.home())
    try:
        safe_extract(zip_path, tmp)
        unpacked = os.path.join(tmp, "eval_bundle")
        if not os.path.isdir(unpacked):
            raise ValueError(f"{zip_path} has no top-level eval_bundle/ folder (layout: REFERENCE.md §16)")
        try:
            os.rename(unpacked, dest)
        except OSError:
            if not os.path.isdir(dest):   # else another process renamed its copy first: use that
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def core_baselines(bundle):
    """Random-guess accuracy in percent per task label, from the bundle's eval_meta_data.csv."""
    with open(os.path.join(bundle, "eval_meta_data.csv"), newline="", encoding="utf-8") as f:
        return {row["Eval Task"].strip(): float(row["Random baseline"]) for row in csv.DictReader(f)}


def load_core_data(bundle, filename):
    with open(os.path.join(bundle, "eval_data", filename), encoding="utf-8") as f:
        data = [json.loads(line) for line in f if line.strip()]
    random.Random(CORE_DATA_SEED).shuffle(data)
    return data


def core_texts(item, shots, kind, delimiter):
    """The prompts the reference renders for one item (REFERENCE §14.1): shots, each followed by a blank
    line, then the item. MC: one prompt per choice; schema: one per context option; LM: the prompt
    without its continuation, stripped, then with it. Data is used as it is, except that LM contexts
    are stripped at both ends (Jinja's `trim`), so a context ending in a space does not put a second
    space before the continuation."""
    if kind == "multiple_choice":
        context = "".join(f"{s['query']}{delimiter}{s['choices'][s['gold']]}\n\n" for s in shots)
        return [context + item["query"] + delimiter + choice for choice in item["choices"]]
    if kind == "schema":
        context = "".join(f"{s['context_options'][s['gold']]}{delimiter}{s['continuation']}\n\n" for s in shots)
        return [context + option + delimiter + item["continuation"] for option in item["context_options"]]
    if kind == "language_modeling":
        context = "".join(f"{s['context'].strip()}{delimiter}{s['continuation']}\n\n" for s in shots)
        prompt = context + item["context"].strip() + delimiter
        return [prompt.strip(), prompt + item["continuation"]]
    raise ValueError(f"unknown CORE task type {kind!r}")


def common_length(seqs, step):
    """How many leading (step 1) or trailing (step -1) tokens every sequence shares."""
    shortest = min(map(len, seqs))
    positions = range(shortest) if step == 1 else range(-1, -shortest - 1, -1)
    return next((k for k, p in enumerate(positions) if len({s[p] for s in seqs}) > 1), shortest)


def core_spans(tokenizer, texts, kind):
    """Token sequences (BOS first) and the [start, end) span of each one's continuation tokens, as the
    reference finds them. MC: the tokens after the prefix all choices share. Schema: the suffix all
    options share. LM: the tokens after the stripped prompt without the continuation (a prefix of
    the full prompt, except in tokenizations the reference would assert on: then where they part)."""
    seqs = [[tokenizer.bos_id] + tokenizer.encode(text) for text in texts]
    if kind == "language_modeling":
        full = seqs[1]
        return [full], [(min(common_length(seqs, 1), len(full) - 1), len(full))]
    if kind == "multiple_choice":
        common = common_length(seqs, 1)
        return seqs, [(min(common, len(s) - 1), len(s)) for s in seqs]
    suffix = max(1, min(common_length(seqs, -1), min(map(len, seqs)) - 1))
    return seqs, [(len(s) - suffix, len(s)) for s in seqs]


def score_spans(model, seqs, spans, pad_id):
    """For each sequence: (mean loss over its span, whether greedy argmax reproduces the span)."""
    max_len = model.config.sequence_len
    cropped = []
    for seq, (start, end) in zip(seqs, spans):
        cut = max(0, len(seq) - max_len)   # too long: keep the end, where the continuation is
        cropped.append((seq[cut:], max(1, start - cut), end - cut))
    width = max(len(s) for s, _, _ in cropped)
    x = torch.tensor([s + [pad_id] * (width - len(s)) for s, _, _ in cropped], device=model_device(model))
    with torch.no_grad():
        logits = model(x)                                          # (B, T, V)
    losses = F.cross_entropy(logits[:, :-1].transpose(1, 2), x[:, 1:], reduction="none")  # (B, T-1)
    hits = logits[:, :-1].argmax(-1) == x[:, 1:]                   # (B, T-1)
    return [(losses[b, start - 1:end - 1].mean().item(), bool(hits[b, start - 1:end - 1].all()))
            for b, (_, start, end) in enumerate(cropped)]


def core_item_correct(model, tokenizer, item, shots, kind, delimiter):
    """(correct?, the option the model chose) for one item."""
    texts = core_texts(item, shots, kind, delimiter)
    seqs, spans = core_spans(tokenizer, texts, kind)
    scores = score_spans(model, seqs, spans, tokenizer.bos_id)
    if kind == "language_modeling":
        return scores[0][1], item["continuation"]
    choice = min(range(len(scores)), key=lambda k: scores[k][0])
    options = item["choices"] if kind == "multiple_choice" else item["context_options"]
    return choice == item["gold"], options[choice]


def core_task_accuracy(model, tokenizer, data, kind, num_shots, delimiter, max_per_task=-1, records=None):
    """Accuracy over the first max_per_task items of shuffled `data`, split across ranks. As in the
    reference, the task is cut first and shots come from what is left (never the item itself)."""
    rank, world = dist_rank_world()
    data = data if max_per_task < 0 else data[:max_per_task]
    n = len(data)
    mine = []
    for i in range(rank, n, world):
        # positions among the other items; position p >= i is item p + 1 (no O(n) list per item)
        picks = random.Random(CORE_FEWSHOT_SEED + i).sample(range(len(data) - 1), min(num_shots, len(data) - 1))
        shots = [data[p + (p >= i)] for p in picks]
        correct, output = core_item_correct(model, tokenizer, data[i], shots, kind, delimiter)
        prompt = data[i].get("query") or data[i].get("context") or data[i]["context_options"]
        mine.append({"index": i, "prompt": prompt, "output": output, "verdict": bool(correct)})
    correct = sum_over_ranks([sum(r["verdict"] for r in mine)], model_device(model))[0]
    if records is not None:
        records.extend(gather_records(mine))
    return correct / max(1, n)


def centered(accuracy, baseline_percent):
    """0 at random guessing, 1 at perfect: (acc - b) / (1 - b) with b the baseline fraction."""
    b = 0.01 * baseline_percent
    return (accuracy - b) / (1 - b)


def evaluate_core(model, tokenizer, bundle=None, core_tasks=CORE_TASKS, max_per_task=-1, records=None):
    """{'CORE': mean centered accuracy, 'tasks': {label: {accuracy, centered, baseline}}}.
    records, when given, maps each label to its list of per-example records."""
    bundle = bundle or core_bundle()
    baselines = core_baselines(bundle)
    results = {}
    for label, filename, kind, num_shots, delimiter in core_tasks:
        if label not in baselines:
            raise ValueError(f"{bundle}/eval_meta_data.csv has no random baseline for {label!r}")
        task_records = [] if records is not None else None
        t0 = time.time()
        accuracy = core_task_accuracy(model, tokenizer, load_core_data(bundle, filename), kind, num_shots,
                                      delimiter, max_per_task, task_records)
        results[label] = {"accuracy": accuracy, "centered": centered(accuracy, baselines[label]),
                          "baseline": baselines[label]}
        if records is not None:
            records[label] = task_records
        gpt.print0(f"CORE {label:<34} accuracy {accuracy:.4f}  centered {results[label]['centered']:+.4f}  "
                   f"({time.time() - t0:.1f}s)")
    core = sum(r["centered"] for r in results.values()) / len(results)
    return {"CORE": core, "tasks": results}


# ===========================================================================
# the report card: every stage's logs, checkpoints' configs and eval results in one page

REPORT_STAGES = [("base", "BASE"), ("mid", "MID"), ("sft", "SFT"), ("rl", "RL")]
REPORT_ROWS = ["CORE", "ARC-Challenge", "ARC-Easy", "GSM8K", "HumanEval", "MMLU", "SpellingBee", "ChatCORE"]
CURVE_KEYS = ("loss", "bpb", "reward", "pass@1", "_acc")   # logged series containing one of these get a chart
CODE_EXTENSIONS = (".py", ".md", ".sh", ".html", ".css", ".js", ".txt", ".ini")
ROOT = os.path.dirname(os.path.abspath(__file__))


def read_jsonl(path):
    """The JSON objects of a log; a torn last line (a run killed mid-write) is skipped."""
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                records.append(record)
    return records


def latest_meta(home_dir, stage_name):
    """The meta JSON of a stage's newest readable checkpoint (any tag), or None."""
    metas = glob.glob(os.path.join(home_dir, "checkpoints", stage_name, "*", "meta_*.json"))
    for path in sorted(metas, key=os.path.getmtime, reverse=True):
        try:
            with open(path, encoding="utf-8") as f:
                return json.load(f)
        except (OSError, ValueError):   # a damaged meta: the checkpoint loader warns about it
            continue
    return None


def stage_summary(records, meta):
    """Config, time, final metrics and loss curves of one stage's training log."""
    curves, final = {}, {}
    for r in records:
        if "config" in r:   # a run's start line: settings, not metrics
            meta = meta or {"config": r["config"]}
            continue
        for key, value in r.items():
            if key in ("step", "time") or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            final[key] = value
            if "step" in r and any(word in key for word in CURVE_KEYS) and math.isfinite(value):
                curves.setdefault(key, []).append((r["step"], value))
    for key, points in curves.items():
        if "val" in key or "bpb" in key:
            final[f"min_{key}"] = min(v for _, v in points)
    seconds = sum(r["dt"] for r in records if isinstance(r.get("dt"), (int, float)))
    return {"config": (meta or {}).get("config"), "step": (meta or {}).get("step"),
            "steps_logged": sum("step" in r and "config" not in r for r in records), "train_time_s": seconds,
            "wall_time_s": wall_time(records), "final": final, "curves": curves}


def wall_time(records):
    """Seconds from each run's start record to its last record, summed over the runs (a resumed
    stage has several); None for a log written before records carried the time."""
    total, start, last = 0.0, None, None
    for r in records:
        t = r.get("time")
        if not isinstance(t, (int, float)):
            continue
        if start is None or r.get("event") == "start":
            total += (last - start) if start is not None else 0.0
            start = t
        last = t
    return total + (last - start) if start is not None else None


def eval_results(home_dir):
    """Per stage, the merged results of every eval run (a later run overrides a metric)."""
    path = os.path.join(home_dir, "logs", "eval.jsonl")
    merged = {}
    for r in read_jsonl(path) if os.path.exists(path) else []:
        merged.setdefault(r.get("stage"), {}).update(r.get("results", {}))
    return merged


def eval_seconds(home_dir):
    """Per stage, the wall seconds of all its eval runs."""
    path = os.path.join(home_dir, "logs", "eval.jsonl")
    seconds = {}
    for r in read_jsonl(path) if os.path.exists(path) else []:
        if isinstance(r.get("seconds"), (int, float)):
            seconds[r.get("stage")] = seconds.get(r.get("stage"), 0.0) + r["seconds"]
    return seconds


def tokenizer_stats(home_dir):
    path = os.path.join(home_dir, "tokenizer", "tokenizer.json")
    if not os.path.exists(path):
        return None
    tok = bpe.Tokenizer.load(path)
    lengths = tok.token_bytes()
    lengths = lengths[lengths > 0]
    return {"vocab_size": tok.vocab_size, "fingerprint": tok.fingerprint(),
            "special_tokens": len(bpe.SPECIAL_TOKENS), "token_bytes_min": int(lengths.min()),
            "token_bytes_max": int(lengths.max()), "token_bytes_mean": float(lengths.mean()),
            "token_bytes_std": float(lengths.std())}


def git(*args):
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def code_size():
    """Characters, lines and files of the project's own source (git-tracked when git is there)."""
    names = git("ls-files", "--cached", "--others", "--exclude-standard").splitlines() or [
        os.path.relpath(os.path.join(d, f), ROOT) for d, dirs, files in os.walk(ROOT)
        if not any(part.startswith(".") for part in os.path.relpath(d, ROOT).split(os.sep)[1:] or [""])
        and ".venv" not in d for f in files]
    chars = lines = files = 0
    for name in names:
        path = os.path.join(ROOT, name)
        if name.endswith(CODE_EXTENSIONS) and os.path.isfile(path):
            with open(path, encoding="utf-8", errors="replace") as f:
                text = f.read()
            chars, lines, files = chars + len(text), lines + text.count("\n"), files + 1
    return {"chars": chars, "lines": lines, "files": files, "tokens_approx": chars // 4}


def run_header():
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    try:
        ram_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        ram_gb = None
    return {"generated": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "git_commit": git("rev-parse", "--short", "HEAD") or None,
            "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpus": os.cpu_count(), "ram_gb": round(ram_gb, 1) if ram_gb else None,
            "gpus": gpus, "code": code_size()}


# what each logged series measures: the y label of its chart and the line of its final value
UNITS = {"loss": "train loss, nats per token on the training batch",
         "smooth_loss": "train loss, moving average, nats per token",
         "val_bpb": "bits per byte on the held-out split named above",
         "min_val_bpb": "the lowest bits per byte on the held-out split over the whole run",
         "lrm": "learning-rate multiplier (1 = the full rate)", "dt": "seconds per step",
         "tok_per_sec": "training tokens per second",
         "mfu": "model FLOPs utilization, % of the GPU's bf16 peak (none on CPU)",
         "progress": "fraction of the training mixture consumed",
         "skipped": "1 if the step's update was skipped (a non-finite loss)",
         "skipped_conversations": "conversations skipped so far (rank 0's share, every epoch counted) because "
                                  "cut to max_seq_len at a turn boundary they kept no assistant token",
         "reward": "mean reward of the step's samples (1 = right answer)",
         "sample_len": "mean tokens per sampled answer"}
VAL_SPLITS = {"base": f"the val shard ({VAL_SHARD}, never trained on)",
              "mid": "the held-out mixture (SmolTalk test, MMLU test, GSM8K test), every token",
              "sft": "SmolTalk test, assistant tokens only"}
SUMMARY_NOTES = ["CORE: the mean over the CORE tasks of accuracy centred on chance (0 = chance, 1 = perfect).",
                 "ARC-Easy, ARC-Challenge, MMLU: multiple-choice accuracy (chance 0.25).",
                 "GSM8K, HumanEval, SpellingBee: fraction of problems solved (greedy unless the eval's "
                 "num_samples was above 1; then any right sample counts).",
                 "ChatCORE: the mean of the chat tasks' accuracies, each centred on its chance level."]


AXIS_LABELS = {"loss": "nats per token", "smooth_loss": "nats per token", "val_bpb": "bits per byte",
               "lrm": "LR multiplier", "dt": "seconds", "tok_per_sec": "tokens per second", "reward": "mean reward",
               "sample_len": "tokens"}


def axis_label(key):
    if key.startswith("pass@") or key.endswith("_acc"):
        return "fraction right"
    return AXIS_LABELS.get(key, key)


EVAL_UNITS = {"CORE": "centred accuracy over the CORE tasks (0 = chance, 1 = perfect)",
              "train_bpb": f"bits per byte on the first training shard ({TRAIN_SHARD})",
              "val_bpb": f"bits per byte on the val shard ({VAL_SHARD}, never trained on)",
              "ChatCORE": "the chat tasks' accuracies centred on chance, averaged"}
TOKENIZER_UNITS = {"vocab_size": "tokens, the special tokens included", "fingerprint": "id that checkpoints record",
                   "special_tokens": "tokens of the chat format"}


def eval_unit(key):
    if key in EVAL_UNITS:
        return EVAL_UNITS[key]
    if key in ("ARC-Easy", "ARC-Challenge", "MMLU"):
        return "multiple-choice accuracy (chance 0.25)"
    return "fraction of problems solved"


def unit(key):
    if key.startswith("pass@"):
        return f"fraction of held-out GSM8K questions with a right answer among {key[5:]} samples"
    if key.endswith("_acc"):
        return f"multiple-choice accuracy on held-out {key[:-4].replace('_', '-').upper()} questions (chance 0.25)"
    return UNITS.get(key, key)


def chart_range(points):
    """(y_lo, y_hi, first_step_fitted): the y range fits the values of the last 90% of the steps, so a
    high start (the step-0 loss of an untrained model) does not flatten the rest; first_step_fitted
    is None when every value fits."""
    xs = [x for x, _ in points]
    cut = xs[0] + 0.1 * (xs[-1] - xs[0])
    later = [y for x, y in points if x >= cut and x > xs[0]] or [y for _, y in points]
    lo, hi = min(later), max(later)
    if all(lo <= y <= hi for _, y in points):
        return lo, hi, None
    return lo, hi, min(x for x, _ in points if x >= cut and x > xs[0])


def svg_chart(points, title, ylabel, width=520, height=220):
    """A line chart of [(step, value), ...] as a standalone SVG file's text: labelled axes, y range
    fitted to the later steps (earlier values beyond it run off the chart, and the caption says so)."""
    left, right, top, bottom = 64, 16, 40, 44
    x0, x1 = points[0][0], points[-1][0]
    y0, y1, fitted_from = chart_range(points)
    sx = (width - left - right) / ((x1 - x0) or 1)
    sy = (height - top - bottom) / ((y1 - y0) or 1)
    line = " ".join(f"{left + (x - x0) * sx:.1f},{height - bottom - (y - y0) * sy:.1f}" for x, y in points)
    font = 'font-family="sans-serif" fill="#333" font-size'
    note = (f"y axis fits steps {fitted_from:g} on; earlier values (up to {max(y for _, y in points):.3g}) "
            f"run off the chart" if fitted_from is not None else "")
    clip = "clip-" + re.sub(r"[^A-Za-z0-9]", "-", title)   # unique per chart: report.html inlines them all
    ticks = "".join(f'<text x="{left - 4}" y="{height - bottom - (v - y0) * sy + 4:.1f}" {font}="11" '
                    f'text-anchor="end">{v:.3g}</text>' for v in (y0, (y0 + y1) / 2, y1))
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}">'
            f'<rect width="{width}" height="{height}" fill="white" stroke="#ccc"/>'
            f'<text x="{left}" y="16" {font}="12" font-weight="bold">{html_escape(title)}</text>'
            f'<text x="{left}" y="30" {font}="10">{html_escape(note)}</text>'
            f'<clipPath id="{clip}"><rect x="{left}" y="{top}" width="{width - left - right}" '
            f'height="{height - top - bottom}"/></clipPath>'
            f'<line x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}" stroke="#888"/>'
            f'<line x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}" stroke="#888"/>'
            f'<polyline points="{line}" fill="none" stroke="#1f77b4" stroke-width="1.5" clip-path="url(#{clip})"/>'
            f'{ticks}'
            f'<text x="{left}" y="{height - bottom + 14}" {font}="11">{x0:g}</text>'
            f'<text x="{width - right}" y="{height - bottom + 14}" {font}="11" text-anchor="end">{x1:g}</text>'
            f'<text x="{(left + width - right) / 2}" y="{height - 8}" {font}="11" text-anchor="middle">step</text>'
            f'<text transform="translate(14 {(top + height - bottom) / 2}) rotate(-90)" {font}="11" '
            f'text-anchor="middle">{html_escape(ylabel)}</text>'
            f'</svg>\n')


def html_escape(text):
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


def fmt(value):
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10_000:
        return f"{value:,}"
    return str(value)


def fmt_seconds(seconds):
    if seconds is None:
        return "–"
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds:.0f} s ({seconds / 60:.1f} min)"


def metrics_table(evals):
    """The BASE/MID/SFT/RL summary table of REFERENCE §12 ('–' where a stage or metric is missing)."""
    rows = ["| Metric | " + " | ".join(label for _, label in REPORT_STAGES) + " |",
            "|---|" + "---|" * len(REPORT_STAGES)]
    for metric in REPORT_ROWS:
        rows.append(f"| {metric} | " + " | ".join(fmt(evals.get(s, {}).get(metric)) for s, _ in REPORT_STAGES) + " |")
    return "\n".join(rows)


def report_markdown(data):
    header, md = data["header"], ["# slimchat report card", ""]
    code = header["code"]
    if data.get("synthetic_data"):
        md += ["**Data: the synthetic offline mirror (tests/tinyworld.py), not the real datasets.** Every "
               "number below measures the model on that small made-up world (its people, towns, sums and "
               "spellings), whose test questions are drawn from the same facts as its training text; they "
               "are not comparable to numbers on the real benchmarks.", ""]
    md += [f"- generated: {header['generated']}",
           f"- commit: {header['git_commit'] or '–'}" + (" (dirty)" if header["git_dirty"] else ""),
           f"- hardware: {header['platform']}, {header['cpus']} CPUs, {header['ram_gb'] or '–'} GB RAM, "
           f"GPUs: {', '.join(header['gpus']) or 'none'}",
           f"- python {header['python']}, torch {header['torch']}",
           f"- code: {code['chars']:,} chars, {code['lines']:,} lines, {code['files']} files, "
           f"~{code['tokens_approx']:,} tokens",
           f"- wall time of the run: {fmt_seconds(data['wall_time_s'])} (the training stages and evaluations "
           "logged below, from each log's first to last record; downloads and the tokenizer not included)",
           "", "## Summary", "", metrics_table(data["evals"]), ""]
    md += [f"- {note}" for note in SUMMARY_NOTES]
    md += ["- bpb (bits per byte, lower is better) is in each stage's section, with the split it was measured on.",
           "", "## Tokenizer", ""]
    md += [f"- {k}: {fmt(v)}: " + TOKENIZER_UNITS.get(k, f"bytes per token over the vocabulary, {k[12:]}")
           for k, v in (data["tokenizer"] or {}).items()] or ["–"]
    for name, label in REPORT_STAGES:
        s = data["stages"].get(name)
        md += ["", f"## {label} ({name})", ""]
        if s is None:
            md.append("–")
            continue
        md += [f"- checkpoint step: {fmt(s['step'])}", f"- logged steps: {s['steps_logged']}",
               f"- wall time: {fmt_seconds(s.get('wall_time_s'))} training, "
               f"{fmt_seconds(data['eval_seconds'].get(name))} evaluating",
               f"- time in training steps: {s['train_time_s']:.1f} s (the sum of the logged step times)"]
        if name in VAL_SPLITS:
            md.append(f"- val bpb is measured on {VAL_SPLITS[name]}")
        md += [f"- {k}: {fmt(v)}: {unit(k)}" + ("" if k.startswith("min_") else ", at the last logged step")
               for k, v in sorted(s["final"].items())]
        if s["config"]:
            md += ["", "config: " + ", ".join(f"{k}={v}" for k, v in s["config"].items())]
        charts = data["charts"].get(name, {})
        if charts:
            md += [""] + [f"![{name} {key}: {unit(key)}]({path})" for key, path in charts.items()]
        results = data["evals"].get(name)
        if results:
            md += ["", "evaluation (evaluate.py):", ""]
            md += [f"- {k}: {fmt(v)}: {eval_unit(k)}" for k, v in results.items() if not isinstance(v, dict)]
    return "\n".join(md) + "\n"


def markdown_html(md, out_dir):
    """report.md as one self-contained HTML page: the few forms report_markdown writes, with each
    chart's SVG inlined (a browser shows it; GitHub strips inline SVG, hence the files for .md)."""
    html, table = [], []
    bold = lambda t: re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", html_escape(t))   # noqa: E731
    for line in md.splitlines() + [""]:
        if line.startswith("|"):
            if not line.startswith("|---"):
                cells = [c.strip() for c in line.strip("|").split("|")]
                tag = "th" if not table else "td"
                table.append("<tr>" + "".join(f"<{tag}>{html_escape(c)}</{tag}>" for c in cells) + "</tr>")
            continue
        if table:
            html.append("<table>" + "".join(table) + "</table>")
            table = []
        if m := re.fullmatch(r"!\[(.*)\]\((.+)\)", line):
            with open(os.path.join(out_dir, m.group(2)), encoding="utf-8") as f:
                html.append(f'<figure>{f.read()}<figcaption>{html_escape(m.group(1))}</figcaption></figure>')
        elif line.startswith("## "):
            html.append(f"<h2>{html_escape(line[3:])}</h2>")
        elif line.startswith("# "):
            html.append(f"<h1>{html_escape(line[2:])}</h1>")
        elif line.startswith("- "):
            html.append(f'<div class="item">{bold(line[2:])}</div>')
        elif line:
            html.append(f"<p>{bold(line)}</p>")
    style = ("body{font-family:sans-serif;max-width:900px;margin:2em auto;padding:0 1em;color:#222}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}"
             "td:first-child{text-align:left}"
             ".item{margin:2px 0}figure{display:inline-block;margin:8px}figcaption{font-size:12px}")
    return (f'<!doctype html><html><head><meta charset="utf-8"><title>slimchat report card</title>'
            f'<style>{style}</style></head><body>\n' + "\n".join(html) + "\n</body></html>\n")


def write_report(home_dir):
    """Write report/report.md (charts as report/charts/*.svg beside it), report/report.html (all in
    one file) and report/report.json from everything under home_dir; return the paths of .md and .json."""
    stages = {}
    for name, _ in REPORT_STAGES:
        log = os.path.join(home_dir, "logs", f"{name}.jsonl")
        meta = latest_meta(home_dir, name)
        if os.path.exists(log) or meta:
            stages[name] = stage_summary(read_jsonl(log) if os.path.exists(log) else [], meta)
    out_dir = os.path.join(home_dir, "report")
    charts = {}
    for name, s in stages.items():
        for key, points in s["curves"].items():
            if len(points) > 1:
                path = os.path.join("charts", f"{name}_{re.sub(r'[^A-Za-z0-9_]', '_', key)}.svg")
                atomic_write(os.path.join(out_dir, path), svg_chart(points, f"{name}: {key}", axis_label(key)))
                charts.setdefault(name, {})[key] = path
    seconds = eval_seconds(home_dir)
    walls = [s["wall_time_s"] for s in stages.values() if s.get("wall_time_s")] + list(seconds.values())
    data = {"header": run_header(), "synthetic_data": gpt.synthetic_data(home_dir),
            "tokenizer": tokenizer_stats(home_dir), "stages": stages, "evals": eval_results(home_dir),
            "eval_seconds": seconds, "wall_time_s": sum(walls) if walls else None, "charts": charts}
    markdown = report_markdown(data)
    paths = os.path.join(out_dir, "report.md"), os.path.join(out_dir, "report.json")
    for path, text in zip(paths, (markdown, json.dumps(data, indent=1, default=str))):
        atomic_write(path, text)
    atomic_write(os.path.join(out_dir, "report.html"), markdown_html(markdown, out_dir))
    return paths


def atomic_write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


# ===========================================================================
# the CLI

CHAT_TASKS = {
    "ARC-Easy": lambda: ARC("ARC-Easy", "test"),
    "ARC-Challenge": lambda: ARC("ARC-Challenge", "test"),
    "MMLU": lambda: MMLU("test"),
    "GSM8K": lambda: GSM8K("test"),
    "HumanEval": HumanEval,
    "SpellingBee": lambda: SpellingBee(256, "test"),   # E: 256 test questions
}
BASE_TASKS = ["CORE", "bpb"]


def stage_tasks(stage_name, requested):
    """The task names to run: the requested ones, checked, or the stage's default."""
    if stage_name not in dict(REPORT_STAGES):
        raise SystemExit(f"--stage must be one of base, mid, sft, rl; got {stage_name!r}")
    names = [t.strip() for t in requested.split(",") if t.strip()] or (
        BASE_TASKS if stage_name == "base" else list(CHAT_TASKS))
    unknown = [t for t in names if t not in CHAT_TASKS and t not in BASE_TASKS]
    if unknown:
        raise SystemExit(f"unknown task(s) {unknown}; known: {BASE_TASKS + list(CHAT_TASKS)}")
    return names


def write_records(path, records):
    atomic_write(path, "".join(json.dumps(r, default=str) + "\n" for r in records))


if __name__ == "__main__":
    config = gpt.apply_overrides(globals())
    if report:
        for path in write_report(gpt.home()):
            print(f"wrote {path}")
        print(f"wrote {os.path.join(gpt.home(), 'report', 'report.html')} (one file, charts inline) and the "
              f"charts of report.md in {os.path.join(gpt.home(), 'report', 'charts')}")
        sys.exit(0)
    names = stage_tasks(stage, tasks)

    # -----------------------------------------------------------------------
    # setup
    ddp, rank, local_rank, world_size, dev, dtype, why = gpt.compute_setup(device)
    tokenizer = gpt.load_tokenizer()
    model, meta, _ = gpt.load_checkpoint(stage, dev, tokenizer=tokenizer, dtype=dtype)
    model = gpt.inference_model(model).eval()   # in bf16 on GPUs: weights stored in it, not cast per forward
    engine = gpt.Engine(model, tokenizer)
    out_dir = os.path.join(gpt.home(), "eval", stage)
    gpt.print0(f"evaluating {stage} step {meta['step']} on {dev} ({dtype}: {why}), world size {world_size}: "
               + ", ".join(names))

    # -----------------------------------------------------------------------
    # evals
    results, t_start = {}, time.time()
    for name in names:
        t0, records = time.time(), {} if name == "CORE" else []
        if name == "CORE":
            core = evaluate_core(model, tokenizer, max_per_task=max_per_task, records=records)
            results["CORE"], results["CORE_tasks"] = core["CORE"], core["tasks"]
            line = f"CORE {core['CORE']:.4f}"
        elif name == "bpb":
            results.update(split_bpb(model, tokenizer, bpb_tokens, batch_size))
            line = f"train bpb {results['train_bpb']:.4f}, val bpb {results['val_bpb']:.4f}"
        else:
            results[name] = run_chat_eval(CHAT_TASKS[name](), model, tokenizer, engine, max_per_task,
                                          batch_size, num_samples, max_new_tokens, temperature, top_k, records)
            line = f"{name} accuracy {results[name]:.4f}"
        gpt.print0(f"{line} ({time.time() - t0:.1f}s)")
        if rank == 0 and name != "bpb":
            for label, recs in (records.items() if name == "CORE" else [(name, records)]):
                write_records(os.path.join(out_dir, f"{label}.jsonl"), recs)
    if chatcore(results) is not None:
        results["ChatCORE"] = chatcore(results)
        gpt.print0(f"ChatCORE {results['ChatCORE']:.4f}")

    # -----------------------------------------------------------------------
    # save
    if rank == 0:
        summary = {"stage": stage, "step": meta["step"], "time": time.time(),
                   "seconds": time.time() - t_start, "config": config, "results": results}
        atomic_write(os.path.join(out_dir, "results.json"), json.dumps(summary, indent=1))
        os.makedirs(os.path.join(gpt.home(), "logs"), exist_ok=True)
        with open(os.path.join(gpt.home(), "logs", "eval.jsonl"), "a", encoding="utf-8") as f:
            f.write(json.dumps(summary) + "\n")
        gpt.print0(f"wrote {out_dir}/results.json and per-example records")
    gpt.compute_cleanup()
