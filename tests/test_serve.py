"""
serve.py over real HTTP on loopback, with a tiny model built here: a tokenizer trained on a few
sentences and an untrained 1-layer GPT whose weights are set so that it never emits a special
token (so replies run to max_tokens and the tests can stop them mid-stream). Also the terminal
chat as a real subprocess.
"""
import http.client
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

import bpe
import gpt
import serve

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SENTENCES = ["The cat sat on the mat.", "A dog ran in the park!", "Hello world, how are you today?",
             "Numbers like 12 and 345 are split.", "Café, naïve, 你好 🌍: some unicode."] * 4
CONTEXT = 4096      # long enough that a reply can still be running when its client leaves


def build_tiny_home(home, workers=2):
    """Tokenizer + an sft checkpoint under `home`; returns the serve config for build_app."""
    tok = bpe.Tokenizer.train(SENTENCES, vocab_size=300)
    tok.save(os.path.join(home, "tokenizer", "tokenizer.json"))
    torch.manual_seed(0)
    config = gpt.GPTConfig(sequence_len=CONTEXT, vocab_size=tok.vocab_size, n_layer=1, n_head=1,
                           n_kv_head=1, n_embd=32)
    model = gpt.new_model(config, "cpu", torch.float32)
    # init zeroes the block outputs, so the last hidden state is norm(wte[token]). A huge first
    # coordinate in every embedding makes that state ~(√C, 0, ...), and a negative first weight
    # on the special rows of lm_head pushes their logits to the -15 softcap: the model then
    # samples (nearly uniformly) among ordinary tokens and never ends a reply on its own.
    with torch.no_grad():
        model.wte.weight[:, 0] = 100.0
        model.lm_head.weight.normal_(0.0, 1.0)
        model.lm_head.weight[:, 0] = 0.0
        model.lm_head.weight[tok.bos_id:, 0] = -3.0
    os.environ["SLIMCHAT_HOME"] = home
    gpt.save_checkpoint("sft", 0, model, {"tokenizer": tok.fingerprint()})
    return {"stage": "sft", "step": -1, "tag": "", "device": "cpu", "num_workers": workers,
            "temperature": 0.8, "top_k": 50, "max_tokens": 32, "max_rows": 8, "max_queue": 8, "cors_origins": ""}


def scripted_app(tokenizer):
    """An App whose model, under greedy decoding, always says "A", calls the calculator on 7*6
    (the engine forces the result 42), then says "!" and ends its turn.

    With zero-initialised block outputs the next-token logits depend on the last token only,
    so giving each token of the script its own embedding axis and pointing the head row of its
    successor along that axis makes a lookup table."""
    sp = tokenizer.special
    script = ([sp("<|assistant_start|>")] + tokenizer.encode("A") + [sp("<|python_start|>")]
              + tokenizer.encode("7*6") + [sp("<|python_end|>"), sp("<|output_end|>")] + tokenizer.encode("!")
              + [sp("<|assistant_end|>")])
    successors = {a: b for a, b in zip(script, script[1:]) if a != sp("<|python_end|>")}  # then the tool speaks
    torch.manual_seed(0)
    config = gpt.GPTConfig(sequence_len=256, vocab_size=tokenizer.vocab_size, n_layer=1, n_head=1,
                           n_kv_head=1, n_embd=32)
    model = gpt.new_model(config, "cpu", torch.float32)
    with torch.no_grad():
        for axis, (token, successor) in enumerate(successors.items()):
            model.wte.weight[token] = 0.0
            model.wte.weight[token, axis] = 10.0
            model.lm_head.weight[successor, axis] = 10.0
    worker = serve.Worker(0, gpt.Engine(model, tokenizer), "cpu", 4, 4)
    return serve.App(tokenizer, [worker], {"stage": "script", "step": 0},
                     {"temperature": 0.0, "top_k": None, "max_tokens": 64})


