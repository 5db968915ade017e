"""
serve.py: talk to a slimchat model: a chat page, a streaming API, an OpenAI-compatible
endpoint (all on the standard library's http.server), and a terminal chat.

Any stage's latest checkpoint can be served (--stage=base works too; a base model simply
continues the text). The server starts even when no checkpoint or tokenizer exists yet: it
then answers the chat endpoints with 503 and the page shows "model not loaded".

Endpoints (REFERENCE.md §11, plus the OpenAI-shaped ones):
  GET  /                     the page (static/, relative URLs, no build step, nothing from a CDN)
  POST /chat/completions     SSE: data: {"token": "...", "type": "text", "gpu": 0} ... data: {"done": true, ...}
                             "type" is text | python | python_output, so the page can show tool calls;
                             "gpu" is the worker's index (the reference's name; a CPU replica has one too)
  POST /v1/chat/completions  OpenAI Chat Completions: stream and non-stream, usage, finish_reason,
                             n choices, stop strings, top_p, logprobs; fields we can't honour get a 400
  GET  /v1/models, /v1/models/{id}, /health, /stats;  OPTIONS (CORS preflight, see --cors_origins)
Concurrency: workers, each one model replica on one device (one per GPU; on CPU, --num_workers
replicas) with one thread that alone drives its model. Each worker decodes every reply it holds
together, one row per reply in a batched KV-cache step (continuous batching: a new request joins
at the next step after its prefill, a finished one leaves at once, a client that disconnects
frees its row at the next step). A request goes to the worker with the least work; beyond
--max_rows rows a worker queues up to --max_queue requests, and only then answers 503.

Run:
  python serve.py                          # latest sft checkpoint, http://127.0.0.1:8000
  python serve.py --stage=base --port=8080 --temperature=0.6 --top_k=50 --max_tokens=256
  python serve.py --cli                    # terminal chat (/help lists its commands)
  python serve.py -p "Why is the sky blue?"    # one reply on stdout (settings on stderr), then exit
Options are --name=value for every knob below; `--cli` alone means --cli=1, and `-p TEXT` /
`--prompt TEXT` mean --cli=1 --prompt=TEXT.

With SLIMCHAT_HOME unset and no model of --stage under ~/.cache/slimchat, the newest other home
beside it that has one (~/.cache/slimchat-tiny after `bash run_all.sh tiny`) is served, and said so.
"""
import contextlib
import functools
import json
import math
import os
import queue
import random
import select
import socket
import sys
import threading
import time
import traceback
import urllib.parse
import uuid
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

import gpt

# ---------------------------------------------------------------------------
# knobs: edit here, or override any of them with --name=value
stage = "sft"              # checkpoint stage to serve: base|mid|sft|rl
step = -1                  # checkpoint step; -1 = latest
tag = ""                   # checkpoint tag (e.g. d20); "" = the stage's default tag
device = ""                # "" = autodetect (cuda > mps > cpu)
num_workers = 0            # model replicas; 0 = one per GPU (1 on CPU/MPS); on GPUs replicas go round-robin
host = "127.0.0.1"         # bind address; 0.0.0.0 would expose the model to the network
port = 8000                # TCP port; 0 = any free port
temperature = 0.8          # default sampling temperature when a request names none
top_k = 50                 # default top-k when a request names none; 0 = sample from the full softmax
max_tokens = 512           # default cap on reply tokens when a request names none
max_rows = 32              # replies decoded together per worker (each row's KV cache holds the full context)
max_queue = 64             # requests waiting for a row, per worker; one more gets a 503
cors_origins = ""          # comma-separated origins whose pages may call the API ("*" = any); "" = same origin only
cli = False                # chat in the terminal instead of serving HTTP (also: --cli)
prompt = ""                # with cli: answer this one prompt and exit; "" = interactive (also: -p TEXT)
# ---------------------------------------------------------------------------

# Abuse limits: the reference's numbers (REFERENCE.md §11), answered with 400, never clamped.
MAX_MESSAGES = 500
MAX_MESSAGE_CHARS = 8_000
MAX_TOTAL_CHARS = 32_000
TEMPERATURE_RANGE = (0.0, 2.0)
TOP_K_RANGE = (1, 200)
MAX_TOKENS_RANGE = (1, 4096)
# 32,000 chars of JSON-escaped text can take 6 bytes each (\uXXXX), plus 500 messages of framing
MAX_BODY_BYTES = 1 << 20
SOCKET_TIMEOUT = 30.0      # seconds a client may stall mid-request (or not read our stream) before we drop it
POLL_S = 0.05              # how often a request waiting for tokens checks that its client is still there
ROLES = ("system", "developer", "user", "assistant")   # OpenAI's newer name for system is developer
TOP_P_RANGE = (0.0, 1.0)
TOP_LOGPROBS_RANGE = (0, 20)
N_RANGE = (1, 16)          # choices per request (rows it takes)
MAX_STOPS = 4              # stop strings per request, as OpenAI allows
# request fields we read; any other with a value that changes the reply is refused with a 400 naming it
# (clients send null for fields they don't set, and these neutral values change nothing)
FIELDS = ("messages", "model", "user", "temperature", "top_k", "top_p", "max_tokens", "max_completion_tokens",
          "seed", "n", "stop", "stream", "stream_options", "logprobs", "top_logprobs")
NEUTRAL = {"frequency_penalty": 0, "presence_penalty": 0}
# shown on the page and in the terminal when the model learned the synthetic mirror (`bash run_all.sh tiny`);
# a tiny model of the test fixtures' size answers each of these prompts right (README "What the tiny model knows")
TINY_WORLD_NOTE = ("This model was trained on the small synthetic world of the tiny preset (bash run_all.sh "
                   "tiny): 16 people in 6 towns with their jobs, pets and friends, small sums, spelling, and "
                   "GSM8K-style word problems. It knows nothing else. Try: \"Where does Edda live?\", \"What pet "
                   "does Kofi have?\", \"How do you spell garden?\", \"Kofi has 4 cakes. Lena has twice as many "
                   "cakes as Kofi. How many cakes do they have together?\", \"Tell me a short story about Nora.\"")
STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".css": "text/css; charset=utf-8",
                 ".js": "text/javascript; charset=utf-8", ".svg": "image/svg+xml", ".png": "image/png",
                 ".ico": "image/x-icon"}
# the specials that end a reply: the engine stops at the first two; the others mean the model
# started a new turn on its own (a base model does), which is the end of the reply too
STOP_TOKENS = ("<|assistant_end|>", "<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>")
PART_SWITCH = {"<|python_start|>": "python", "<|python_end|>": "text",
               "<|output_start|>": "python_output", "<|output_end|>": "text"}

# ---------------------------------------------------------------------------
# request validation: everything a client sends is checked here, before a worker is taken


class ApiError(Exception):
    """A request we refuse: HTTP status plus a message saying what was wrong."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status, self.message = status, message


def _reject_constant(name):
    raise ValueError(f"{name} is not valid JSON")


def parse_body(raw):
    """Request bytes -> dict, or ApiError(400) naming the problem."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(400, f"request body is not valid UTF-8 (bad byte at offset {e.start})") from None
    try:
        body = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:
        raise ApiError(400, f"request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"request body must be a JSON object, got {type(body).__name__}")
    return body


def _number(body, name, lo, hi, default, integer):
    """A numeric field within [lo, hi]; bools are refused even though JSON true is an int in Python."""
    value = body.get(name)
    if value is None:
        return default
    kinds = (int,) if integer else (int, float)
    if type(value) is bool or not isinstance(value, kinds) or not math.isfinite(value):
        kind = "an integer" if integer else "a number"
        raise ApiError(400, f"'{name}' must be {kind} in [{lo}, {hi}], got {json.dumps(value)[:40]}")
    if not lo <= value <= hi:
        raise ApiError(400, f"'{name}' must be in [{lo}, {hi}], got {value}")
    return value


def _utf8_text(text, where):
    """JSON can carry lone surrogates (\\ud800) that no UTF-8 encoder accepts: refuse them here."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(400, f"{where} contains an unpaired UTF-16 surrogate") from None
    return text


def check_content(message, k):
    """Message content -> str (user/system) or str | list of parts (assistant); returns (content, chars)."""
    role, content = message["role"], message["content"]
    where = f"messages[{k}].content"
    if isinstance(content, str):
        return _utf8_text(content, where), len(content)
    if not isinstance(content, list):
        raise ApiError(400, f"{where} must be a string or a list of parts, got {type(content).__name__}")
    allowed = ("text", "python", "python_output") if role == "assistant" else ("text",)
    parts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") not in allowed or not isinstance(part.get("text"), str):
            raise ApiError(400, f"{where}[{j}] must be {{\"type\": {' | '.join(allowed)}, \"text\": string}} "
                                f"for a {role} message")
        parts.append({"type": part["type"], "text": _utf8_text(part["text"], f"{where}[{j}].text")})
    chars = sum(len(p["text"]) for p in parts)
    if role != "assistant":  # OpenAI-style text parts of a user/system message are just its text
        return "".join(p["text"] for p in parts), chars
    return parts, chars


def check_messages(messages):
    """Validate the conversation (limits, roles, order) and return a clean copy."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list of {\"role\", \"content\"} objects")
    if len(messages) > MAX_MESSAGES:
        raise ApiError(400, f"too many messages: {len(messages)} (the limit is {MAX_MESSAGES})")
    clean, total = [], 0
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ApiError(400, f"messages[{k}] must be an object with 'role' and 'content'")
        if m["role"] not in ROLES:
            raise ApiError(400, f"messages[{k}] has unknown role {json.dumps(m['role'])[:40]}; "
                                f"use one of {', '.join(ROLES)}")
        content, chars = check_content(m, k)
        if chars == 0 and m["role"] != "assistant":  # an assistant may have said nothing
            raise ApiError(400, f"messages[{k}] ({m['role']}) is empty")
        if chars > MAX_MESSAGE_CHARS:
            raise ApiError(400, f"messages[{k}] is {chars} characters (the limit is {MAX_MESSAGE_CHARS})")
        total += chars
        clean.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content})
    if total > MAX_TOTAL_CHARS:
        raise ApiError(400, f"the conversation is {total} characters (the limit is {MAX_TOTAL_CHARS})")
    check_order(clean)
    return clean


def check_order(messages):
    """Optional system message first, then user, assistant, ... ending with the user's turn."""
    start = 1 if messages[0]["role"] == "system" else 0
    for k in range(start, len(messages)):
        expected = "user" if (k - start) % 2 == 0 else "assistant"
        if messages[k]["role"] != expected:
            raise ApiError(400, f"messages[{k}] should have role '{expected}', got '{messages[k]['role']}': "
                                "roles alternate user, assistant, ... after an optional first system message")
    if messages[-1]["role"] != "user":
        raise ApiError(400, "the last message must be the user's (the reply is the assistant's turn)")


def check_request(body, defaults):
    """Validated chat request -> dict(messages, temperature, top_k, top_p, max_tokens, seed, n, stop,
    logprobs, stream, include_usage). model and user are ignored; a field we can't honour is a 400.
    logprobs is None (not asked) or how many alternatives to list with each token's."""
    for name, value in body.items():
        if name not in FIELDS and value is not None and not (name in NEUTRAL and value == NEUTRAL[name]):
            raise ApiError(400, f"'{name}' is not supported by this server; leave it out "
                                f"(supported: {', '.join(FIELDS[1:])})")
    out = {"messages": check_messages(body.get("messages"))}
    out["temperature"] = _number(body, "temperature", *TEMPERATURE_RANGE, defaults["temperature"], False)
    out["top_k"] = _number(body, "top_k", *TOP_K_RANGE, defaults["top_k"], True)
    out["top_p"] = _number(body, "top_p", *TOP_P_RANGE, None, False)
    if out["top_p"] == 0:
        raise ApiError(400, "'top_p' must be above 0 (use temperature 0 for the single likeliest token)")
    limit = body.get("max_completion_tokens", None)  # OpenAI's newer name for max_tokens
    name = "max_tokens" if limit is None else "max_completion_tokens"
    out["max_tokens"] = _number(body, name, *MAX_TOKENS_RANGE, defaults["max_tokens"], True)
    out["seed"] = _number(body, "seed", 0, 2 ** 63 - 1, None, True)
    out["n"] = _number(body, "n", *N_RANGE, 1, True)
    out["stop"] = check_stop(body.get("stop"))
    if not isinstance(body.get("logprobs", False), (bool, type(None))):
        raise ApiError(400, "'logprobs' must be true or false")
    alternatives = _number(body, "top_logprobs", *TOP_LOGPROBS_RANGE, 0, True)
    if alternatives and not body.get("logprobs"):
        raise ApiError(400, "'top_logprobs' needs 'logprobs': true")
    out["logprobs"] = alternatives if body.get("logprobs") else None
    out["stream"] = False if body.get("stream") is None else body["stream"]
    if not isinstance(out["stream"], bool):
        raise ApiError(400, "'stream' must be true or false")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise ApiError(400, "'stream_options' must be an object like {\"include_usage\": true}")
    out["include_usage"] = options.get("include_usage", False)
    return out


