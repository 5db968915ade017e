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
  POST /v1/chat/completions  OpenAI Chat Completions: stream and non-stream, usage, finish_reason
  GET  /v1/models, /health, /stats
Concurrency: a pool of workers, each one model replica on one device (one per GPU; on CPU,
--num_workers replicas). A request holds one worker for its whole reply, so no two threads
ever drive one model; a client that disconnects frees its worker at the next token.

Run:
  python serve.py                          # latest sft checkpoint, http://127.0.0.1:8000
  python serve.py --stage=base --port=8080 --temperature=0.6 --top_k=50 --max_tokens=256
  python serve.py --cli                    # terminal chat (quit/exit to leave, clear to restart)
  python serve.py -p "Why is the sky blue?"    # one reply in the terminal, then exit
Options are --name=value for every knob below; `--cli` alone means --cli=1, and `-p TEXT` /
`--prompt TEXT` mean --cli=1 --prompt=TEXT.
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
import uuid
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
cli = False                # chat in the terminal instead of serving HTTP
prompt = ""                # with cli: answer this one prompt and exit; "" = interactive
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
WORKER_WAIT = 60.0         # seconds a request waits for a free worker before a 503
ROLES = ("system", "user", "assistant")
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
        clean.append({"role": m["role"], "content": content})
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
    """Validated chat request -> dict(messages, temperature, top_k, max_tokens, seed, stream, include_usage).
    Fields not named here (model, user, stop, ...) are ignored, as OpenAI clients send many."""
    out = {"messages": check_messages(body.get("messages"))}
    out["temperature"] = _number(body, "temperature", *TEMPERATURE_RANGE, defaults["temperature"], False)
    out["top_k"] = _number(body, "top_k", *TOP_K_RANGE, defaults["top_k"], True)
    limit = body.get("max_completion_tokens", None)  # OpenAI's newer name for max_tokens
    name = "max_tokens" if limit is None else "max_completion_tokens"
    out["max_tokens"] = _number(body, name, *MAX_TOKENS_RANGE, defaults["max_tokens"], True)
    out["seed"] = _number(body, "seed", 0, 2 ** 63 - 1, None, True)
    if body.get("n", 1) != 1 or type(body.get("n", 1)) is bool:
        raise ApiError(400, "'n' must be 1: one reply per request")
    out["stream"] = False if body.get("stream") is None else body["stream"]
    if not isinstance(out["stream"], bool):
        raise ApiError(400, "'stream' must be true or false")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise ApiError(400, "'stream_options' must be an object like {\"include_usage\": true}")
    out["include_usage"] = options.get("include_usage", False)
    return out

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
# generation: token ids -> typed text pieces, on a worker held by exactly one thread


