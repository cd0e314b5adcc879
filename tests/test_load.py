"""Load on loopback against ``nanoflow serve`` on the embedded model, and the latency benchmark script.

200 concurrent streaming clients with distinct prompts and short outputs: every stream must complete (``[DONE]``,
finish_reason, usage), nothing may be lost or mixed up. The reference for "not mixed up" is the greedy output of
the same prompt sent alone before the load (for a sample of the prompts), and the requested token count for all.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from serve_harness import REPO, SharedServer, real_engine_missing

pytest_plugins = ("serve_harness",)  # the session-wide real `nanoflow serve` (fixture real_server)

MISSING = real_engine_missing()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(MISSING is not None, reason=MISSING or "")]

NUM_CLIENTS = 200
MAX_TOKENS = 4
REFERENCE_EVERY = 20  # greedy reference for every 20th prompt, computed with no other request running


@pytest.fixture
def server(real_server: SharedServer) -> str:
    return real_server.alive()


def prompt_of(i: int) -> str:
    return f"Note {i}: the number {i * 7 + 3} is"


def completion_body(i: int, stream: bool) -> dict:
    body = {"prompt": prompt_of(i), "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True,
            "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


async def stream_one(client: httpx.AsyncClient, i: int) -> dict:
    text, finish, usage, ids, done = [], None, None, set(), False
    async with client.stream("POST", "/v1/completions", json=completion_body(i, True)) as r:
        assert r.status_code == 200, (i, await r.aread())
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                continue
            event = json.loads(line[6:])
            assert "error" not in event, (i, event)
            ids.add(event["id"])
            for choice in event["choices"]:
                text.append(choice["text"])
                finish = choice["finish_reason"] or finish
            usage = event.get("usage") or usage
    return {"i": i, "text": "".join(text), "finish": finish, "usage": usage, "ids": ids, "done": done}


async def run_load(url: str) -> list[dict]:
    limits = httpx.Limits(max_connections=NUM_CLIENTS + 10, max_keepalive_connections=NUM_CLIENTS + 10)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=httpx.Timeout(240.0, connect=60.0)) as client:
        return await asyncio.wait_for(asyncio.gather(*(stream_one(client, i) for i in range(NUM_CLIENTS))), 300)


def test_200_concurrent_streams_complete_and_match_sequential_greedy(server: str) -> None:
    reference = {}
    for i in range(0, NUM_CLIENTS, REFERENCE_EVERY):
        r = httpx.post(f"{server}/v1/completions", json=completion_body(i, False), timeout=120)
        assert r.status_code == 200, r.text
        reference[i] = r.json()

    served_before = completions_served(server)
    results = asyncio.run(run_load(server))

    assert sorted(res["i"] for res in results) == list(range(NUM_CLIENTS))  # nothing lost
    all_ids = [res["ids"] for res in results]
    assert all(len(ids) == 1 for ids in all_ids)
    assert len(set().union(*all_ids)) == NUM_CLIENTS  # one response id per request, none shared
    for res in results:
        assert res["done"] and res["finish"] == "length", res
        assert res["usage"]["completion_tokens"] == MAX_TOKENS, res
        assert res["text"], res
    for i, ref in reference.items():
        got = results[i]
        assert got["text"] == ref["choices"][0]["text"], (i, got["text"], ref)
        assert got["usage"]["prompt_tokens"] == ref["usage"]["prompt_tokens"]

    assert completions_served(server) - served_before == NUM_CLIENTS
    assert "nanoflow_http_requests_in_flight 0.0" in httpx.get(f"{server}/metrics").text


def completions_served(url: str) -> float:
    """The server's count of completion requests answered 200 (from /metrics)."""
    text = httpx.get(f"{url}/metrics").text
    samples = [s for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "nanoflow_http_requests_total" and s.labels == {"endpoint": "completion", "status": "200"}]
    return samples[0].value if samples else 0.0


def test_bench_latency_script_against_the_server(server: str, tmp_path) -> None:
    out = tmp_path / "lat"
    cmd = [sys.executable, str(REPO / "scripts" / "bench_latency.py"), "--url", server, "--rates", "2,8",
           "--num-requests", "6", "--dataset", "constant:16:4", "--warmup", "1", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    records = json.loads(out.with_suffix(".json").read_text())
    assert [r["rate"] for r in records] == [2.0, 8.0]
    for r in records:
        assert r["completed"] == r["requests"] == 6 and r["errors"] == 0
        assert r["output_tokens"] == 6 * 4  # forced output length (ignore_eos)
        assert 0 < r["mean_ttft_ms"] <= r["mean_e2e_latency_ms"]
        assert r["p99_normalized_latency_ms"] >= r["p50_normalized_latency_ms"] > 0
    under = [r["rate"] for r in records if r["mean_normalized_latency_ms"] < 200.0]
    assert records[0]["max_rate_under_slo"] == (max(under) if under else None)
    assert out.with_suffix(".png").stat().st_size > 1000
    assert "highest rate under 200 ms" in proc.stdout