def check_stop(stop):
    """OpenAI's stop: null, a string, or a list of up to MAX_STOPS non-empty strings -> list."""
    stops = [stop] if isinstance(stop, str) else [] if stop is None else stop
    if (not isinstance(stops, list) or len(stops) > MAX_STOPS
            or not all(isinstance(t, str) and t for t in stops)):
        raise ApiError(400, f"'stop' must be a non-empty string or a list of up to {MAX_STOPS} of them")
    return [_utf8_text(t, "'stop'") for t in stops]

# ---------------------------------------------------------------------------
# prompt: render with the tokenizer's chat format, trimming the oldest turns to fit the context


def fit_context(tokenizer, messages, context_len, max_new):
    """
    Token ids priming the reply to `messages` (which end with a user turn), plus the reply budget
    and how many old messages were dropped. Whole user+assistant pairs are dropped, oldest first
    (the system message stays), until the prompt leaves room for min(max_new, context_len // 2)
    reply tokens; the reply budget is then whatever the context still holds, up to max_new.
    """
    system = messages[:1] if messages[0]["role"] == "system" else []
    turns = messages[len(system):]
    reserve = min(max_new, context_len // 2)

    def render(drop_pairs):
        return tokenizer.render_for_completion(system + turns[2 * drop_pairs:])

    # dropping more turns never lengthens the prompt, so binary-search the fewest to drop
    lo, hi = 0, len(turns) // 2
    while lo < hi:
        mid = (lo + hi) // 2
        if len(render(mid)) + reserve <= context_len:
            hi = mid
        else:
            lo = mid + 1
    ids = render(lo)
    if len(ids) >= context_len:
        raise ApiError(400, f"the last message is too long: it renders to {len(ids)} tokens and the "
                            f"model's context holds {context_len}; shorten it")
    return ids, min(max_new, context_len - len(ids)), 2 * lo

# ---------------------------------------------------------------------------
# generation: a worker thread per replica decodes the batch; request threads turn ids into text


def _partial_stop(text, stops):
    """How many characters at the end of `text` could be the start of a stop string."""
    return max((k for t in stops for k in range(min(len(t) - 1, len(text)), 0, -1) if text.endswith(t[:k])),
               default=0)


class Reply:
    """
    Turns the generated ids of one reply into text pieces of a kind (text, python,
    python_output), emitted only at UTF-8 character boundaries, and records the reply's parts,
    token count and finish reason ("stop" at a turn-ending special or a stop string, "length" at
    the token cap). Visible text (not the python calls) that could be the start of a stop string
    is held back until it can't; a stop string is matched within one kind of piece.
    """

    def __init__(self, tokenizer, stop_texts=()):
        self.tokenizer, self.stop_texts = tokenizer, list(stop_texts)
        self.stops = {tokenizer.special(name) for name in STOP_TOKENS}
        self.switch = {tokenizer.special(name): kind for name, kind in PART_SWITCH.items()}
        self.kind, self.decoder, self.held = "text", tokenizer.stream_decoder(), ""
        self.parts, self.num_tokens, self.finish_reason = [], 0, None
        self.logprobs, self.unsent = [], 0   # OpenAI's logprobs.content entries; how many a stream has yet to send

    def push(self, token, logprob=None):
        """One generated id (and, if asked, its (logprob, alternatives)) -> list of (kind, text)
        pieces that are now complete."""
        if self.finish_reason:   # ended by a stop string: what the model says next is not shown
            return []
        self.num_tokens += 1
        if logprob is not None and token not in self.stops and token not in self.switch and self.kind != "python":
            self.logprobs.append({**self._token_entry(token, logprob[0]),
                                  "top_logprobs": [self._token_entry(t, lp) for t, lp in logprob[1]]})
            self.unsent += 1
        if token in self.stops:
            self.finish_reason = "stop"
            return self._flush()
        if token in self.switch:
            pieces = self._flush()
            self.kind = self.switch[token]
            return pieces
        return self._add(self.decoder.push(token))

    def close(self, max_new):
        """End of generation: the last pieces, and the finish reason if no stop came."""
        if self.finish_reason:
            return []
        pieces = self._flush()
        self.finish_reason = "length" if self.num_tokens >= max_new else "stop"
        return pieces

    def _add(self, text):
        if self.stop_texts and self.kind != "python":
            text, self.held = self.held + text, ""
            hits = [text.find(t) for t in self.stop_texts if t in text]
            if hits:
                text, self.finish_reason = text[:min(hits)], "stop"
            else:
                keep = _partial_stop(text, self.stop_texts)
                text, self.held = text[:len(text) - keep], text[len(text) - keep:]
        return self._append(text)

    def _append(self, text):
        if not text:
            return []
        if self.parts and self.parts[-1]["type"] == self.kind:
            self.parts[-1]["text"] += text
        else:
            self.parts.append({"type": self.kind, "text": text})
        return [(self.kind, text)]

    def _flush(self):
        pieces = self._add(self.decoder.flush())
        self.decoder = self.tokenizer.stream_decoder()
        held, self.held = self.held, ""
        return pieces + self._append(held)

    def _token_entry(self, token, logprob):
        return {"token": self.tokenizer.decode([token]), "logprob": logprob,
                "bytes": list(self.tokenizer.decode_bytes([token]))}

    def take_logprobs(self):
        """The logprobs entries a stream has not sent yet."""
        entries = self.logprobs[len(self.logprobs) - self.unsent:]
        self.unsent = 0
        return entries

    def visible_text(self):
        """What a plain-text client shows: the text and the tool results, not the tool calls."""
        return "".join(p["text"] for p in self.parts if p["type"] != "python")

    def message(self):
        """The reply as a history message: plain text, or parts when it used the tool."""
        if all(p["type"] == "text" for p in self.parts):
            return {"role": "assistant", "content": "".join(p["text"] for p in self.parts)}
        return {"role": "assistant", "content": [dict(p) for p in self.parts]}


class Job:
    """One reply for a worker to decode. Its tokens go to `out` as (index, token, logprob or None),
    then (index, None, None) when it ends, or (index, exception, None) if decoding failed."""

    def __init__(self, ids, max_new, settings, seed, index, out):
        self.ids, self.max_new, self.settings, self.seed, self.index, self.out = ids, max_new, settings, seed, index, out
        self.cancelled = False   # set by the request's thread: its client left, or a stop string ended it
        self.admitted = False    # set by the worker when the job takes a row (under the worker's lock)


class Worker:
    """
    One model replica on one device, with one thread that alone drives it: jobs wait in
    `inbox`, take a row of the worker's BatchDecoder between two steps (after their prefill),
    and give it up when they end or are cancelled.
    """

    def __init__(self, index, engine, device, rows, queued):
        self.index, self.engine, self.device, self.max_rows = index, engine, device, rows
        self.capacity = rows + queued                  # jobs in flight (decoding or waiting) it accepts
        self.stop_ids = [engine.tokenizer.special(name) for name in STOP_TOKENS]
        self.decoder = self.new_decoder()
        self.inbox = queue.Queue()
        self.lock = threading.Lock()                   # guards in_flight
        self.in_flight, self.submitted, self.requests, self.tokens = 0, 0, 0, 0
        self.thread = threading.Thread(target=self.run, name=f"worker-{index}", daemon=True)
        self.thread.start()

    def new_decoder(self):
        return gpt.BatchDecoder(self.engine, self.max_rows, self.engine.model.config.sequence_len, self.stop_ids)

    def run(self):
        jobs = {}   # id(row handle) -> Job
        while True:
            try:
                self.admit(jobs)
                for row in [r for r in self.decoder.rows if jobs[id(r)].cancelled]:
                    self.decoder.remove(row)
                    self.finish(jobs.pop(id(row)), None)
                for row, token, ended in self.decoder.step():
                    job = jobs[id(row)]
                    job.out.put((job.index, token, row["logprob"]))
                    self.tokens += 1
                    if ended:
                        self.finish(jobs.pop(id(row)), None)
            # thread boundary: a failed step (a bug, out of memory) fails the replies in the batch, not the server
            except Exception as e:
                traceback.print_exc()
                self.decoder = None      # drop the old KV cache before allocating the new one
                self.decoder = self.new_decoder()
                for job in jobs.values():
                    self.finish(job, e)
                jobs.clear()

    def admit(self, jobs):
        """Give waiting jobs the free rows; with nothing to decode, sleep here until a job comes."""
        while len(self.decoder.rows) < self.max_rows:
            try:
                job = self.inbox.get(block=not self.decoder.rows)
            except queue.Empty:
                return
            with self.lock:
                if job.cancelled:   # its client left while it waited: Generation.cancel already counted it out
                    continue
                job.admitted = True
            s = job.settings
            try:
                row = self.decoder.add(job.ids, job.max_new, float(s["temperature"]), s["top_k"], s["top_p"],
                                       job.seed, s["logprobs"])
            # thread boundary: a prompt that fails to prefill (out of memory) fails its own reply only
            except Exception as e:
                traceback.print_exc()
                self.finish(job, e)
                continue
            jobs[id(row)] = job

    def finish(self, job, error):
        with self.lock:
            self.in_flight -= 1
        self.requests += error is None
        job.out.put((job.index, error, None))


class Pool:
    """The workers. A request's jobs all go to one worker (n choices decode side by side): the one
    with the least in flight, ties to the one given the fewest, so load spreads over the GPUs."""

    def __init__(self, workers):
        self.workers = workers

    def available(self):
        """Workers with nothing to do."""
        return sum(w.in_flight == 0 for w in self.workers)

    def submit(self, jobs):
        worker = min(self.workers, key=lambda w: (w.in_flight, w.submitted))
        with worker.lock:
            if worker.in_flight + len(jobs) > worker.capacity:
                raise ApiError(503, f"the server is full: {worker.in_flight} replies are being written or "
                                    f"waiting on each of its {len(self.workers)} worker(s); retry in a moment")
            worker.in_flight += len(jobs)
            worker.submitted += 1
        for job in jobs:
            worker.inbox.put(job)
        return worker


class Generation:
    """
    The replies to one request. Created = submitted to a worker (ApiError 503 when every queue
    is full), so a stream can still answer with an error status; then read with collect().
    """

    def __init__(self, app, ids, max_new, settings, seed):
        self.out, self.max_new = queue.Queue(), max_new
        self.jobs = [Job(ids, max_new, settings, seed + i, i, self.out) for i in range(settings["n"])]
        self.replies = [Reply(app.tokenizer, settings["stop"]) for _ in self.jobs]
        self.worker = app.pool.submit(self.jobs)

    def collect(self, emit, stopped):
        """
        emit(i, kind, text) for each complete piece of reply i as its tokens arrive; returns the
        Replies, or None as soon as stopped() says the client has gone (the worker then frees
        their rows at its next step).
        """
        running, error = len(self.jobs), None
        while running:
            try:
                i, token, logprob = self.out.get(timeout=POLL_S)
            except queue.Empty:
                if not self.worker.thread.is_alive():   # its boundary failed too (out of memory twice)
                    raise RuntimeError(f"worker {self.worker.index} has stopped; restart serve.py") from None
                token = False   # nothing new: only check on the client
            if token is None or isinstance(token, Exception):
                running -= 1
                error = token or error
                for kind, text in self.replies[i].close(self.max_new):
                    emit(i, kind, text)
            elif token is not False:
                for kind, text in self.replies[i].push(token, logprob):
                    emit(i, kind, text)
                self.jobs[i].cancelled = self.replies[i].finish_reason is not None
            if stopped():
                self.cancel()
                return None
        if error is not None:
            raise error
        return self.replies

    def cancel(self):
        """Stop every reply: a running one leaves its row at the worker's next step; a waiting one
        gives its place in the queue back now."""
        with self.worker.lock:
            for job in self.jobs:
                if not job.admitted and not job.cancelled:
                    self.worker.in_flight -= 1
                job.cancelled = True


def peer_closed(sock):
    """True once the client has closed its end: readable with nothing to read. Never blocks.
    FOOTGUN: a client that half-closes (shutdown(SHUT_WR)) after sending its request looks gone
    too; browsers, curl, requests and the OpenAI SDKs keep both directions open."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True

# ---------------------------------------------------------------------------
# the model: load once at startup; a missing artifact leaves the server up with the reason


def load_workers(stage_name, step_num, tag_name, device_name, replicas, rows, queued):
    """-> (tokenizer, [Worker], meta). One replica per GPU (or `replicas`, round-robin); CPU/MPS: `replicas` or 1.
    Each decodes up to `rows` replies together and queues `queued` more."""
    tokenizer = gpt.load_tokenizer()
    _, _, _, _, dev = gpt.compute_init(device_name)
    if dev.type == "cuda":
        devices = [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    else:
        devices = [dev]
    count = replicas or len(devices)
    workers, meta = [], None
    for i in range(count):
        d = devices[i % len(devices)]
        model, meta, _ = gpt.load_checkpoint(stage_name, d, step=None if step_num < 0 else step_num,
                                             tag=tag_name or None, tokenizer=tokenizer)
        workers.append(Worker(i, gpt.Engine(gpt.inference_model(model).eval(), tokenizer), str(d), rows, queued))
    return tokenizer, workers, meta


class App:
    """What the handlers share: the tokenizer, the worker pool, defaults, counters."""

    def __init__(self, tokenizer, workers, meta, defaults, load_error=None, cors_origins=()):
        self.tokenizer, self.pool, self.defaults = tokenizer, Pool(workers), defaults
        self.cors_origins = set(cors_origins)
        self.load_error = load_error
        self.about = None   # TINY_WORLD_NOTE when the model learned the synthetic mirror
        self.ready = bool(workers) and load_error is None
        self.context_len = workers[0].engine.model.config.sequence_len if self.ready else 0
        if self.ready:
            cfg = workers[0].engine.model.config
            self.model_id = f"slimchat-{meta.get('stage', '?')}-d{cfg.n_layer}-{meta.get('step', 0):06d}"
        else:
            self.model_id = "slimchat (not loaded)"
        self.started = time.time()
        self.lock = threading.Lock()
        self.counts = {"requests": 0, "active": 0, "errors": 0, "disconnects": 0}

    def model_card(self):
        return {"id": self.model_id, "object": "model", "created": int(self.started), "owned_by": "slimchat"}

    def count(self, name, delta=1):
        with self.lock:
            self.counts[name] += delta

    def health(self):
        out = {"status": "ok" if self.ready else "model not loaded", "ready": self.ready,
               "model": self.model_id if self.ready else None, "num_workers": len(self.pool.workers),
               "available_workers": self.pool.available(), "context_len": self.context_len,
               "max_rows": self.pool.workers[0].max_rows if self.ready else 0, "defaults": self.defaults,
               "about": self.about}
        if not self.ready:
            out["error"] = self.load_error
        return out

    def stats(self):
        # rows: replies decoding now; in_flight: those plus the ones waiting for a row
        workers = [{"gpu_id": w.index, "device": w.device, "busy": w.in_flight > 0, "rows": len(w.decoder.rows),
                    "in_flight": w.in_flight, "requests": w.requests, "tokens": w.tokens} for w in self.pool.workers]
        available = self.pool.available()
        with self.lock:
            counts = dict(self.counts)
        return {"total_workers": len(workers), "available_workers": available,
                "busy_workers": len(workers) - available, "rows": sum(w["rows"] for w in workers),
                "waiting": sum(w["in_flight"] - w["rows"] for w in workers), "workers": workers,
                "uptime_s": round(time.time() - self.started, 1), **counts}

# ---------------------------------------------------------------------------
# HTTP


class Handler(BaseHTTPRequestHandler):
    """Routes requests to the App. Every failure becomes a JSON error; none escapes the handler."""
    protocol_version = "HTTP/1.1"   # keep-alive for JSON; streams close the connection when done
    timeout = SOCKET_TIMEOUT
    server_version = "slimchat"

    def do_GET(self):
        app = self.server.app
        path = self.path.split("?", 1)[0]
        if path == "/health":
            self.send_json(200 if app.ready else 503, app.health())
        elif path == "/stats":
            self.send_json(200, app.stats())
        elif path == "/v1/models":
            self.send_json(200, {"object": "list", "data": [app.model_card()] if app.ready else []})
        elif path.startswith("/v1/models/"):
            name = urllib.parse.unquote(path[len("/v1/models/"):])
            if app.ready and name == app.model_id:
                self.send_json(200, app.model_card())
            else:
                self.send_json(404, error_body(f"no model {name[:80]!r} here; GET /v1/models lists the one served", 404))
        else:
            self.send_static("index.html" if path == "/" else path.lstrip("/"))

    def do_POST(self):
        path = self.path.split("?", 1)[0]
        if path not in ("/chat/completions", "/v1/chat/completions"):
            self.close_connection = True  # the body is unread: the connection can't carry more requests
            return self.send_json(404, error_body(f"no POST endpoint {path}; see GET /health", 404))
        try:
            self.chat(openai=path.startswith("/v1/"))
        except ApiError as e:
            self.close_connection = True
            self.send_json(e.status, error_body(e.message, e.status))
        # server boundary: a bug must cost one request a 500, never the server (streams catch their own)
        except Exception as e:
            traceback.print_exc()
            self.server.app.count("errors")
            self.close_connection = True
            self.send_json(500, error_body(f"internal error: {type(e).__name__}: {e}", 500))

    def do_OPTIONS(self):
        """A CORS preflight: what a page from an allowed origin may send (end_headers adds the origin)."""
        self.close_connection = self.headers.get("Content-Length", "0") != "0"   # a body we won't read
        self.send_response(204)
        self.send_header("Allow", "GET, POST, OPTIONS")
        if self.cors_origin():
            self.send_header("Access-Control-Allow-Methods", "GET, POST, OPTIONS")
            self.send_header("Access-Control-Allow-Headers",
                             self.headers.get("Access-Control-Request-Headers", "Content-Type, Authorization"))
            self.send_header("Access-Control-Max-Age", "600")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def send_error(self, code, message=None, explain=None):
        """http.server's own refusals (an unknown method, a malformed request line) as JSON like
        ours; an unknown method is 405 Method Not Allowed, not its HTML 501."""
        if code == 501:
            code, message = 405, f"{self.command} is not supported here; use GET, POST or OPTIONS"
        self.close_connection = True
        self.send_json(code, error_body(message or HTTPStatus(code).phrase, code))

    def cors_origin(self):
        """The request's Origin when --cors_origins allows it (or "*" for any), else None."""
        allowed = self.server.app.cors_origins
        origin = self.headers.get("Origin") if getattr(self, "headers", None) else None
        return ("*" if "*" in allowed else origin) if origin and ("*" in allowed or origin in allowed) else None

    def end_headers(self):
        origin = self.cors_origin()
        if origin:   # on every response, errors and streams included, so the page can read them
            self.send_header("Access-Control-Allow-Origin", origin)
            self.send_header("Vary", "Origin")
        super().end_headers()

    def chat(self, openai):
        app = self.server.app
        req = check_request(parse_body(self.read_body()), app.defaults)
        if not openai and (req["n"] != 1 or req["logprobs"] is not None):
            raise ApiError(400, "'n' and 'logprobs' are for /v1/chat/completions; this endpoint streams one reply")
        if not app.ready:
            raise ApiError(503, f"model not loaded: {app.load_error}")
        ids, max_new, dropped = fit_context(app.tokenizer, req["messages"], app.context_len, req["max_tokens"])
        seed = req["seed"] if req["seed"] is not None else random.randrange(2 ** 31)
        app.count("requests")
        gen = Generation(app, ids, max_new, req, seed)
        app.count("active")
        try:
            if not openai:
                self.stream_simple(gen, len(ids), dropped)
            elif req["stream"]:
                self.stream_openai(gen, len(ids), req["include_usage"], req["logprobs"] is not None)
            else:
                self.complete_openai(gen, len(ids), req["logprobs"] is not None)
        finally:
            gen.cancel()   # a no-op after a whole reply; after a failure, the rows are freed
            app.count("active", -1)

    # --- the three reply shapes --------------------------------------------------------------
    def stream_simple(self, gen, prompt_tokens, dropped):
        """The reference's SSE format, with each piece's kind and, at the end, usage."""
        gpu = gen.worker.index
        replies = self.run_stream(gen, lambda i, kind, text: {"token": text, "type": kind, "gpu": gpu})
        if replies is not None:
            reply = replies[0]
            self.send_event({"done": True, "finish_reason": reply.finish_reason, "trimmed_messages": dropped,
                             "usage": usage(prompt_tokens, reply.num_tokens)})

    def stream_openai(self, gen, prompt_tokens, include_usage, logprobs):
        """chat.completion.chunk events (one choice per chunk), then [DONE]; python tool calls are not shown."""
        head = {"id": "chatcmpl-" + uuid.uuid4().hex[:24], "object": "chat.completion.chunk",
                "created": int(time.time()), "model": self.server.app.model_id}

        def chunk(i, delta, finish=None, entries=None):
            choice = {"index": i, "delta": delta, "finish_reason": finish}
            if entries is not None:
                choice["logprobs"] = {"content": entries}
            return {**head, "choices": [choice]}

        def piece(i, kind, text):   # a piece carries the logprobs of the tokens that completed it
            if kind == "python":
                return None
            return chunk(i, {"content": text}, entries=gen.replies[i].take_logprobs() if logprobs else None)

        replies = self.run_stream(gen, piece, [chunk(i, {"role": "assistant", "content": ""})
                                               for i in range(len(gen.jobs))])
        if replies is None:
            return
        for i, reply in enumerate(replies):
            self.send_event(chunk(i, {}, reply.finish_reason))
        if include_usage:
            self.send_event({**head, "choices": [], "usage": usage(prompt_tokens, sum(r.num_tokens for r in replies))})
        self.send_sse_line(b"data: [DONE]\n\n")

    def complete_openai(self, gen, prompt_tokens, logprobs):
        app = self.server.app
        # nothing is sent until the end, so a departed client is noticed by peeking at its socket
        replies = gen.collect(lambda i, kind, text: None, functools.partial(peer_closed, self.connection))
        if replies is None:
            app.count("disconnects")
            return
        self.send_json(200, {
            "id": "chatcmpl-" + uuid.uuid4().hex[:24], "object": "chat.completion", "created": int(time.time()),
            "model": app.model_id,
            "choices": [{"index": i, "message": {"role": "assistant", "content": r.visible_text()},
                         "logprobs": {"content": r.logprobs} if logprobs else None,
                         "finish_reason": r.finish_reason} for i, r in enumerate(replies)],
            "usage": usage(prompt_tokens, sum(r.num_tokens for r in replies))})

    def run_stream(self, gen, event, first=()):
        """Send SSE headers, then one event per piece; returns the Replies, or None if the client left."""
        app = self.server.app
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")  # the stream's end is the connection's end
        self.end_headers()
        self.close_connection = True
        state = {"gone": False}
        sock = self.connection

        def emit(i, kind, text):
            payload = event(i, kind, text)
            if payload is not None and not state["gone"]:
                state["gone"] = not self.send_event(payload)

        def stopped():
            state["gone"] = state["gone"] or peer_closed(sock)
            return state["gone"]

        for payload in first:
            state["gone"] = state["gone"] or not self.send_event(payload)
        try:
            replies = gen.collect(emit, stopped)
        # server boundary: a failure mid-stream can't change the 200 already sent, so it becomes an error event
        except Exception as e:
            traceback.print_exc()
            app.count("errors")
            self.send_event({"error": f"generation failed: {type(e).__name__}: {e}"})
            return None
        if replies is None or state["gone"]:
            app.count("disconnects")
            return None
        return replies

    # --- plumbing ---------------------------------------------------------------------------
    def read_body(self):
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            raise ApiError(411, "send the body with a Content-Length header, not chunked")
        length = self.headers.get("Content-Length")
        if length is None:
            raise ApiError(411, "a Content-Length header is required")
        if not length.isdigit():
            raise ApiError(400, f"bad Content-Length {length[:40]!r}")
        if int(length) > MAX_BODY_BYTES:
            raise ApiError(413, f"request body is {int(length)} bytes; the limit is {MAX_BODY_BYTES}")
        raw = self.rfile.read(int(length))
        if len(raw) < int(length):
            raise ApiError(400, f"request body ended after {len(raw)} of {length} bytes")
        return raw

    def send_event(self, payload):
        return self.send_sse_line(b"data: " + json.dumps(payload, ensure_ascii=False).encode() + b"\n\n")

    def send_sse_line(self, data):
        """Write one event; False if the client has gone (its slot is then freed by the caller)."""
        try:
            self.wfile.write(data)
            self.wfile.flush()
            return True
        except OSError:   # broken pipe, reset, or the socket timeout: the client is not reading
            return False

    def send_json(self, status, payload):
        data = json.dumps(payload, ensure_ascii=False).encode()
        self.send_bytes(status, data, "application/json")

    def send_bytes(self, status, data, content_type):
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("X-Content-Type-Options", "nosniff")
            if content_type.startswith("text/html"):
                # the page loads only its own files; nothing inline, nothing remote
                self.send_header("Content-Security-Policy", "default-src 'self'; img-src 'self' data:")
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)
        except OSError:
            self.close_connection = True

    def send_static(self, name):
        """Serve a file that sits directly in static/; anything else (.., subfolders) is a 404."""
        ext = os.path.splitext(name)[1]
        if ext not in CONTENT_TYPES or name not in os.listdir(STATIC_DIR):
            return self.send_json(404, error_body(f"not found: /{name[:80]}", 404))
        with open(os.path.join(STATIC_DIR, name), "rb") as f:
            self.send_bytes(200, f.read(), CONTENT_TYPES[ext])

    def log_message(self, fmt, *args):
        sys.stderr.write(f"{self.address_string()} {fmt % args}\n")