class Reply:
    """
    Turns the generated ids of one reply into text pieces of a kind (text, python,
    python_output), emitted only at UTF-8 character boundaries, and records the reply's parts,
    token count and finish reason ("stop" at a turn-ending special, "length" at the token cap).
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.stops = {tokenizer.special(name) for name in STOP_TOKENS}
        self.switch = {tokenizer.special(name): kind for name, kind in PART_SWITCH.items()}
        self.kind, self.decoder = "text", tokenizer.stream_decoder()
        self.parts, self.num_tokens, self.finish_reason = [], 0, None

    def push(self, token):
        """One generated id -> list of (kind, text) pieces that are now complete."""
        self.num_tokens += 1
        if token in self.stops:
            self.finish_reason = "stop"
            return self._flush()
        if token in self.switch:
            pieces = self._flush()
            self.kind = self.switch[token]
            return pieces
        return self._add(self.decoder.push(token))

    def close(self, max_new):
        """End of generation: the last pieces, and the finish reason if no stop token came."""
        pieces = self._flush()
        if self.finish_reason is None:
            self.finish_reason = "length" if self.num_tokens >= max_new else "stop"
        return pieces

    def _add(self, text):
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
        return pieces

    def visible_text(self):
        """What a plain-text client shows: the text and the tool results, not the tool calls."""
        return "".join(p["text"] for p in self.parts if p["type"] != "python")

    def message(self):
        """The reply as a history message: plain text, or parts when it used the tool."""
        if all(p["type"] == "text" for p in self.parts):
            return {"role": "assistant", "content": "".join(p["text"] for p in self.parts)}
        return {"role": "assistant", "content": [dict(p) for p in self.parts]}


class Worker:
    """One model replica on one device. Only the thread that took it from the pool may use it."""

    def __init__(self, index, engine, device):
        self.index, self.engine, self.device = index, engine, device
        self.in_use = threading.Lock()   # held while generating: asserts the one-thread rule
        self.requests, self.tokens = 0, 0


class Pool:
    """Free workers in a queue; `hold` lends one to a request and always gives it back."""

    def __init__(self, workers):
        self.workers = workers
        self.free = queue.Queue()
        for w in workers:
            self.free.put(w)

    def available(self):
        return self.free.qsize()

    @contextlib.contextmanager
    def hold(self, timeout):
        try:
            worker = self.free.get(timeout=timeout)
        except queue.Empty:
            raise ApiError(503, f"all {len(self.workers)} workers are busy; retry in a moment") from None
        acquired = worker.in_use.acquire(blocking=False)
        assert acquired, f"worker {worker.index} was handed out twice"
        try:
            yield worker
        finally:
            worker.in_use.release()
            self.free.put(worker)


def generate(worker, tokenizer, ids, max_new, temperature, top_k, seed, emit, stopped):
    """
    Run one reply on `worker`: emit(kind, text) for each complete piece; stop as soon as the
    reply ends or stopped() says the client has gone. Returns the Reply.
    """
    reply = Reply(tokenizer)
    tokens = worker.engine.generate(ids, num_samples=1, max_tokens=max_new, temperature=float(temperature),
                                    top_k=top_k or None, seed=seed)
    try:
        for column, _ in tokens:
            for kind, text in reply.push(column[0]):
                emit(kind, text)
            if reply.finish_reason or stopped():
                break
    finally:
        tokens.close()   # frees the KV cache now, not whenever the generator is collected
    for kind, text in reply.close(max_new):
        emit(kind, text)
    worker.requests += 1
    worker.tokens += reply.num_tokens
    return reply


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


def load_workers(stage_name, step_num, tag_name, device_name, replicas):
    """-> (tokenizer, [Worker], meta). One replica per GPU (or `replicas`, round-robin); CPU/MPS: `replicas` or 1."""
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
        workers.append(Worker(i, gpt.Engine(gpt.inference_model(model).eval(), tokenizer), str(d)))
    return tokenizer, workers, meta


class App:
    """What the handlers share: the tokenizer, the worker pool, defaults, counters."""

    def __init__(self, tokenizer, workers, meta, defaults, load_error=None):
        self.tokenizer, self.pool, self.defaults = tokenizer, Pool(workers), defaults
        self.load_error = load_error
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

    def count(self, name, delta=1):
        with self.lock:
            self.counts[name] += delta

    def health(self):
        out = {"status": "ok" if self.ready else "model not loaded", "ready": self.ready,
               "model": self.model_id if self.ready else None, "num_workers": len(self.pool.workers),
               "available_workers": self.pool.available(), "context_len": self.context_len,
               "defaults": self.defaults}
        if not self.ready:
            out["error"] = self.load_error
        return out

    def stats(self):
        workers = [{"gpu_id": w.index, "device": w.device, "busy": w.in_use.locked(), "requests": w.requests,
                    "tokens": w.tokens} for w in self.pool.workers]
        available = self.pool.available()
        with self.lock:
            counts = dict(self.counts)
        return {"total_workers": len(workers), "available_workers": available,
                "busy_workers": len(workers) - available, "workers": workers,
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
            models = [{"id": app.model_id, "object": "model", "created": int(app.started),
                       "owned_by": "slimchat"}] if app.ready else []
            self.send_json(200, {"object": "list", "data": models})
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

    def not_allowed(self):
        self.close_connection = True
        self.send_json(405, error_body(f"{self.command} is not supported here; use GET or POST", 405))

    do_PUT = do_DELETE = do_PATCH = not_allowed

    def chat(self, openai):
        app = self.server.app
        req = check_request(parse_body(self.read_body()), app.defaults)
        if not app.ready:
            raise ApiError(503, f"model not loaded: {app.load_error}")
        ids, max_new, dropped = fit_context(app.tokenizer, req["messages"], app.context_len, req["max_tokens"])
        seed = req["seed"] if req["seed"] is not None else random.randrange(2 ** 31)
        app.count("requests")
        with app.pool.hold(WORKER_WAIT) as worker:
            app.count("active")
            try:
                args = (worker, ids, max_new, req, seed, dropped)
                if not openai:
                    self.stream_simple(*args)
                elif req["stream"]:
                    self.stream_openai(*args)
                else:
                    self.complete_openai(*args)
            finally:
                app.count("active", -1)

    # --- the three reply shapes --------------------------------------------------------------
    def stream_simple(self, worker, ids, max_new, req, seed, dropped):
        """The reference's SSE format, with each piece's kind and, at the end, usage."""
        gpu = worker.index
        reply = self.run_stream(worker, ids, max_new, req, seed,
                                lambda kind, text: {"token": text, "type": kind, "gpu": gpu})
        if reply is not None:
            self.send_event({"done": True, "finish_reason": reply.finish_reason, "trimmed_messages": dropped,
                             "usage": usage(len(ids), reply.num_tokens)})

    def stream_openai(self, worker, ids, max_new, req, seed, dropped):
        """chat.completion.chunk events, then [DONE]; the python tool calls are not shown here."""
        head = {"id": "chatcmpl-" + uuid.uuid4().hex[:24], "object": "chat.completion.chunk",
                "created": int(time.time()), "model": self.server.app.model_id}

        def chunk(delta, finish=None):
            return {**head, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

        def piece(kind, text):
            return None if kind == "python" else chunk({"content": text})

        reply = self.run_stream(worker, ids, max_new, req, seed, piece,
                                first=chunk({"role": "assistant", "content": ""}))
        if reply is None:
            return
        self.send_event(chunk({}, reply.finish_reason))
        if req["include_usage"]:
            self.send_event({**head, "choices": [], "usage": usage(len(ids), reply.num_tokens)})
        self.send_sse_line(b"data: [DONE]\n\n")

    def complete_openai(self, worker, ids, max_new, req, seed, dropped):
        app = self.server.app
        # nothing is sent until the end, so a departed client is noticed by peeking at its socket
        gone = functools.partial(peer_closed, self.connection)
        reply = generate(worker, app.tokenizer, ids, max_new, req["temperature"], req["top_k"], seed,
                         lambda kind, text: None, gone)
        if gone():
            app.count("disconnects")
            return
        self.send_json(200, {
            "id": "chatcmpl-" + uuid.uuid4().hex[:24], "object": "chat.completion", "created": int(time.time()),
            "model": app.model_id,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": reply.visible_text()},
                         "finish_reason": reply.finish_reason}],
            "usage": usage(len(ids), reply.num_tokens)})

    def run_stream(self, worker, ids, max_new, req, seed, event, first=None):
        """Send SSE headers, then one event per piece; returns the Reply, or None if the client left."""
        app = self.server.app
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")  # the stream's end is the connection's end
        self.end_headers()
        self.close_connection = True
        state = {"gone": False}
        sock = self.connection

        def emit(kind, text):
            payload = event(kind, text)
            if payload is not None and not state["gone"]:
                state["gone"] = not self.send_event(payload)

        def stopped():
            state["gone"] = state["gone"] or peer_closed(sock)
            return state["gone"]

        if first is not None:
            state["gone"] = not self.send_event(first)
        try:
            reply = generate(worker, app.tokenizer, ids, max_new, req["temperature"], req["top_k"], seed, emit, stopped)
        # server boundary: a failure mid-stream can't change the 200 already sent, so it becomes an error event
        except Exception as e:
            traceback.print_exc()
            app.count("errors")
            self.send_event({"error": f"generation failed: {type(e).__name__}: {e}"})
            return None
        if state["gone"]:
            app.count("disconnects")
            return None
        return reply

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

    def __init__(self, address, app):
        super().__init__(address, Handler)
        self.app = app


def build_app(config):
    """Load the model for `config` (the knob dict); on a missing artifact, an App that says why."""
    defaults = {"temperature": config["temperature"], "top_k": config["top_k"] or None,
                "max_tokens": config["max_tokens"]}
    try:
        tokenizer, workers, meta = load_workers(config["stage"], config["step"], config["tag"],
                                                config["device"], config["num_workers"])
    # startup boundary: serve the page and a 503 rather than die, so the user sees what is missing
    except (OSError, ValueError, AssertionError) as e:
        return App(None, [], None, defaults, load_error=str(e))
    return App(tokenizer, workers, meta, defaults)

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
    """One streamed reply printed to stdout; returns it as a history message (None if interrupted)."""
    ids, max_new, _ = fit_context(app.tokenizer, messages, app.context_len, config["max_tokens"])
    state = {"kind": "text"}
    try:
        with app.pool.hold(WORKER_WAIT) as worker:
            reply = generate(worker, app.tokenizer, ids, max_new, config["temperature"], config["top_k"],
                             random.randrange(2 ** 31), lambda kind, text: print_piece(state, kind, text),
                             lambda: False)
    except KeyboardInterrupt:   # Ctrl-C stops this reply, not the chat
        print(" [stopped]")
        return None
    print_piece(state, "text", "")
    print()
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


def chat_in_terminal(app, config):
    if not app.ready:
        sys.exit(f"model not loaded: {app.load_error}")
    if config["prompt"]:
        try:
            terminal_reply(app, check_messages([{"role": "user", "content": config["prompt"]}]), config)
        except ApiError as e:
            sys.exit(e.message)
        return
    print(f"slimchat {app.model_id}: type a message; 'clear' starts over, 'quit' or Ctrl-D leaves.")
    messages = []
    while True:
        try:
            text = input("\nyou> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if text in ("quit", "exit"):
            return
        if text == "clear":
            messages = []
            print("(conversation cleared)")
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
    config = gpt.apply_overrides(globals(), cli_argv(sys.argv[1:]))
    app = build_app(config)
    if config["cli"]:
        chat_in_terminal(app, config)
        sys.exit(0)
    if not app.ready:
        print(f"model not loaded: {app.load_error}\nserving the page anyway; chat requests get 503", file=sys.stderr)
    server = ChatServer((config["host"], config["port"]), app)
    print(f"slimchat serving {app.model_id} on http://{config['host']}:{server.server_address[1]}/ "
          f"with {len(app.pool.workers)} worker(s)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
