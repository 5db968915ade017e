"""
The OpenAI-compatible endpoint driven by the real `openai` Python client (a test-only
dependency), on loopback against the tiny never-ending model of test_serve.py: stop strings,
n choices, top_p, the developer role, /v1/models/{id}, clear 400s for what we can't honour,
each streaming and not; then CORS and the JSON 405 over plain HTTP.
"""
import http.client
import os

import pytest

import serve
from test_serve import build_tiny_home, start_server

openai = pytest.importorskip("openai", reason="the openai client is a test dependency (requirements-test.txt)")


def serve_tiny(home, cors_origins=""):
    old = os.environ.get("SLIMCHAT_HOME")
    try:
        app = serve.build_app({**build_tiny_home(home, workers=1), "cors_origins": cors_origins})
    finally:
        os.environ.pop("SLIMCHAT_HOME") if old is None else os.environ.__setitem__("SLIMCHAT_HOME", old)
    assert app.ready, app.load_error
    return app, *start_server(app)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """(openai client, app, port) of a one-worker server that lets http://app.example call it."""
    app, server, port = serve_tiny(str(tmp_path_factory.mktemp("home")), cors_origins="http://app.example")
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60)
    yield client, app, port
    server.shutdown()
    server.server_close()


def ask(client, stream=False, **extra):
    """-> (texts per choice, finish reasons per choice), streamed or not, through the client."""
    args = dict(model="slimchat", messages=[{"role": "user", "content": "tell me a story"}], max_tokens=24, seed=3)
    args.update(extra)
    if not stream:
        reply = client.chat.completions.create(**args)
        return [c.message.content for c in reply.choices], [c.finish_reason for c in reply.choices]
    texts, reasons = {}, {}
    for chunk in client.chat.completions.create(stream=True, **args):
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
            if c.finish_reason:
                reasons[c.index] = c.finish_reason
    return [texts[i] for i in sorted(texts)], [reasons[i] for i in sorted(reasons)]


@pytest.mark.parametrize("stream", [False, True])
def test_stop_ends_the_reply_where_the_text_first_contains_one(site, stream):
    client, _, _ = site
    (full,), (reason,) = ask(client, stream)
    assert reason == "length" and len(full) > 12
    stop = full[6:9]                       # three characters from inside the reply
    expected = full[:full.find(stop)]      # cut before its first occurrence (maybe earlier than 6)
    assert ask(client, stream, stop=stop) == ([expected], ["stop"])
    assert ask(client, stream, stop=["never said", stop]) == ([expected], ["stop"])
    assert ask(client, stream, stop="never said") == ([full], ["length"])


@pytest.mark.parametrize("stream", [False, True])
def test_n_returns_n_choices(site, stream):
    """n=3: three choices, choice i being the reply a single request with seed + i gets."""
    client, _, _ = site
    texts, reasons = ask(client, stream, n=3, seed=10)
    assert len(texts) == 3 and reasons == ["length"] * 3 and len(set(texts)) == 3
    assert [ask(client, stream, seed=10 + i)[0][0] for i in range(3)] == texts


@pytest.mark.parametrize("stream", [False, True])
def test_top_p_is_honoured(site, stream):
    """A tiny top_p leaves only the likeliest token, so a hot sampler answers as greedy does."""
    client, _, _ = site
    greedy = ask(client, stream, temperature=0)
    assert ask(client, stream, temperature=1.5, top_p=1e-9) == greedy
    assert ask(client, stream, temperature=1.5, top_p=1.0) != greedy


@pytest.mark.parametrize("stream", [False, True])
def test_developer_role_is_system(site, stream):
    client, _, _ = site
    as_system = ask(client, stream, messages=[{"role": "system", "content": "be kind"}, {"role": "user", "content": "hi"}])
    as_developer = ask(client, stream, messages=[{"role": "developer", "content": "be kind"},
                                                 {"role": "user", "content": "hi"}])
    assert as_developer == as_system


@pytest.mark.parametrize("stream", [False, True])
def test_logprobs(site, stream):
    """logprobs: one entry per visible token (its text, bytes and log-probability under the model)
    with the top_logprobs likeliest alternatives, sorted; greedy picks the likeliest."""
    client, app, _ = site
    args = dict(model="slimchat", messages=[{"role": "user", "content": "hi"}], max_tokens=12, temperature=0,
                logprobs=True, top_logprobs=3)
    if stream:
        entries, text = [], ""
        for chunk in client.chat.completions.create(stream=True, **args):
            for c in chunk.choices:
                text += c.delta.content or ""
                entries += c.logprobs.content if c.logprobs else []
    else:
        choice = client.chat.completions.create(**args).choices[0]
        entries, text = choice.logprobs.content, choice.message.content
    assert len(entries) == 12 and "".join(e.token for e in entries) == text
    for e in entries:
        assert e.logprob <= 0 and bytes(e.bytes).decode("utf-8", "replace") == e.token
        alternatives = [a.logprob for a in e.top_logprobs]
        assert len(alternatives) == 3 and alternatives == sorted(alternatives, reverse=True)
        assert e.top_logprobs[0].token == e.token and e.top_logprobs[0].logprob == e.logprob   # greedy
    plain = client.chat.completions.create(**{**args, "logprobs": False, "top_logprobs": None})
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == text
    with pytest.raises(openai.BadRequestError, match="'top_logprobs' needs 'logprobs': true"):
        client.chat.completions.create(**{**args, "logprobs": False})