def error_body(message, status):
    """OpenAI's error shape, which the page reads too."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "code": status}}


def usage(prompt_tokens, completion_tokens):
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class ChatServer(ThreadingHTTPServer):
    daemon_threads = True   # a stuck client must not keep the process alive at shutdown
    allow_reuse_address = True
    # socketserver's default backlog of 5 resets (or delays by a 1 s SYN retry) the 6th of many
    # clients connecting at once; batching serves dozens of streams together, so queue more
    request_queue_size = 128

    def __init__(self, address, app):
        super().__init__(address, Handler)
        self.app = app


def build_app(config):
    """Load the model for `config` (the knob dict); on a missing artifact, an App that says why."""
    defaults = {"temperature": config["temperature"], "top_k": config["top_k"] or None,
                "max_tokens": config["max_tokens"]}
    try:
        gpt.require_checkpoint(config["stage"], config["tag"] or None)   # "no model" before "no tokenizer"
        tokenizer, workers, meta = load_workers(config["stage"], config["step"], config["tag"], config["device"],
                                                config["num_workers"], config["max_rows"], config["max_queue"])
    # startup boundary: serve the page and a 503 rather than die, so the user sees what is missing
    except (OSError, ValueError, AssertionError) as e:
        return App(None, [], None, defaults, load_error=str(e))
    origins = [o.strip() for o in config["cors_origins"].split(",") if o.strip()]
    app = App(tokenizer, workers, meta, defaults, cors_origins=origins)
    app.about = TINY_WORLD_NOTE if gpt.synthetic_data() else None
    return app


def find_home(stage_name, tag_name):
    """With SLIMCHAT_HOME unset and no checkpoint of the stage in the default home, point
    SLIMCHAT_HOME at the newest other home that has one (the tiny preset's, ~/.cache/slimchat-tiny),
    and say so: `python serve.py` after `bash run_all.sh tiny` then serves the tiny model."""
    if os.environ.get("SLIMCHAT_HOME") or gpt.latest_step(stage_name, tag_name or None) is not None:
        return
    others = gpt.other_homes(os.path.join("checkpoints", stage_name, tag_name or "*", "meta_*.json"))
    if others:
        print(f"no {stage_name} model under {gpt.home()}; serving the one under {others[0]} "
              f"(set SLIMCHAT_HOME to choose another)", file=sys.stderr)
        os.environ["SLIMCHAT_HOME"] = others[0]


def listen(host_name, port_num):
    """The HTTP server bound to host:port, before the model loads; a port in use is one line and exit 1."""
    try:
        return ChatServer((host_name, port_num), None)
    except OSError as e:
        sys.exit(f"cannot listen on {host_name}:{port_num}: {e.strerror or e}; another server (a serve.py "
                 f"still running?) may hold the port: stop it, or pick another with --port=N (0 = any free port)")


# ---------------------------------------------------------------------------
# terminal chat


def cli_argv(argv):
    """Turn the flag forms (--cli, -p TEXT, --prompt TEXT) into the --name=value that apply_overrides takes."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--cli":
            out.append("--cli=1")
        elif arg in ("-p", "--prompt"):
            if i + 1 >= len(argv):
                sys.exit(f"{arg} needs the prompt text after it")
            out += ["--cli=1", f"--prompt={argv[i + 1]}"]
            i += 1
        else:
            out.append(arg)
        i += 1
    return out


def print_piece(state, kind, text):
    """Show a reply in the terminal; a tool call prints as <<expr=result>> like in GSM8K solutions."""
    if kind != state["kind"]:
        marks = {("text", "python"): "<<", ("python", "python_output"): "=", ("python", "text"): ">>",
                 ("python_output", "text"): ">>", ("text", "python_output"): "<<="}
        print(marks.get((state["kind"], kind), ""), end="")
        state["kind"] = kind
    print(text, end="", flush=True)


def terminal_reply(app, messages, config):
    """One streamed reply printed to stdout; returns it as a history message (None if interrupted).
    A reply cut at the token limit is marked so on stderr."""
    ids, max_new, _ = fit_context(app.tokenizer, messages, app.context_len, config["max_tokens"])
    state = {"kind": "text"}
    settings = {"temperature": config["temperature"], "top_k": config["top_k"] or None, "top_p": None, "n": 1,
                "stop": [], "logprobs": None}
    gen = Generation(app, ids, max_new, settings, random.randrange(2 ** 31))
    try:
        reply = gen.collect(lambda i, kind, text: print_piece(state, kind, text), lambda: False)[0]
    except KeyboardInterrupt:   # Ctrl-C stops this reply, not the chat
        gen.cancel()
        print(" [stopped]")
        return None
    print_piece(state, "text", "")
    print(flush=True)
    if reply.finish_reason == "length":
        why = ("raise it with --max_tokens=N or /maxtokens N" if max_new == config["max_tokens"]
               else "the model's context is full; /clear starts over")
        print(f"[reply cut at the {max_new}-token limit: {why}]", file=sys.stderr, flush=True)
    return reply.message()


def history_with(messages, text):
    """The history plus a new user turn, dropping the oldest pairs while it breaks a request limit
    (message count, total characters); fit_context later trims it to the model's context."""
    turn = messages + [{"role": "user", "content": text}]
    while True:
        try:
            return check_messages(turn)
        except ApiError:
            if len(turn) == 1:
                raise
            turn = turn[2:]


TERMINAL_HELP = """/temperature [v]  show or set the sampling temperature (0 to 2)
/topk [v]         show or set top-k (1 to 200)
/maxtokens [v]    show or set the reply's token limit (1 to 4096)
/clear            start a new chat
/help             this list
/quit             leave (also Ctrl-D)"""
TERMINAL_SETTINGS = {"/temperature": ("temperature", TEMPERATURE_RANGE, float),
                     "/topk": ("top_k", TOP_K_RANGE, int), "/maxtokens": ("max_tokens", MAX_TOKENS_RANGE, int)}


def terminal_setting(config, command, arg):
    """/temperature, /topk, /maxtokens: show the setting, or set it within its range; -> the line to print."""
    name, (lo, hi), kind = TERMINAL_SETTINGS[command]
    if not arg:
        return f"{name} = {config[name]}"
    try:
        value = kind(arg)
    except ValueError:
        return f"{command} takes {'a number' if kind is float else 'a whole number'} from {lo} to {hi}"
    if not lo <= value <= hi:
        return f"{command} takes a value from {lo} to {hi}"
    config[name] = value
    return f"{name} = {value}"


def settings_line(app, config):
    return (f"slimchat {app.model_id}: temperature {config['temperature']}, top_k {config['top_k']}, "
            f"max_tokens {config['max_tokens']}")


def chat_in_terminal(app, config):
    if not app.ready:
        sys.exit(f"model not loaded: {app.load_error}")
    config = dict(config)   # /temperature and friends change this chat's copy
    if config["prompt"]:   # stdout gets the reply only, so it can be piped
        print(settings_line(app, config), file=sys.stderr)
        try:
            terminal_reply(app, check_messages([{"role": "user", "content": config["prompt"]}]), config)
        except ApiError as e:
            sys.exit(e.message)
        return
    print(settings_line(app, config))
    if app.about:
        print(app.about)
    print("type a message; /help lists the commands, /quit or Ctrl-D leaves.")
    messages = []
    while True:
        try:
            text = input("\nyou> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        command, _, arg = text.partition(" ")
        if command in ("/quit", "/exit", "quit", "exit"):
            return
        if command in ("/clear", "clear"):
            messages = []
            print("(conversation cleared)")
            continue
        if command == "/help":
            print(TERMINAL_HELP)
            continue
        if command in TERMINAL_SETTINGS:
            print(terminal_setting(config, command, arg.strip()))
            continue
        if command.startswith("/") and command[1:].isalpha():
            print(f"unknown command {command}; try /help")
            continue
        if not text:
            continue
        try:
            turn = history_with(messages, text)
        except ApiError as e:
            print(f"(not sent: {e.message})")
            continue
        print("bot> ", end="", flush=True)
        try:
            reply = terminal_reply(app, turn, config)
        except ApiError as e:
            print(f"(not sent: {e.message})")
            continue
        if reply is not None:   # old turns stay in `messages`; fit_context drops them when they no longer fit
            messages = turn + [reply]


if __name__ == "__main__":
    argv = cli_argv(sys.argv[1:])
    if "--help" in argv or "-h" in argv:
        gpt.apply_overrides(globals(), argv)
    with contextlib.redirect_stdout(sys.stderr):   # startup chatter on stderr: `-p` prints only the reply
        config = gpt.apply_overrides(globals(), argv)
        gpt.check_stage(config["stage"])
        find_home(config["stage"], config["tag"])
        server = None if config["cli"] else listen(config["host"], config["port"])
        app = build_app(config)
    if config["cli"]:
        chat_in_terminal(app, config)
        sys.exit(0)
    if not app.ready:
        print(f"model not loaded: {app.load_error}\nserving the page anyway; chat requests get 503", file=sys.stderr)
    server.app = app
    print(f"slimchat serving {app.model_id} on http://{config['host']}:{server.server_address[1]}/ "
          f"with {len(app.pool.workers)} worker(s)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
