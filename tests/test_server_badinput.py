"""Bad input against ``nanoflow serve`` on the embedded model: each is a 4xx with an OpenAI-style body naming the
field, fired between valid requests that must still complete; then a bounded schema fuzz (hypothesis) asserting
the server never answers 5xx and every answer has the documented shape.

The expectations (status, ``param``) come from the OpenAI API's rules as documented in docs/serving.md, not from
the server's earlier output.
"""

from __future__ import annotations

import json
import threading

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serve_harness import SharedServer, real_engine_missing

pytest_plugins = ("serve_harness",)  # the session-wide real `nanoflow serve` (fixture real_server)

MISSING = real_engine_missing()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(MISSING is not None, reason=MISSING or "")]

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
USER = [{"role": "user", "content": "Hi"}]


@pytest.fixture
def server(real_server: SharedServer) -> str:
    return real_server.alive()


@pytest.fixture
def card(server: str) -> dict:
    return httpx.get(f"{server}/v1/models").json()["data"][0]


def valid_request_completes(url: str, model: str) -> None:
    r = httpx.post(f"{url}{COMPLETIONS}", json={"model": model, "prompt": "Hello", "max_tokens": 2,
                                                 "temperature": 0, "ignore_eos": True}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 2


def bad_cases(max_model_len: int) -> list[tuple[str, str, object, int, str | None]]:
    """(id, path, body, expected status, expected param); body is a dict (sent as JSON) or raw bytes."""
    too_long = "hello " * (max_model_len + 16)  # one token per word at least: longer than the context
    return [
        ("malformed-json", COMPLETIONS, b'{"prompt": "hi", "max_tokens": ', 400, None),
        ("json-array", COMPLETIONS, b'[{"prompt": "hi"}]', 400, None),
        ("invalid-utf8", CHAT, b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}', 400, None),
        ("unknown-model", CHAT, {"model": "gpt-17", "messages": USER}, 404, "model"),
        ("negative-max-tokens", COMPLETIONS, {"prompt": "hi", "max_tokens": -5}, 400, "max_tokens"),
        ("zero-max-tokens", CHAT, {"messages": USER, "max_tokens": 0}, 400, "max_tokens"),
        ("temperature-too-high", CHAT, {"messages": USER, "temperature": 2.5}, 400, "temperature"),
        ("temperature-negative", COMPLETIONS, {"prompt": "hi", "temperature": -0.1}, 400, "temperature"),
        ("top-p-zero", CHAT, {"messages": USER, "top_p": 0}, 400, "top_p"),
        ("top-p-above-one", COMPLETIONS, {"prompt": "hi", "top_p": 1.5}, 400, "top_p"),
        ("missing-content", CHAT, {"messages": [{"role": "user"}]}, 400, "messages[0].content"),
        ("null-content", CHAT, {"messages": [{"role": "user", "content": None}]}, 400, "messages[0].content"),
        ("missing-messages", CHAT, {"max_tokens": 2}, 400, "messages"),
        ("empty-messages", CHAT, {"messages": []}, 400, "messages"),
        ("bad-role", CHAT, {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role"),
        ("messages-not-a-list", CHAT, {"messages": "hello"}, 400, "messages"),
        ("max-tokens-string", COMPLETIONS, {"prompt": "hi", "max_tokens": "ten"}, 400, "max_tokens"),
        ("temperature-string", CHAT, {"messages": USER, "temperature": "hot"}, 400, "temperature"),
        ("stream-string", CHAT, {"messages": USER, "stream": "yes"}, 400, "stream"),
        ("max-tokens-bool", COMPLETIONS, {"prompt": "hi", "max_tokens": True}, 400, "max_tokens"),
        ("prompt-number", COMPLETIONS, {"prompt": 42}, 400, "prompt"),
        ("missing-prompt", COMPLETIONS, {"max_tokens": 3}, 400, "prompt"),
        ("batch-with-empty-prompt", COMPLETIONS, {"prompt": ["a", ""]}, 400, "prompt"),
        ("batch-too-large", COMPLETIONS, {"prompt": [[1]] * 257}, 400, "prompt"),
        ("batch-times-n-too-large", COMPLETIONS, {"prompt": [[1]] * 100, "n": 3}, 400, None),
        ("n-too-many", CHAT, {"messages": USER, "n": 17}, 400, "n"),
        ("n-zero", CHAT, {"messages": USER, "n": 0}, 400, "n"),
        ("stop-not-strings", COMPLETIONS, {"prompt": "hi", "stop": [1, 2]}, 400, "stop"),
        ("prompt-longer-than-context", COMPLETIONS, {"prompt": too_long, "max_tokens": 2}, 400, "prompt"),
        ("chat-longer-than-context", CHAT, {"messages": [{"role": "user", "content": too_long}]}, 400, "messages"),
        ("token-id-outside-vocab", COMPLETIONS, {"prompt": [10**9], "max_tokens": 2}, 400, None),
        ("oversized-body", CHAT, {"messages": [{"role": "user", "content": "x" * 1_100_000}]}, 413, None),
    ]


CASE_IDS = [c[0] for c in bad_cases(8)]


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_bad_input_is_4xx_and_server_keeps_serving(server: str, card: dict, case_id: str) -> None:
    _, path, body, status, param = next(c for c in bad_cases(card["max_model_len"]) if c[0] == case_id)
    model = card["id"]
    valid_request_completes(server, model)
    if isinstance(body, dict):
        body = json.dumps(body).encode()
    r = httpx.post(f"{server}{path}", content=body, headers={"Content-Type": "application/json"}, timeout=60)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert isinstance(error["message"], str) and len(error["message"]) > 10
    assert error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param, error
        assert param.split("[")[0] in error["message"]
    valid_request_completes(server, model)


def test_bad_inputs_do_not_disturb_a_stream_in_flight(server: str, card: dict) -> None:
    body = {"model": card["id"], "prompt": "List the planets:", "max_tokens": 24, "temperature": 0,
            "ignore_eos": True, "stream": True}
    result: dict[str, str] = {}

    def stream() -> None:
        result["text"] = httpx.post(f"{server}{COMPLETIONS}", json=body, timeout=60).text

    worker = threading.Thread(target=stream)
    worker.start()
    for _, path, bad, status, _ in bad_cases(card["max_model_len"])[:12]:
        content = json.dumps(bad).encode() if isinstance(bad, dict) else bad
        assert httpx.post(f"{server}{path}", content=content, timeout=60).status_code == status
    worker.join(timeout=60)
    events = [line[6:] for line in result["text"].splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["choices"][0]["finish_reason"] == "length"


# ---- schema fuzz ----------------------------------------------------------------------------------------------

json_scalars = st.none() | st.booleans() | st.integers(-3, 3) | st.floats(-3, 3, allow_nan=False) | st.text(max_size=6)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=5)
# Bodies are valid-looking requests with at most one field replaced by an arbitrary JSON value, so about half are
# served. max_tokens is always small when valid, so a served fuzz case costs a few tokens of CPU.
common = {
    "temperature": st.floats(0, 2, allow_nan=False),
    "top_p": st.floats(0.01, 1, allow_nan=False),
    "top_k": st.integers(-1, 40),
    "stop": st.none() | st.text(min_size=1, max_size=3) | st.lists(st.text(min_size=1, max_size=3), max_size=3),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "seed": st.integers(0, 5),
    "ignore_eos": st.booleans(),
    "unknown_field": json_values,
}
roles = st.sampled_from(["system", "user", "assistant"])
messages = st.lists(st.fixed_dictionaries({"role": roles, "content": st.text(max_size=20)}), min_size=1, max_size=3)
valid_bodies = {
    CHAT: st.fixed_dictionaries({"messages": messages, "max_tokens": st.integers(1, 3)}, optional=common),
    COMPLETIONS: st.fixed_dictionaries(
        {"prompt": st.text(min_size=1, max_size=20) | st.lists(st.integers(0, 1000), min_size=1, max_size=5),
         "max_tokens": st.integers(1, 3)}, optional=common),
}
mutable_fields = ["model", "messages", "prompt", "n", *common]


@st.composite
def fuzz_cases(draw: st.DrawFn) -> tuple[str, dict]:
    path = draw(st.sampled_from([CHAT, COMPLETIONS]))
    body = draw(valid_bodies[path])
    if draw(st.booleans()):
        field = draw(st.sampled_from(mutable_fields))
        value = draw(json_values | st.sampled_from(["not-a-served-model", 5, -1, 2.5, [{"role": "robot"}]]))
        if field == "max_tokens" and not (isinstance(value, int) and value > 3):
            body[field] = value
        elif field != "max_tokens":
            body[field] = value
    return path, body


def check_answer(r: httpx.Response, body: dict) -> None:
    assert r.status_code in (200, 400, 404), (r.status_code, r.text, body)
    if r.status_code != 200:
        error = r.json()["error"]
        assert isinstance(error["message"], str) and error["message"] and isinstance(error["type"], str)
        return
    if body.get("stream") is True:
        events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
        assert events and events[-1] == "[DONE]", r.text
        parsed = [json.loads(e) for e in events[:-1]]
        assert all("choices" in e or "error" in e for e in parsed)
    else:
        data = r.json()
        assert data["choices"][0]["finish_reason"] in ("stop", "length")
        assert data["usage"]["completion_tokens"] <= 3


@settings(max_examples=30, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(fuzz_cases())
def test_schema_fuzz_never_5xx(server: str, case: tuple[str, dict]) -> None:
    path, body = case
    r = httpx.post(f"{server}{path}", json=body, timeout=60)
    check_answer(r, body)