def test_models_list_and_retrieve(site):
    client, app, _ = site
    assert [m.id for m in client.models.list()] == [app.model_id]
    model = client.models.retrieve(app.model_id)
    assert model.id == app.model_id and model.owned_by == "slimchat"
    with pytest.raises(openai.NotFoundError, match="no model 'gpt-4o'"):
        client.models.retrieve("gpt-4o")


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("field,value", [
    ("tools", [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]),
    ("response_format", {"type": "json_object"}),
    ("presence_penalty", 1.0),
    ("frequency_penalty", -0.5),
])
def test_unsupported_fields_are_a_clear_400(site, stream, field, value):
    client, _, _ = site
    with pytest.raises(openai.BadRequestError, match=f"'{field}' is not supported"):
        ask(client, stream, **{field: value})
    # the neutral values clients send by default change nothing and are accepted
    assert ask(client, stream, presence_penalty=0, frequency_penalty=0)[1] == ["length"]

# ---------------------------------------------------------------------------
# CORS and methods, over plain HTTP


def test_page_endpoint_refuses_n_and_logprobs(site):
    """The page's SSE endpoint streams one reply and has no place for logprobs: a 400, not silence."""
    _, _, port = site
    for extra in ('"n": 2', '"logprobs": true'):
        resp, data = raw(port, "POST", "/chat/completions", {"Content-Type": "application/json"},
                         b'{"messages": [{"role": "user", "content": "hi"}], ' + extra.encode() + b"}")
        assert resp.status == 400 and b"are for /v1/chat/completions" in data


def raw(port, method, path, headers=None, body=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request(method, path, body=body, headers=headers or {})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp, data


def test_cors_preflight_and_headers(site):
    """An allowed origin gets its preflight answered and the header on every response, errors and
    streams included; any other origin gets no CORS header, so its page can't read the reply."""
    _, _, port = site
    preflight = {"Origin": "http://app.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "content-type, authorization"}
    resp, _ = raw(port, "OPTIONS", "/v1/chat/completions", preflight)
    assert resp.status == 204 and resp.getheader("Access-Control-Allow-Origin") == "http://app.example"
    assert "POST" in resp.getheader("Access-Control-Allow-Methods")
    assert resp.getheader("Access-Control-Allow-Headers") == "content-type, authorization"
    body = b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stream": true}'
    for method, path, data in (("GET", "/v1/models", None), ("POST", "/v1/chat/completions", body),
                               ("POST", "/v1/chat/completions", b"{}"), ("GET", "/nope.js", None)):
        resp, _ = raw(port, method, path, {"Origin": "http://app.example", "Content-Type": "application/json"}, data)
        assert resp.getheader("Access-Control-Allow-Origin") == "http://app.example", (method, path, resp.status)
        resp, _ = raw(port, method, path, {"Origin": "http://evil.example", "Content-Type": "application/json"}, data)
        assert resp.getheader("Access-Control-Allow-Origin") is None, (method, path)
    resp, _ = raw(port, "OPTIONS", "/v1/chat/completions", {**preflight, "Origin": "http://evil.example"})
    assert resp.status == 204 and resp.getheader("Access-Control-Allow-Origin") is None


def test_no_cors_by_default(tmp_path):
    _, server, port = serve_tiny(str(tmp_path))
    try:
        resp, _ = raw(port, "GET", "/v1/models", {"Origin": "http://app.example"})
        assert resp.status == 200 and resp.getheader("Access-Control-Allow-Origin") is None
    finally:
        server.shutdown()
        server.server_close()


def test_unknown_methods_get_a_json_405(site):
    import json
    _, _, port = site
    for method in ("PUT", "DELETE", "PATCH", "HEAD", "PROPFIND"):
        resp, data = raw(port, method, "/v1/chat/completions")
        assert resp.status == 405, method
        if method != "HEAD":   # a HEAD answer has no body
            assert resp.getheader("Content-Type") == "application/json"
            assert json.loads(data)["error"]["message"] == f"{method} is not supported here; use GET, POST or OPTIONS"