def start_server(app):
    server = serve.ChatServer(("127.0.0.1", 0), app)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, server.server_address[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(port, app) of a server with 2 CPU workers on the tiny model."""
    home = str(tmp_path_factory.mktemp("home"))
    old = os.environ.get("SLIMCHAT_HOME")
    try:
        app = serve.build_app(build_tiny_home(home))
    finally:
        os.environ.pop("SLIMCHAT_HOME") if old is None else os.environ.__setitem__("SLIMCHAT_HOME", old)
    assert app.ready, app.load_error
    server, port = start_server(app)
    yield port, app, home
    server.shutdown()
    server.server_close()


def request(port, method, path, body=None, headers=None):
    """-> (status, parsed JSON or raw text). body: dict (sent as JSON) or bytes."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    conn.request(method, path, body=data, headers=headers or {})
    resp = conn.getresponse()
    text = resp.read().decode()
    conn.close()
    is_json = resp.getheader("Content-Type", "").startswith("application/json")
    return resp.status, json.loads(text) if is_json else text


def events(text):
    """SSE body -> list of decoded `data:` payloads ([DONE] kept as the string)."""
    out = []
    for block in text.split("\n\n"):
        if block:
            assert block.startswith("data: "), f"not an SSE data line: {block!r}"
            payload = block[len("data: "):]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def chat(content="hello", **extra):
    return {"messages": [{"role": "user", "content": content}], **extra}


def wait_idle(port, workers=2, timeout=5.0):
    """Poll /stats until every worker is back in the pool; return the stats."""
    deadline = time.time() + timeout
    while True:
        status, stats = request(port, "GET", "/stats")
        if stats["available_workers"] == workers or time.time() > deadline:
            return stats
        time.sleep(0.05)

# ---------------------------------------------------------------------------
# the three reply shapes


def test_stream_format(served):
    """The reference SSE format: token events with the worker id, then a done event."""
    port, _, _ = served
    status, text = request(port, "POST", "/chat/completions", chat(max_tokens=12, seed=1))
    assert status == 200
    evs = events(text)
    assert evs[-1]["done"] is True and evs[-1]["finish_reason"] == "length"
    assert evs[-1]["usage"]["completion_tokens"] == 12
    tokens = evs[:-1]
    assert tokens and all(set(e) == {"token", "type", "gpu"} and e["type"] == "text" for e in tokens)
    assert all(e["gpu"] in (0, 1) and e["token"] for e in tokens)
    # the same seed gives the same reply
    _, again = request(port, "POST", "/chat/completions", chat(max_tokens=12, seed=1))
    assert [e.get("token") for e in events(again)] == [e.get("token") for e in evs]


def test_openai_non_stream(served):
    port, app, _ = served
    status, body = request(port, "POST", "/v1/chat/completions",
                           {"model": "anything",
                            "messages": [{"role": "system", "content": "Be brief."},
                                         {"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                            "max_tokens": 7, "temperature": 0, "stream": None, "user": "ignored-field"})
    assert status == 200, body
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["model"] == app.model_id and isinstance(body["created"], int)
    choice = body["choices"][0]
    assert choice["index"] == 0 and choice["finish_reason"] == "length"
    assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
    usage = body["usage"]
    assert usage["completion_tokens"] == 7 and usage["total_tokens"] == usage["prompt_tokens"] + 7


def test_openai_stream(served):
    port, app, _ = served
    status, text = request(port, "POST", "/v1/chat/completions",
                           chat(max_tokens=6, stream=True, stream_options={"include_usage": True}, seed=3))
    assert status == 200
    evs = events(text)
    assert evs[-1] == "[DONE]"
    chunks = evs[:-1]
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == app.model_id for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    usage_chunk, final = chunks[-1], chunks[-2]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == 6
    assert final["choices"][0] == {"index": 0, "delta": {}, "finish_reason": "length"}
    deltas = [c["choices"][0]["delta"]["content"] for c in chunks[1:-2]]
    assert all(isinstance(d, str) and d for d in deltas)
    # streamed and non-streamed replies agree for the same seed
    _, body = request(port, "POST", "/v1/chat/completions", chat(max_tokens=6, seed=3))
    assert "".join(deltas) == body["choices"][0]["message"]["content"]


def test_models_health_stats_and_page(served):
    port, app, _ = served
    status, models = request(port, "GET", "/v1/models")
    assert status == 200 and models["object"] == "list" and models["data"][0]["id"] == app.model_id
    status, health = request(port, "GET", "/health")
    assert status == 200 and health["ready"] is True and health["num_workers"] == 2
    assert health["context_len"] == CONTEXT
    status, stats = request(port, "GET", "/stats")
    assert status == 200 and stats["total_workers"] == 2 and len(stats["workers"]) == 2
    status, page = request(port, "GET", "/")
    assert status == 200 and "<html" in page.lower()
    for path in ("/app.js", "/style.css"):
        assert request(port, "GET", path)[0] == 200
    for path in ("/../serve.py", "/static/../serve.py", "/nope.js", "/%2e%2e/serve.py"):
        assert request(port, "GET", path)[0] == 404, path

# ---------------------------------------------------------------------------
# bad input: every one gets a 4xx JSON error that says what was wrong, and no slot leaks


def _msgs(*pairs):
    return {"messages": [{"role": r, "content": c} for r, c in pairs]}


BAD = [  # (name, raw body or dict, status, words in the message)
    ("not utf-8", b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}', 400, "UTF-8"),
    ("invalid json", b'{"messages": [', 400, "not valid JSON"),
    ("NaN", b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}', 400, "NaN"),
    ("deep nesting", b"[" * 100_000, 400, "not valid JSON"),
    ("array body", b"[1, 2]", 400, "JSON object"),
    ("no messages", {"temperature": 1}, 400, "'messages'"),
    ("empty messages", {"messages": []}, 400, "non-empty"),
    ("messages not a list", {"messages": "hi"}, 400, "'messages'"),
    ("too many messages", _msgs(*([("user", "a"), ("assistant", "b")] * 250 + [("user", "c")])), 400,
     "too many messages"),
    ("message not an object", {"messages": ["hi"]}, 400, "messages[0]"),
    ("no content", {"messages": [{"role": "user"}]}, 400, "'content'"),
    ("unknown role", _msgs(("tool", "x")), 400, "unknown role"),
    ("role not a string", {"messages": [{"role": 7, "content": "x"}]}, 400, "unknown role"),
    ("content a number", {"messages": [{"role": "user", "content": 5}]}, 400, "string or a list"),
    ("user part not text", {"messages": [{"role": "user", "content": [{"type": "python", "text": "1"}]}]},
     400, "messages[0].content[0]"),
    ("assistant part bad", _msgs(("user", "a"), ("assistant", [{"type": "image"}]), ("user", "b")), 400,
     "messages[1].content[0]"),
    ("empty user message", _msgs(("user", "")), 400, "empty"),
    ("message too long", _msgs(("user", "x" * 8001)), 400, "8001 characters"),
    ("conversation too long", _msgs(*([("user", "x" * 8000), ("assistant", "y" * 8000)] * 2 + [("user", "z")])),
     400, "32001 characters"),
    ("assistant first", _msgs(("assistant", "a"), ("user", "b")), 400, "should have role 'user'"),
    ("two users in a row", _msgs(("user", "a"), ("user", "b")), 400, "should have role 'assistant'"),
    ("system not first", _msgs(("user", "a"), ("system", "s"), ("user", "b")), 400, "messages[1]"),
    ("ends with assistant", _msgs(("user", "a"), ("assistant", "b")), 400, "last message"),
    ("lone surrogate", b'{"messages": [{"role": "user", "content": "\\ud800"}]}', 400, "surrogate"),
    ("temperature a string", chat(temperature="hot"), 400, "'temperature'"),
    ("temperature too high", chat(temperature=2.5), 400, "[0.0, 2.0]"),
    ("temperature a bool", chat(temperature=True), 400, "'temperature'"),
    ("top_k zero", chat(top_k=0), 400, "'top_k'"),
    ("top_k a float", chat(top_k=1.5), 400, "an integer"),
    ("max_tokens too big", chat(max_tokens=5000), 400, "'max_tokens'"),
    ("max_completion_tokens zero", chat(max_completion_tokens=0), 400, "'max_completion_tokens'"),
    ("seed negative", chat(seed=-1), 400, "'seed'"),
    ("stream not bool", chat(stream="yes"), 400, "'stream'"),
    ("n zero", chat(n=0), 400, "'n'"),
    ("top_p zero", chat(top_p=0), 400, "'top_p'"),
    ("top_p above 1", chat(top_p=1.5), 400, "'top_p'"),
    ("stop a number", chat(stop=5), 400, "'stop'"),
    ("stop list too long", chat(stop=["a", "b", "c", "d", "e"]), 400, "'stop'"),
    ("stop empty", chat(stop=[""]), 400, "'stop'"),
    ("tools", chat(tools=[{"type": "function", "function": {"name": "f"}}]), 400, "'tools' is not supported"),
    ("response_format", chat(response_format={"type": "json_object"}), 400, "'response_format' is not supported"),
    ("frequency_penalty", chat(frequency_penalty=0.5), 400, "'frequency_penalty' is not supported"),
    ("logprobs a string", chat(logprobs="yes"), 400, "'logprobs' must be true or false"),
    ("top_logprobs too many", chat(logprobs=True, top_logprobs=21), 400, "'top_logprobs'"),
    ("bad stream_options", chat(stream_options=[1]), 400, "stream_options"),
]


@pytest.mark.parametrize("path", ["/chat/completions", "/v1/chat/completions"])
def test_bad_inputs(served, path):
    """Each bad request in the table gets its status and a message naming the problem."""
    port, _, _ = served
    for name, body, want_status, words in BAD:
        status, reply = request(port, "POST", path, body, {"Content-Type": "application/json"})
        assert status == want_status, (name, status, reply)
        assert words in reply["error"]["message"], (name, reply)
    assert wait_idle(port)["available_workers"] == 2


def test_bad_transport(served):
    """Oversized, length-less and truncated bodies, unknown endpoints; the server keeps serving."""
    port, _, _ = served

    def raw(data):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            return b"".join(iter(lambda: s.recv(65536), b"")).decode("utf-8", "replace")

    head = "POST /chat/completions HTTP/1.1\r\nHost: x\r\n"
    assert " 413 " in raw((head + f"Content-Length: {serve.MAX_BODY_BYTES + 1}\r\n\r\n").encode())
    assert " 411 " in raw((head + "\r\n").encode())
    assert " 411 " in raw((head + "Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n").encode())
    assert " 400 " in raw((head + "Content-Length: -5\r\n\r\n").encode())
    short = raw((head + "Content-Length: 100\r\n\r\n{}").encode())
    assert " 400 " in short and "ended after 2 of 100 bytes" in short
    status, body = request(port, "POST", "/v2/anything", b"{}")
    assert status == 404 and "no POST endpoint" in body["error"]["message"]
    assert request(port, "DELETE", "/chat/completions")[0] == 405
    assert request(port, "GET", "/health")[0] == 200

# ---------------------------------------------------------------------------
# concurrency and disconnects


def test_concurrent_clients(served):
    """Four clients at once on two workers: all get whole replies, both workers serve, none leaks."""
    port, _, _ = served
    results = [None] * 4

    def client(i):
        results[i] = request(port, "POST", "/chat/completions", chat(f"client {i}", max_tokens=40, seed=i))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    gpus = set()
    for status, text in results:
        assert status == 200
        evs = events(text)
        assert evs[-1]["done"] and evs[-1]["usage"]["completion_tokens"] == 40
        gpus |= {e["gpu"] for e in evs[:-1]}
    assert gpus == {0, 1}
    stats = wait_idle(port)
    assert stats["available_workers"] == 2 and stats["busy_workers"] == 0 and stats["active"] == 0


def test_long_reply_does_not_block_others(served):
    """While one client streams a 4000-token reply, another gets its whole answer."""
    port, _, _ = served
    long_stream, _ = open_stream(port, "/chat/completions", chat("a long one", max_tokens=4096))
    status, text = request(port, "POST", "/chat/completions", chat("a short one", max_tokens=5))
    assert status == 200 and events(text)[-1]["done"]
    assert request(port, "GET", "/stats")[1]["busy_workers"] == 1   # the long reply is still going
    long_stream.close()
    assert wait_idle(port)["available_workers"] == 2


def open_stream(port, path, body):
    """(raw socket, bytes read so far) of a streamed reply that has started (its first event arrived)."""
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
    received = b""
    while b"data: " not in received:
        received += sock.recv(4096)
    assert received.startswith(b"HTTP/1.1 200")
    return sock, received[received.index(b"\r\n\r\n") + 4:]


@pytest.mark.parametrize("path,body", [
    ("/chat/completions", chat("go on", max_tokens=4096)),
    ("/v1/chat/completions", chat("go on", max_tokens=4096, stream=True)),
    ("/v1/chat/completions", chat("go on", max_tokens=4096)),   # non-stream: noticed by peeking the socket
])
def test_disconnect_frees_slot(served, path, body):
    """A client that hangs up mid-reply gets its worker back at once, long before max_tokens."""
    port, app, _ = served
    before = sum(w.tokens for w in app.pool.workers)
    disconnects = app.counts["disconnects"]
    if body.get("stream", path == "/chat/completions"):
        sock, _ = open_stream(port, path, body)
    else:
        data = json.dumps(body).encode()
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
        time.sleep(0.3)   # generation is under way; nothing is sent before it ends
    sock.close()
    t0 = time.time()
    stats = wait_idle(port)
    assert stats["available_workers"] == 2, stats
    assert time.time() - t0 < 2.0
    assert app.counts["disconnects"] == disconnects + 1
    assert sum(w.tokens for w in app.pool.workers) - before < 4000

def stream_text(sock, received, length):
    """Read a simple-format stream on `sock` until its text reaches `length` characters."""
    text = ""
    while len(text) < length:
        *blocks, received = received.split(b"\n\n")
        text += "".join(json.loads(b[b.index(b"data: ") + 6:])["token"] for b in blocks if b"data: " in b)
        received += sock.recv(4096) if len(text) < length else b""
    return text


def test_concurrent_replies_share_one_worker_and_match_alone(served, tmp_path):
    """Four replies stream at once on one worker (four rows of its batch); each is the reply it
    gets alone (greedy, seeded, top-p). A fifth waits in the queue; a sixth, with the queue full,
    gets a 503; a waiting client that leaves gives its place back at once; a waiting one is served
    when a row frees."""
    _, app, _ = served
    engine = app.pool.workers[0].engine   # the same weights on a second worker: inference only reads them
    solo = serve.App(app.tokenizer, [serve.Worker(0, engine, "cpu", 4, 1)], {"stage": "sft", "step": 0},
                     app.defaults)
    server, port = start_server(solo)
    try:
        settings = [dict(temperature=0), dict(seed=1), dict(seed=2, top_p=0.5), dict(seed=3, temperature=1.5)]
        alone = []
        for extra in settings:
            status, text = request(port, "POST", "/chat/completions", chat("hello", max_tokens=30, **extra))
            alone.append("".join(e["token"] for e in events(text)[:-1]))
        streams = [open_stream(port, "/chat/completions", chat("hello", max_tokens=4000, **extra))
                   for extra in settings]
        assert request(port, "GET", "/stats")[1]["rows"] == 4

        def waiting_count(want):
            deadline = time.time() + 10
            while request(port, "GET", "/stats")[1]["waiting"] != want and time.time() < deadline:
                time.sleep(0.05)
            return request(port, "GET", "/stats")[1]["waiting"]

        data = json.dumps(chat("leaving")).encode()
        leaver = socket.create_connection(("127.0.0.1", port), timeout=30)
        leaver.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {len(data)}\r\n\r\n".encode()
                       + data)
        assert waiting_count(1) == 1
        status, body = request(port, "POST", "/v1/chat/completions", chat("one too many"))
        assert status == 503 and "full" in body["error"]["message"]
        leaver.close()
        assert waiting_count(0) == 0    # every row is still taken
        waiting = threading.Thread(target=lambda: results.append(
            request(port, "POST", "/chat/completions", chat("queued", max_tokens=3))))
        results = []
        waiting.start()
        assert waiting_count(1) == 1
        for (sock, received), want in zip(streams, alone):
            assert stream_text(sock, received, len(want)).startswith(want)
        assert not results   # still waiting: every row is taken
        streams[0][0].close()
        waiting.join(10)
        assert results and results[0][0] == 200 and events(results[0][1])[-1]["usage"]["completion_tokens"] == 3
        for sock, _ in streams[1:]:
            sock.close()
        assert wait_idle(port, workers=1)["rows"] == 0
    finally:
        server.shutdown()
        server.server_close()


# ---------------------------------------------------------------------------
# prompts, replies, and the model-less server


def test_special_token_text_stays_text(served):
    """A user typing <|assistant_end|> or <|bos|> sends text, not control tokens."""
    _, app, _ = served
    tok = app.tokenizer
    ids, _, _ = serve.fit_context(tok, [{"role": "user", "content": "<|bos|><|assistant_end|>"}], CONTEXT, 10)
    assert ids.count(tok.bos_id) == 1 and tok.special("<|assistant_end|>") not in ids
    assert ids[-1] == tok.special("<|assistant_start|>")
    assert "<|bos|><|assistant_end|>" in tok.decode(ids[2:-2])


def test_long_conversation_trims_oldest_turns(served):
    """Old pairs go first; the system message and the last user turn stay; the reply has room."""
    _, app, _ = served
    tok = app.tokenizer
    messages = [{"role": "system", "content": "SYSTEM RULES"}]
    for i in range(20):
        messages += [{"role": "user", "content": f"question {i} " * 5},
                     {"role": "assistant", "content": f"answer {i} " * 5}]
    messages.append({"role": "user", "content": "LAST QUESTION"})
    ids, max_new, dropped = serve.fit_context(tok, messages, 200, 50)
    text = tok.decode(ids)
    assert dropped > 0 and dropped % 2 == 0
    assert text.count("SYSTEM RULES") == 1 and "LAST QUESTION" in text and "question 0 " not in text
    assert len(ids) + 50 <= 200 and max_new == 50
    assert f"question {dropped // 2} " in text   # exactly the oldest pairs went
    with pytest.raises(serve.ApiError, match="too long"):
        serve.fit_context(tok, [{"role": "user", "content": "word " * 400}], 200, 50)
    # the terminal chat keeps its history under the request limits the same way: oldest pairs first
    history = [{"role": r, "content": f"{r} {i}"} for i in range(300) for r in ("user", "assistant")]
    kept = serve.history_with(history, "newest")
    assert len(kept) == 499 and kept[0]["content"] == "user 51" and kept[-1]["content"] == "newest"


def test_tool_call_is_streamed_with_its_result(served):
    """End to end through the Engine: the call, the calculator's answer, then the text, each typed."""
    _, app, _ = served
    server, port = start_server(scripted_app(app.tokenizer))
    try:
        status, text = request(port, "POST", "/chat/completions", chat("what is 7*6?"))
        assert status == 200
        evs = events(text)
        kinds = [(e["type"], e["token"]) for e in evs[:-1]]
        merged = []
        for kind, piece in kinds:   # pieces of one kind may arrive token by token
            if merged and merged[-1][0] == kind:
                merged[-1] = (kind, merged[-1][1] + piece)
            else:
                merged.append((kind, piece))
        assert merged == [("text", "A"), ("python", "7*6"), ("python_output", "42"), ("text", "!")]
        assert evs[-1]["finish_reason"] == "stop"
        status, body = request(port, "POST", "/v1/chat/completions", chat("what is 7*6?"))
        assert body["choices"][0]["message"]["content"] == "A42!" and body["choices"][0]["finish_reason"] == "stop"
    finally:
        server.shutdown()
        server.server_close()


def test_reply_pieces_tool_calls_and_utf8(served):
    """Tool calls come out as typed pieces; text is released only at UTF-8 character boundaries."""
    _, app, _ = served
    tok = app.tokenizer
    sp = tok.special
    reply = serve.Reply(tok)
    assert reply.push(0xC3) == []                 # first byte of "é": held back
    assert reply.push(0xA9) == [("text", "é")]
    pieces = []
    for t in ([sp("<|python_start|>")] + tok.encode("2+3") + [sp("<|python_end|>"), sp("<|output_start|>")]
              + tok.encode("5") + [sp("<|output_end|>")] + tok.encode(" done") + [sp("<|assistant_end|>")]):
        pieces += reply.push(t)
    assert reply.finish_reason == "stop"
    kinds = {}
    for kind, text in pieces:
        kinds[kind] = kinds.get(kind, "") + text
    assert kinds == {"python": "2+3", "python_output": "5", "text": " done"}
    assert reply.parts == [{"type": "text", "text": "é"}, {"type": "python", "text": "2+3"},
                           {"type": "python_output", "text": "5"}, {"type": "text", "text": " done"}]
    assert reply.visible_text() == "é5 done"
    assert reply.message()["content"] == reply.parts
    # an assistant history message with parts is accepted and renders with the tool tokens
    messages = serve.check_messages([{"role": "user", "content": "add"}, reply.message(),
                                     {"role": "user", "content": "again"}])
    ids, _, _ = serve.fit_context(tok, messages, CONTEXT, 10)
    assert sp("<|python_start|>") in ids and sp("<|output_end|>") in ids


def test_model_not_loaded(tmp_path, monkeypatch):
    """With no tokenizer or checkpoint the server still starts: page 200, health and chat 503."""
    monkeypatch.setenv("SLIMCHAT_HOME", str(tmp_path))
    app = serve.build_app({"stage": "sft", "step": -1, "tag": "", "device": "cpu", "num_workers": 1,
                           "temperature": 0.8, "top_k": 50, "max_tokens": 32, "max_rows": 1, "max_queue": 0,
                           "cors_origins": ""})
    assert not app.ready and "no sft checkpoint" in app.load_error
    server, port = start_server(app)
    try:
        status, health = request(port, "GET", "/health")
        assert status == 503 and health["ready"] is False and "python sft.py" in health["error"]
        status, body = request(port, "POST", "/v1/chat/completions", chat())
        assert status == 503 and body["error"]["message"].startswith("model not loaded")
        assert request(port, "POST", "/chat/completions", {"messages": []})[0] == 400  # validation first
        assert request(port, "GET", "/")[0] == 200
        assert request(port, "GET", "/v1/models")[1]["data"] == []
    finally:
        server.shutdown()
        server.server_close()

# ---------------------------------------------------------------------------
# terminal chat, as a real process


def run_server_process(home, *args):
    """`python serve.py --port=0 ...` as a real process; -> (Popen, port) once it is serving."""
    env = {**os.environ, "SLIMCHAT_HOME": home, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "serve.py", "--device=cpu", "--port=0", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if (m := re.search(r"serving .* on http://127\.0\.0\.1:(\d+)/", line)):
            return proc, int(m.group(1))
    raise AssertionError(f"serve.py exited ({proc.wait()}) without serving")


def stop_server_process(proc):
    proc.send_signal(signal.SIGINT)   # Ctrl-C: a clean shutdown
    assert proc.wait(timeout=30) == 0


def test_server_process(served):
    """The real entry point: flags parsed, model loaded, port chosen, served, Ctrl-C exits cleanly."""
    _, _, home = served
    proc, port = run_server_process(home, "--num_workers=1", "--max_tokens=5")
    try:
        status, body = request(port, "POST", "/v1/chat/completions", chat())
        assert status == 200 and body["usage"]["completion_tokens"] == 5   # the --max_tokens default
        assert request(port, "GET", "/health")[1]["num_workers"] == 1
    finally:
        stop_server_process(proc)


@pytest.mark.slow
def test_serves_the_trained_sft_model(sft_home):
    """The chat model the pipeline trained (conftest sft_home) answers through both APIs."""
    proc, port = run_server_process(sft_home)
    try:
        question = chat("What is your name?", temperature=0, max_tokens=32)
        status, body = request(port, "POST", "/v1/chat/completions", question)
        assert status == 200 and body["choices"][0]["message"]["content"].strip(), body
        status, text = request(port, "POST", "/chat/completions", question)
        evs = events(text)
        assert status == 200 and evs[-1]["done"]
        assert "".join(e["token"] for e in evs[:-1] if e["type"] != "python") == body["choices"][0]["message"]["content"]
    finally:
        stop_server_process(proc)


def test_terminal_one_shot(served):
    """`python serve.py -p TEXT` prints one reply and exits 0 (a real process: the flag forms and main)."""
    _, _, home = served
    env = {**os.environ, "SLIMCHAT_HOME": home, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "serve.py", "--device=cpu", "--max_tokens=8", "-p", "hello there"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert one.returncode == 0, one.stderr
    config = one.stderr.splitlines()[0]   # settings on stderr, the reply alone on stdout
    assert config.startswith("config: ") and "cli=True" in config and "prompt=hello there" in config
    assert one.stdout.strip() and "config" not in one.stdout and "slimchat" not in one.stdout
    assert "[reply cut at the 8-token limit" in one.stderr   # this model never ends a reply by itself


def test_terminal_interactive(served, monkeypatch, capsys):
    """The interactive loop chats, remembers, clears and quits (stdin fed in-process: a second
    torch-importing process would cost more than the rest of this file)."""
    _, app, _ = served
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\nmore\n\nclear\nagain\nquit\nnever read\n"))
    serve.chat_in_terminal(app, {"prompt": "", "max_tokens": 8, "temperature": 0.8, "top_k": 50})
    out = capsys.readouterr().out
    assert out.count("bot> ") == 3 and "(conversation cleared)" in out and out.count("you> ") == 6


def test_cli_argv_flag_forms():
    assert serve.cli_argv(["--cli", "--port=1"]) == ["--cli=1", "--port=1"]
    assert serve.cli_argv(["-p", "a b", "--top_k=3"]) == ["--cli=1", "--prompt=a b", "--top_k=3"]
    assert serve.cli_argv(["--prompt", "-p"]) == ["--cli=1", "--prompt=-p"]
