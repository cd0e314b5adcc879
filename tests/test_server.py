"""The OpenAI-compatible server: the official ``openai`` client against ``nanoflow serve`` on the embedded model,
plus fast tests of the server's own logic (stops, streaming, cancellation, limits, auth, metrics, shutdown) on the
contract-following fake engine in ``fake_engine.py``.

References are independent of the server: the fake's ``greedy_reply`` script, the requested ``max_tokens``, and for
the real engine the non-streaming answer, the unstopped answer (to check stop sequences) and the engine's stats.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from fake_engine import FakeEngine, greedy_reply
from prometheus_client.parser import text_string_to_metric_families
from serve_harness import REPO, ServerThread, SharedServer, free_port, real_engine_missing, wait_for_health

from nanoflow.serve import ServerConfig, create_app

pytest_plugins = ("serve_harness",)  # the session-wide real `nanoflow serve` (fixture real_server)


def sse_events(text: str) -> list[dict | str]:
    events: list[dict | str] = []
    for line in text.splitlines():
        if line.startswith("data: "):
            data = line[6:]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def stream_text(events: list[dict | str], kind: str) -> str:
    key = "text" if kind == "completion" else "content"
    parts = []
    for e in events:
        if isinstance(e, dict):
            for c in e.get("choices", []):
                parts.append(c.get(key) if kind == "completion" else c["delta"].get(key) or "")
    return "".join(p or "" for p in parts)


def expected_greedy(prompt: str, n: int) -> str:
    return greedy_reply(list(prompt.encode()))[:n].decode("utf-8", errors="replace")


# ---- fake engine, in-process uvicorn --------------------------------------------------------------------------


@pytest.fixture
def fake() -> FakeEngine:
    return FakeEngine(token_delay=0.0)


def test_completion_matches_reference_and_streaming(fake: FakeEngine) -> None:
    with ServerThread(create_app(fake)) as url:
        body = {"model": "fake-model", "prompt": "hi", "max_tokens": 40, "temperature": 0}
        r = httpx.post(f"{url}/v1/completions", json=body)
        assert r.status_code == 200
        data = r.json()
        assert data["choices"][0]["text"] == expected_greedy("hi", 40)
        assert data["choices"][0]["finish_reason"] == "length"
        assert data["usage"] == {"prompt_tokens": 2, "completion_tokens": 40, "total_tokens": 42}
        s = httpx.post(f"{url}/v1/completions", json={**body, "stream": True})
        events = sse_events(s.text)
        assert events[-1] == "[DONE]"
        assert stream_text(events, "completion") == data["choices"][0]["text"]
        assert events[-2]["choices"][0]["finish_reason"] == "length"


def test_stream_never_splits_multibyte_characters(fake: FakeEngine) -> None:
    prompt = "x"
    n = len(greedy_reply(list(prompt.encode()))[:60])
    with ServerThread(create_app(fake)) as url:
        s = httpx.post(f"{url}/v1/completions", json={"prompt": prompt, "max_tokens": n, "temperature": 0,
                                                      "stream": True})
    deltas = [e["choices"][0]["text"] for e in sse_events(s.text) if isinstance(e, dict)]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == expected_greedy(prompt, n)
    assert "é" in "".join(deltas) and "☕" in "".join(deltas)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("stop", ["fox", ["zzz", "quick brown"], "o"])
def test_stop_sequence_is_cut_out(fake: FakeEngine, stream: bool, stop: str | list[str]) -> None:
    prompt = "tell me"
    chat_prompt = fake.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
    reference = expected_greedy(chat_prompt, 400)
    stops = [stop] if isinstance(stop, str) else stop
    cut = min(reference.find(s) for s in stops if s in reference)
    with ServerThread(create_app(fake)) as url:
        body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": 400, "temperature": 0,
                "stop": stop, "stream": stream}
        r = httpx.post(f"{url}/v1/chat/completions", json=body)
    assert r.status_code == 200
    if stream:
        events = sse_events(r.text)
        text, finish = stream_text(events, "chat"), events[-2]["choices"][0]["finish_reason"]
    else:
        text, finish = r.json()["choices"][0]["message"]["content"], r.json()["choices"][0]["finish_reason"]
    assert text == reference[:cut]
    assert finish == "stop"


def test_include_usage_and_chat_chunk_shape(fake: FakeEngine) -> None:
    with ServerThread(create_app(fake)) as url:
        body = {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}]}], "max_tokens": 5,
                "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
        events = sse_events(httpx.post(f"{url}/v1/chat/completions", json=body).text)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    usage_chunk = events[-2]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == 5
    assert all(e["usage"] is None for e in events[:-2])
    assert events[-3]["choices"][0]["finish_reason"] == "length" and events[-3]["choices"][0]["delta"] == {}


@pytest.mark.parametrize("stream", [False, True])
def test_engine_error_before_first_token_is_400(fake: FakeEngine, stream: bool) -> None:
    with ServerThread(create_app(fake)) as url:
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "<fail-now>", "stream": stream})
    assert r.status_code == 400
    assert "injected failure" in r.json()["error"]["message"]
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_engine_error_mid_stream_is_an_error_event(fake: FakeEngine) -> None:
    with ServerThread(create_app(fake)) as url:
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "<fail-later>", "max_tokens": 10, "stream": True})
    events = sse_events(r.text)
    assert r.status_code == 200 and events[-1] == "[DONE]"
    assert "injected failure after two tokens" in events[-2]["error"]["message"]


def _wait(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_aborts_the_request(stream: bool) -> None:
    slow = FakeEngine(token_delay=0.02)
    with ServerThread(create_app(slow)) as url:
        body = {"prompt": "long", "max_tokens": 5000, "stream": stream}
        if stream:
            with httpx.stream("POST", f"{url}/v1/completions", json=body) as r:
                lines = r.iter_lines()
                assert next(lines).startswith("data: ")
        else:
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(f"{url}/v1/completions", json=body, timeout=0.3)
        assert _wait(lambda: len(slow.aborted) == 1 and slow.stats()["num_running"] == 0)
        assert set(slow.finished.values()) == {"abort"}
        metrics = httpx.get(f"{url}/metrics").text
        assert "nanoflow_http_client_disconnects_total 1.0" in metrics
        assert "nanoflow_http_requests_in_flight 0.0" in metrics


def test_concurrency_limit_answers_429_then_recovers() -> None:
    slow = FakeEngine(token_delay=0.02)
    with ServerThread(create_app(slow, ServerConfig(max_concurrency=2))) as url:
        body = {"prompt": "p", "max_tokens": 5000, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body) as a, \
                httpx.stream("POST", f"{url}/v1/completions", json=body) as b:
            # Keep the line iterators referenced: a collected iterator closes its response (a disconnect).
            a_lines, b_lines = a.iter_lines(), b.iter_lines()
            next(a_lines), next(b_lines)
            r = httpx.post(f"{url}/v1/completions", json={"prompt": "p", "max_tokens": 2})
            assert r.status_code == 429 and r.headers["retry-after"] == "1"
            assert "--max-concurrency" in r.json()["error"]["message"]
        assert _wait(lambda: slow.stats()["num_running"] == 0)
        assert httpx.post(f"{url}/v1/completions", json={"prompt": "p", "max_tokens": 2}).status_code == 200


def test_api_key_required_on_v1_only(fake: FakeEngine) -> None:
    with ServerThread(create_app(fake, ServerConfig(api_key="s3cret"))) as url:
        body = {"prompt": "p", "max_tokens": 2}
        assert httpx.post(f"{url}/v1/completions", json=body).status_code == 401
        bad = httpx.post(f"{url}/v1/completions", json=body, headers={"Authorization": "Bearer nope"})
        assert bad.status_code == 401 and bad.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer nope"}).status_code == 401
        ok = httpx.post(f"{url}/v1/completions", json=body, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200
        assert httpx.get(f"{url}/health").status_code == 200
        assert httpx.get(f"{url}/metrics").status_code == 200


def test_metrics_report_engine_stats(fake: FakeEngine) -> None:
    with ServerThread(create_app(fake)) as url:
        httpx.post(f"{url}/v1/completions", json={"prompt": "p", "max_tokens": 7})
        text = httpx.get(f"{url}/metrics").text
    samples = {s.name: s.value for fam in text_string_to_metric_families(text) for s in fam.samples}
    stats = fake.stats()
    assert samples["nanoflow_num_requests_running"] == stats["num_running"] == 0
    assert samples["nanoflow_num_requests_waiting"] == 0
    assert samples["nanoflow_kv_cache_usage_ratio"] == stats["kv_usage"]
    assert samples["nanoflow_generation_tokens_per_second"] == 123.0
    assert samples["nanoflow_iteration_seconds"] == pytest.approx(0.0045)
    assert samples["nanoflow_generation_tokens_total"] == 7
    assert samples['nanoflow_http_requests_total'] == 1


def test_models_endpoint_and_unknown_model(fake: FakeEngine) -> None:
    with ServerThread(create_app(fake, ServerConfig(served_model_names=("alias",)))) as url:
        cards = httpx.get(f"{url}/v1/models").json()["data"]
        assert [c["id"] for c in cards] == ["fake-model"] and cards[0]["max_model_len"] == 512
        assert httpx.post(f"{url}/v1/completions", json={"model": "alias", "prompt": "p", "max_tokens": 1}).is_success
        r = httpx.get(f"{url}/v1/models/gpt-9")
        assert r.status_code == 404 and r.json()["error"]["param"] == "model"


_FAKE_SERVER = """
import sys
sys.path.insert(0, {tests!r})
from fake_engine import FakeEngine
from nanoflow.serve import create_app
from nanoflow.serve.cli import serve_app
sys.exit(serve_app(create_app(FakeEngine(token_delay=0.02)), "127.0.0.1", {port}, log_level="warning"))
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_graceful_shutdown_finishes_in_flight_and_exits_0(sig: signal.Signals, tmp_path: Path) -> None:
    port = free_port()
    code = _FAKE_SERVER.format(tests=str(REPO / "tests"), port=port)
    with open(tmp_path / "log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_health(url, 60, proc)
        body = {"prompt": "p", "max_tokens": 60, "temperature": 0, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()
            first = next(lines)
            proc.send_signal(sig)
            rest = list(lines)
        events = sse_events("\n".join([first, *rest]))
        assert events[-1] == "[DONE]"
        assert stream_text(events, "completion") == expected_greedy("p", 60)
        assert proc.wait(timeout=30) == 0
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/health", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()


# ---- the real engine: `nanoflow serve` on the embedded default model, the official openai client -----------------

MISSING = real_engine_missing()


def real(test):  # the real-engine tests: slow (they share one `nanoflow serve`), skipped while the engine is missing
    return pytest.mark.slow(pytest.mark.skipif(MISSING is not None, reason=MISSING or "")(test))


@pytest.fixture
def server(real_server: SharedServer) -> str:
    return real_server.alive()


@pytest.fixture
def client(server: str):
    from openai import OpenAI

    return OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=60)


@real
def test_real_models(client) -> None:
    models = client.models.list().data
    assert len(models) == 1 and models[0].id


@real
def test_real_chat_streaming_equals_non_streaming(client) -> None:
    model = client.models.list().data[0].id
    messages = [{"role": "user", "content": "Name three colors."}]
    full = client.chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=0)
    chunks = list(client.chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert full.choices[0].message.content and text == full.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens <= 12
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens > 0
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [full.choices[0].finish_reason]


@real
def test_real_completion_streaming_equals_non_streaming(client) -> None:
    model = client.models.list().data[0].id
    kw = {"model": model, "prompt": "The capital of France is", "max_tokens": 10, "temperature": 0}
    full = client.completions.create(**kw)
    text = "".join(c.choices[0].text for c in client.completions.create(**kw, stream=True) if c.choices)
    assert full.choices[0].text and text == full.choices[0].text


@real
def test_real_max_tokens_is_exact_with_ignore_eos(client) -> None:
    model = client.models.list().data[0].id
    for n in (1, 7):
        r = client.completions.create(model=model, prompt="Once upon a time", max_tokens=n, temperature=0,
                                      extra_body={"ignore_eos": True})
        assert r.usage.completion_tokens == n and r.choices[0].finish_reason == "length"


@real
def test_real_stop_sequence(client) -> None:
    model = client.models.list().data[0].id
    kw = {"model": model, "prompt": "Count: one, two, three, four, five,", "max_tokens": 16, "temperature": 0,
          "extra_body": {"ignore_eos": True}}
    reference = client.completions.create(**kw).choices[0].text
    assert len(reference) > 4
    stop = reference[len(reference) // 2: len(reference) // 2 + 2]  # a piece from the middle of the reply
    r = client.completions.create(**kw, stop=[stop])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == reference[: reference.index(stop)]
    streamed = "".join(c.choices[0].text for c in client.completions.create(**kw, stop=[stop], stream=True)
                       if c.choices)
    assert streamed == r.choices[0].text
    # The engine must stay healthy after a stop-string finish: the next request completes promptly.
    after = client.with_options(timeout=30).completions.create(model=model, prompt="Hi", max_tokens=2,
                                                               extra_body={"ignore_eos": True})
    assert after.usage.completion_tokens == 2


@real
def test_real_disconnect_frees_the_engine(server: str) -> None:
    body = {"prompt": "Write a long story.", "max_tokens": 4000, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{server}/v1/completions", json=body, timeout=60) as r:
        next(r.iter_lines())

    def idle() -> bool:
        text = httpx.get(f"{server}/metrics").text
        samples = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
        return samples["nanoflow_num_requests_running"] == 0 and samples["nanoflow_num_requests_waiting"] == 0

    assert _wait(idle, timeout=30)


class _TokenlessEngine(FakeEngine):
    """The fake engine's tokens with no text, like a model without a tokenizer (dummy weights of a built-in config)."""

    async def generate(self, prompt, params, request_id):
        async for out in super().generate(prompt, params, request_id):
            out.text = ""
            yield out


def test_stream_without_text_still_paces_tokens() -> None:
    """No text to stream: one empty-text chunk per generated step before the finish chunk, and usage counts them."""
    with ServerThread(create_app(_TokenlessEngine(token_delay=0.0))) as url:
        body = {"model": "fake-model", "prompt": [104, 105], "max_tokens": 5, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}
        events = sse_events(httpx.post(f"{url}/v1/completions", json=body).text)
        chunks = [e for e in events if isinstance(e, dict) and e.get("choices")]
        assert [c["choices"][0]["text"] for c in chunks] == [""] * 5
        assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * 4 + ["length"]
        assert events[-2]["usage"]["completion_tokens"] == 5


@real
def test_real_kv_offload_reuses_earlier_rounds(client, tmp_path: Path) -> None:
    """`serve --kv-offload`: round 2 of a conversation (its prompt = round 1's messages + the reply + a new turn) loads
    round 1's KV instead of computing it (the metrics count reused prompt tokens) and answers exactly what the
    server without offload answers (greedy); a bad conversation_id is a 400 naming the field."""
    from openai import BadRequestError, OpenAI
    from serve_harness import ServerProcess

    proc = ServerProcess(["serve", "--device", "cpu", "--kv-offload", "--kv-host-gib", "0.5"], tmp_path / "kv.log")
    url = proc.start()
    try:
        offload = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
        model = client.models.list().data[0].id

        def rounds(c, conv):
            messages = [{"role": "user", "content": "Tell me about the moon."}]
            replies = []
            for turn in ("And the sun?", "Which is larger?"):
                extra = {} if conv is None else {"extra_body": {"conversation_id": conv}}
                r = c.chat.completions.create(model=model, messages=messages, max_tokens=10, temperature=0, **extra)
                replies.append(r.choices[0].message.content)
                messages += [{"role": "assistant", "content": replies[-1]}, {"role": "user", "content": turn}]
            return replies

        def reused() -> float:
            families = text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text)
            return next(s.value for f in families for s in f.samples if s.name == "nanoflow_kv_reused_tokens_total")

        assert reused() == 0
        got = rounds(offload, "conv-1")
        assert reused() > 0  # round 2 started past round 1's prompt + reply
        assert got == rounds(client, None)
        with pytest.raises(BadRequestError, match="conversation_id"):
            offload.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                            extra_body={"conversation_id": ""})
    finally:
        assert proc.stop(timeout=90) == 0, proc.log()


@real
def test_real_logprobs_completions_chat_streaming_and_stop(client) -> None:
    """logprobs (completions) and logprobs/top_logprobs (chat): one entry per generated token whose strings
    spell the text, greedy picks the most likely alternative, streaming sends the same entries as one response, a
    stop string's tokens are left out; out-of-range values are 400s naming the field. (Values against transformers:
    tests/test_logprobs.py.)"""
    from openai import BadRequestError

    model = client.models.list().data[0].id
    kw = dict(model=model, prompt="The capital of France is", max_tokens=8, temperature=0,
              extra_body={"ignore_eos": True})
    full = client.completions.create(logprobs=3, **kw)
    text, lp = full.choices[0].text, full.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == full.usage.completion_tokens == 8
    assert "".join(lp.tokens) == text
    assert lp.text_offset == [len("".join(lp.tokens[:i])) for i in range(8)]
    for tok, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert 1 <= len(top) <= 3 and all(v <= 0 for v in top.values())
        assert top[tok] == pytest.approx(value) == pytest.approx(max(top.values()))  # greedy: the most likely
    chunks = list(client.completions.create(logprobs=3, stream=True, **kw))
    streamed = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs]
    assert [t for s in streamed for t in s.tokens] == lp.tokens
    assert [v for s in streamed for v in s.token_logprobs] == pytest.approx(lp.token_logprobs, abs=1e-4)
    assert [o for s in streamed for o in s.text_offset] == lp.text_offset

    stop = text[len(lp.tokens[0]) + 1:][:3]  # a stop string starting inside the second token or later
    cut = client.completions.create(logprobs=0, stop=[stop], **kw).choices[0]
    assert cut.finish_reason == "stop" and stop not in cut.text
    joined = "".join(cut.logprobs.tokens)
    assert joined.startswith(cut.text) and len(cut.logprobs.tokens) < 8
    assert all(o < len(cut.text) for o in cut.logprobs.text_offset) and cut.logprobs.top_logprobs[0] == {}

    messages = [{"role": "user", "content": "Name three colors."}]
    chat = client.chat.completions.create(model=model, messages=messages, max_tokens=6, temperature=0,
                                          logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    content = chat.choices[0].logprobs.content
    assert "".join(e.token for e in content) == chat.choices[0].message.content and len(content) == 6
    for e in content:
        assert e.bytes == list(e.token.encode("utf-8")) and len(e.top_logprobs) == 2
        assert e.logprob == pytest.approx(e.top_logprobs[0].logprob) and e.top_logprobs[0].token == e.token
    plain = client.chat.completions.create(model=model, messages=messages, max_tokens=2, temperature=0)
    assert plain.choices[0].logprobs is None

    with pytest.raises(BadRequestError) as err:
        client.completions.create(logprobs=21, **kw)
    assert err.value.body["param"] == "logprobs"
    with pytest.raises(BadRequestError, match="top_logprobs needs logprobs"):
        client.chat.completions.create(model=model, messages=messages, max_tokens=2, top_logprobs=2)


@real
def test_real_penalties_reach_the_sampler(client) -> None:
    """presence/frequency penalties (OpenAI) and repetition_penalty (extension) change a repetitive greedy answer;
    out-of-range values are 400s naming the field. (Values against references: tests/test_penalties.py and
    tests/test_smollm2.py.)"""
    from openai import BadRequestError

    model = client.models.list().data[0].id
    kw = dict(model=model, prompt="la la la la la la la la la la", max_tokens=12, temperature=0,
              extra_body={"ignore_eos": True})
    plain = client.completions.create(**kw).choices[0].text
    for extra in (dict(frequency_penalty=2.0), dict(presence_penalty=2.0)):
        assert client.completions.create(**extra, **kw).choices[0].text != plain, extra
    rep = client.completions.create(model=model, prompt=kw["prompt"], max_tokens=12, temperature=0,
                                    extra_body={"ignore_eos": True, "repetition_penalty": 2.0}).choices[0].text
    assert rep != plain
    for field, value in (("frequency_penalty", 2.5), ("presence_penalty", -3), ("logit_bias", {"x": 1}),
                         ("logit_bias", {"5": 200})):
        with pytest.raises(BadRequestError) as err:
            client.completions.create(**{field: value}, **kw)
        assert err.value.body["param"] == field
    # logit_bias (OpenAI's): -100 bans the token greedy picks first
    ids = {"ignore_eos": True, "return_tokens_as_token_ids": True}
    first = client.completions.create(model=model, prompt=kw["prompt"], max_tokens=1, temperature=0, logprobs=0,
                                      extra_body=ids).choices[0].logprobs.tokens[0]
    banned = client.completions.create(model=model, prompt=kw["prompt"], max_tokens=1, temperature=0, logprobs=0,
                                       logit_bias={first.removeprefix("token_id:"): -100},
                                       extra_body=ids).choices[0].logprobs.tokens[0]
    assert banned != first


@real
def test_real_n_choices_streamed_and_not(client) -> None:
    """n > 1: one engine request per choice. With a seed, choice i samples as a single request with seed + i does;
    streamed choices (interleaved, told apart by index) spell the same texts; usage adds the choices' tokens."""
    model = client.models.list().data[0].id
    kw = dict(model=model, prompt="Once upon a time", max_tokens=8, temperature=1.0, seed=5,
              extra_body={"ignore_eos": True})
    full = client.completions.create(n=3, **kw)
    texts = [c.text for c in sorted(full.choices, key=lambda c: c.index)]
    assert [c.index for c in full.choices] == [0, 1, 2] and full.usage.completion_tokens == 24
    singles = [client.completions.create(**{**kw, "seed": 5 + i}).choices[0].text for i in range(3)]
    assert texts == singles and len(set(texts)) > 1
    chunks = list(client.completions.create(n=3, stream=True, stream_options={"include_usage": True}, **kw))
    streamed = ["".join(c.choices[0].text for c in chunks if c.choices and c.choices[0].index == i)
                for i in range(3)]
    assert streamed == texts
    finishes = sorted(c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason)
    assert finishes == [0, 1, 2] and chunks[-1].usage.completion_tokens == 24
    chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], n=2,
                                          max_tokens=5, temperature=0)
    assert [c.index for c in chat.choices] == [0, 1]
    assert chat.choices[0].message.content == chat.choices[1].message.content  # greedy: the same answer twice


@real
def test_real_echo_with_prompt_logprobs(client) -> None:
    """echo + logprobs as lm-eval's loglikelihood requests send them (max_tokens 1): the prompt's tokens come first,
    the first without a logprob; a prompt token's logprob equals the logprob the same token got when generated
    after the same context (two code paths: sampled rows and prefill rows). Values against transformers:
    tests/test_logprobs.py."""
    model = client.models.list().data[0].id
    tok_prompt = client.completions.create(model=model, prompt="The capital of France is", max_tokens=1,
                                           temperature=0, logprobs=1, echo=True)
    choice = tok_prompt.choices[0]
    lp = choice.logprobs
    n_prompt = tok_prompt.usage.prompt_tokens
    assert choice.text.startswith("The capital of France is") and len(lp.tokens) == n_prompt + 1
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(v is not None and v <= 0 for v in lp.token_logprobs[1:])
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[-1] == len("".join(lp.tokens[:-1]))
    ids = [5, 300, 2000, 17, 999, 42]
    as_ids = {"ignore_eos": True, "return_tokens_as_token_ids": True}
    first = client.completions.create(model=model, prompt=ids, max_tokens=1, temperature=0, logprobs=0,
                                      extra_body=as_ids).choices[0].logprobs
    token = int(first.tokens[0].removeprefix("token_id:"))
    echoed = client.completions.create(model=model, prompt=ids + [token], max_tokens=1, temperature=0, logprobs=0,
                                       echo=True, extra_body=as_ids).choices[0].logprobs
    assert echoed.tokens[:len(ids) + 1] == [f"token_id:{t}" for t in ids + [token]]
    assert echoed.token_logprobs[len(ids)] == pytest.approx(first.token_logprobs[0], abs=1e-3)
    streamed = list(client.completions.create(model=model, prompt="The capital of France is", max_tokens=1,
                                              temperature=0, logprobs=1, echo=True, stream=True))
    assert "".join(c.choices[0].text for c in streamed if c.choices) == choice.text
    got = [t for c in streamed if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    assert got == lp.tokens


@real
def test_real_batched_prompts_as_lm_eval_sends_them(client) -> None:
    """A list of token-id prompts with echo + logprobs (lm-eval's loglikelihood payload at batch size > 1): one
    choice per prompt, in order, each equal to the same prompt sent alone; with n, a prompt's choices are together."""
    model = client.models.list().data[0].id
    prompts = [[5, 300, 2000], [17, 999, 42, 7, 8], [1000, 1001]]
    kw = dict(model=model, max_tokens=1, temperature=0, logprobs=1, echo=True, seed=1234)
    batch = client.completions.create(prompt=prompts, **kw)
    assert [c.index for c in batch.choices] == [0, 1, 2]
    assert batch.usage.prompt_tokens == 10 and batch.usage.completion_tokens == 3
    for p, choice in zip(prompts, batch.choices):
        alone = client.completions.create(prompt=p, **kw).choices[0]
        assert choice.text == alone.text and choice.logprobs.tokens == alone.logprobs.tokens
        assert choice.logprobs.token_logprobs[1:] == pytest.approx(alone.logprobs.token_logprobs[1:], abs=1e-4)
        assert len(choice.logprobs.tokens) == len(p) + 1 and choice.logprobs.token_logprobs[0] is None
    texts = client.completions.create(model=model, prompt=["Hello", "The sky is"], n=2, max_tokens=3, temperature=0)
    got = [c.text for c in sorted(texts.choices, key=lambda c: c.index)]
    assert got[0] == got[1] and got[2] == got[3] and got[0] != got[2]


@real
def test_real_tokenizer_endpoints(client, server: str) -> None:
    """vLLM's /tokenizer_info, /tokenize and /detokenize (what lm-eval's remote tokenizer calls): token counts
    agree with the completions' usage, text round-trips, a chat is counted as the chat endpoint counts it, and bad
    bodies are 400s naming the field."""
    model = client.models.list().data[0].id
    info = httpx.get(f"{server}/tokenizer_info", timeout=30).json()
    assert info["eos_token"] and info["model_max_length"] > 0 and info["chat_template"]
    text = "The capital of France is Paris."
    tok = httpx.post(f"{server}/tokenize", json={"prompt": text}, timeout=30).json()
    usage = client.completions.create(model=model, prompt=text, max_tokens=1, temperature=0).usage
    assert tok["count"] == len(tok["tokens"]) == usage.prompt_tokens
    assert httpx.post(f"{server}/detokenize", json={"tokens": tok["tokens"]}, timeout=30).json()["prompt"] == text
    messages = [{"role": "user", "content": "Hi there"}]
    chat_tok = httpx.post(f"{server}/tokenize", json={"messages": messages}, timeout=30).json()
    chat = client.chat.completions.create(model=model, messages=messages, max_tokens=1, temperature=0)
    assert chat_tok["count"] == chat.usage.prompt_tokens
    for path, body, param in (("/tokenize", {"prompt": "a", "messages": messages}, None),
                              ("/detokenize", {"tokens": [10**9]}, "tokens"),
                              ("/detokenize", {"tokens": "abc"}, "tokens")):
        r = httpx.post(f"{server}{path}", json=body, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


@real
def test_real_min_tokens(client) -> None:
    """min_tokens (vLLM's extension): EOS cannot end the answer before it; more than max_tokens is a 400."""
    from openai import BadRequestError

    model = client.models.list().data[0].id
    messages = [{"role": "user", "content": "Say hi."}]
    short = client.chat.completions.create(model=model, messages=messages, max_tokens=60, temperature=0)
    assert short.choices[0].finish_reason == "stop" and short.usage.completion_tokens < 40  # ends by EOS early
    held = client.chat.completions.create(model=model, messages=messages, max_tokens=60, temperature=0,
                                          extra_body={"min_tokens": 40})
    assert held.usage.completion_tokens >= 40
    with pytest.raises(BadRequestError) as err:
        client.chat.completions.create(model=model, messages=messages, max_tokens=5, extra_body={"min_tokens": 9})
    assert err.value.body["param"] == "min_tokens"
