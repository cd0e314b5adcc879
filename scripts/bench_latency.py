"""Online latency benchmark (paper §6.3, Fig. 8): Poisson arrivals at several rates against a server or an engine.

For each rate r (requests/s) the same requests arrive with exponential inter-arrival times of mean 1/r. Per request:
end-to-end latency, time to first token (TTFT), time per output token after the first (TPOT) and the *normalized
latency* = end-to-end latency / output tokens. Per rate: mean, p50 and p99 of each, achieved throughput, errors.
The answer is the highest measured rate whose mean normalized latency stays under the SLO (200 ms, the paper's).

Targets: ``--url http://127.0.0.1:8000`` streams ``/v1/completions`` from a running ``nanoflow serve``;
``--in-process`` builds an AsyncEngine here (``--model --device --dtype``) and measures it without HTTP.
Output lengths are forced (``ignore_eos``) unless ``--respect-eos``, as in the paper's benchmarks.

Writes ``<out>.json`` (a list of records, one per rate, in the format of shared/BENCHMARKING.md) and ``<out>.png``
(mean and p99 normalized latency against the rate, with the SLO line).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # runnable as `python scripts/bench_latency.py` from a checkout
    sys.path.insert(0, str(REPO))

from nanoflow.bench import git_commit  # noqa: E402
from nanoflow.data.datasets import load_dataset  # noqa: E402
from nanoflow.engine.async_engine import vocab_size_of  # noqa: E402


class RequestResult(NamedTuple):
    ok: bool
    error: str | None
    prompt_tokens: int
    output_tokens: int
    ttft: float | None  # seconds from send to the first generated text; None when no text was streamed
    latency: float  # seconds from send to the last byte

    @property
    def normalized(self) -> float:
        return self.latency / max(self.output_tokens, 1)

    @property
    def tpot(self) -> float | None:
        if self.ttft is None or self.output_tokens <= 1:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)


Prompt = str | list[int]
Sender = Callable[[Prompt, int], Awaitable[RequestResult]]


class HttpSender:
    """Streams one completion over HTTP per call; counts tokens from the server's usage chunk."""

    def __init__(self, url: str, model: str | None, api_key: str | None, ignore_eos: bool, timeout: float) -> None:
        import httpx

        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
        self.client = httpx.AsyncClient(base_url=url.rstrip("/"), headers=headers, limits=limits,
                                        timeout=httpx.Timeout(timeout, connect=30.0))
        self.model = model
        self.ignore_eos = ignore_eos

    async def describe(self) -> dict[str, Any]:
        r = await self.client.get("/v1/models")
        r.raise_for_status()
        card = r.json()["data"][0]
        self.model = self.model or card["id"]
        return {"model": self.model, "max_model_len": card.get("max_model_len"), "vocab_size": card.get("vocab_size"),
                "device": "unknown (HTTP)"}

    async def __call__(self, prompt: Prompt, max_tokens: int) -> RequestResult:
        body = {"model": self.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
                "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": self.ignore_eos}
        start = time.perf_counter()
        first: float | None = None
        usage: dict[str, int] = {}
        try:
            async with self.client.stream("POST", "/v1/completions", json=body) as r:
                if r.status_code != 200:
                    return _failed(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}", start)
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[6:])
                    if "error" in event:
                        return _failed(event["error"].get("message", "error event"), start)
                    # The first chunk carrying generated output: text, or an empty-text chunk from a model without a
                    # tokenizer (the server sends one per step then); the final chunk (finish_reason) does not count.
                    choices = event.get("choices", [])
                    if first is None and any(c.get("text") or (c.get("text") == "" and not c.get("finish_reason"))
                                             for c in choices):
                        first = time.perf_counter()
                    usage = event.get("usage") or usage
        except Exception as e:  # a benchmark records failures instead of stopping
            return _failed(f"{type(e).__name__}: {e}", start)
        end = time.perf_counter()
        return RequestResult(True, None, usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0),
                             None if first is None else first - start, end - start)

    async def close(self) -> None:
        await self.client.aclose()


class EngineSender:
    """Runs one request on an in-process AsyncEngine per call."""

    def __init__(self, engine: Any, ignore_eos: bool) -> None:
        self.engine = engine
        self.ignore_eos = ignore_eos
        self._count = 0

    async def describe(self) -> dict[str, Any]:
        await self.engine.start()
        device = "cpu"
        try:
            import torch

            if torch.cuda.is_available():
                device = torch.cuda.get_device_name()
        except ImportError:
            pass
        return {"model": self.engine.model_name, "max_model_len": self.engine.max_model_len, "device": device,
                "vocab_size": vocab_size_of(self.engine)}

    async def __call__(self, prompt: Prompt, max_tokens: int) -> RequestResult:
        from nanoflow.scheduler.request import SamplingParams

        self._count += 1
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=self.ignore_eos)
        start = time.perf_counter()
        first: float | None = None
        last = None
        async for out in self.engine.generate(prompt, params, f"bench-{self._count}"):
            if first is None and out.token_ids:
                first = time.perf_counter()
            last = out
        end = time.perf_counter()
        if last is None or last.finish_reason not in ("stop", "length"):
            return _failed(f"finish_reason {None if last is None else last.finish_reason}: "
                           f"{None if last is None else last.error}", start)
        return RequestResult(True, None, len(last.prompt_token_ids), len(last.token_ids), (first or end) - start,
                             end - start)

    async def close(self) -> None:
        await self.engine.shutdown()


def _failed(error: str, start: float) -> RequestResult:
    return RequestResult(False, error, 0, 0, 0.0, time.perf_counter() - start)


async def run_rate(send: Sender, requests: Sequence[tuple[Prompt, int]], rate: float, seed: int) -> tuple[
        list[RequestResult], float]:
    """Send ``requests`` with Poisson arrivals at ``rate``/s; returns the results and the wall time."""
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, size=len(requests))
    start = time.perf_counter()
    tasks = []
    for (prompt, max_tokens), at in zip(requests, np.cumsum(gaps)):
        delay = start + float(at) - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(send(prompt, max_tokens)))
    results = await asyncio.gather(*tasks)
    return list(results), time.perf_counter() - start


def summarize(results: Sequence[RequestResult], wall: float, rate: float) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    row: dict[str, Any] = {"rate": rate, "requests": len(results), "completed": len(ok),
                           "errors": len(results) - len(ok), "wall_s": round(wall, 3)}
    if not ok:
        row["first_error"] = next((r.error for r in results if r.error), None)
        return row

    def stats(name: str, values: list[float]) -> None:
        arr = np.asarray(values, dtype=np.float64) * 1e3
        row[f"mean_{name}_ms"] = float(arr.mean())
        row[f"p50_{name}_ms"] = float(np.percentile(arr, 50))
        row[f"p99_{name}_ms"] = float(np.percentile(arr, 99))

    stats("normalized_latency", [r.normalized for r in ok])
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    if ttfts:
        stats("ttft", ttfts)
    else:  # e.g. a model without a tokenizer: the server streams no text, so first-token times are unknown
        row["ttft_note"] = "no request streamed text before its end; TTFT/TPOT not measurable over HTTP here"
    tpots = [t for t in (r.tpot for r in ok) if t is not None]
    if tpots:
        stats("tpot", tpots)
    stats("e2e_latency", [r.latency for r in ok])
    out_tokens = sum(r.output_tokens for r in ok)
    row["output_tokens"] = out_tokens
    row["throughput_req_s"] = len(ok) / wall
    row["output_tok_s"] = out_tokens / wall
    row["total_tok_s"] = (out_tokens + sum(r.prompt_tokens for r in ok)) / wall
    if row["errors"]:
        row["first_error"] = next(r.error for r in results if r.error)
    return row


def max_rate_under_slo(rows: Sequence[dict[str, Any]], slo_ms: float) -> float | None:
    """The highest rate whose mean normalized latency is under ``slo_ms`` and that lost no request."""
    good = [r["rate"] for r in rows if not r["errors"] and r.get("mean_normalized_latency_ms", 1e30) < slo_ms]
    return max(good) if good else None


def plot(rows: Sequence[dict[str, Any]], slo_ms: float, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if "mean_normalized_latency_ms" in r]
    fig, ax = plt.subplots(figsize=(6, 4))
    rates = [r["rate"] for r in done]
    ax.plot(rates, [r["mean_normalized_latency_ms"] for r in done], "o-", label="mean")
    ax.plot(rates, [r["p99_normalized_latency_ms"] for r in done], "s--", alpha=0.6, label="p99")
    ax.axhline(slo_ms, color="red", linestyle=":", label=f"SLO {slo_ms:g} ms")
    ax.set_xlabel("request rate (req/s)")
    ax.set_ylabel("normalized latency (ms / output token)")
    ax.set_title(title, fontsize=10)
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_rates(text: str) -> list[float]:
    try:
        rates = sorted({float(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"rates must be comma-separated numbers, got {text!r}") from None
    if not rates or rates[0] <= 0:
        raise argparse.ArgumentTypeError(f"rates must be positive, got {text!r}")
    return rates


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="base URL of a running `nanoflow serve`, e.g. http://127.0.0.1:8000")
    target.add_argument("--in-process", action="store_true", help="build an AsyncEngine in this process instead")
    p.add_argument("--rates", type=parse_rates, default=parse_rates("1,2,4,8"),
                   help="comma-separated request rates in requests/s, one run each")
    p.add_argument("--num-requests", type=int, default=100, help="requests per rate (the same ones at every rate)")
    p.add_argument("--duration", type=float, default=None,
                   help="seconds of arrivals per rate instead: rate * duration requests (the paper used 300 s)")
    p.add_argument("--dataset", default="constant:128:64",
                   help="request source, any spec of nanoflow.data.datasets (e.g. lmsys:max=1024, sample, a file)")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="token ids for synthetic prompts are drawn below this; default: the model's vocabulary "
                        "size when the engine or server reports it, else 1000")
    p.add_argument("--max-tokens", type=int, default=None, help="override every request's output length")
    p.add_argument("--respect-eos", action="store_true",
                   help="let requests stop at EOS instead of forcing every output to its target length")
    p.add_argument("--slo-ms", type=float, default=200.0, help="mean normalized latency SLO in ms")
    p.add_argument("--seed", type=int, default=0, help="seed of the dataset draw and the arrival times")
    p.add_argument("--warmup", type=int, default=2, help="requests sent one by one before measuring")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds one request may take before it counts lost")
    p.add_argument("--api-key", default=None, help="Bearer key for a server started with --api-key")
    p.add_argument("--model", default=None,
                   help="HTTP: model name to request (default: the server's); in-process: the model to load")
    p.add_argument("--device", default="auto", help="in-process: auto, cpu or cuda")
    p.add_argument("--dtype", default="auto", help="in-process: auto, float32, bfloat16 or float16")
    p.add_argument("--max-model-len", type=int, default=None, help="in-process: context length")
    p.add_argument("--out", type=Path, default=Path("bench_latency"),
                   help="output path prefix: writes OUT.json and OUT.png")
    return p


async def main_async(args: argparse.Namespace) -> list[dict[str, Any]]:
    ignore_eos = not args.respect_eos
    vocab = args.vocab_size
    sender: HttpSender | EngineSender
    if args.url:
        sender = HttpSender(args.url, args.model, args.api_key, ignore_eos, args.timeout)
    else:
        from nanoflow.config import EngineArgs
        from nanoflow.engine.async_engine import AsyncEngine

        engine = AsyncEngine.from_args(EngineArgs(model=args.model, device=args.device, dtype=args.dtype,
                                                  max_model_len=args.max_model_len))
        if engine.engine.runner.graphs is not None:  # as `nanoflow serve` does: capture before the first arrival
            engine.engine.runner.graphs.capture_all()
        sender = EngineSender(engine, ignore_eos)
    try:
        info = await sender.describe()
        vocab = vocab or info.get("vocab_size") or 1000
        distinct = args.num_requests if args.duration is None else max(1, round(max(args.rates) * args.duration))
        data = load_dataset(args.dataset, num_requests=distinct, seed=args.seed, vocab_size=vocab,
                            max_len=info.get("max_model_len"))
        if not data.items:
            raise SystemExit(f"dataset {args.dataset!r} gave no usable requests")
        requests = [(it.prompt if it.prompt is not None else it.prompt_token_ids,
                     args.max_tokens or it.max_tokens or 64) for it in data.items]
        for prompt, max_tokens in requests[: args.warmup]:
            warm = await sender(prompt, max_tokens)
            if not warm.ok:  # a misconfiguration fails every request alike: say so now, not after every rate
                raise SystemExit(f"warm-up request failed: {warm.error}")
        rows = []
        for i, rate in enumerate(args.rates):
            n = args.num_requests if args.duration is None else max(1, round(rate * args.duration))
            batch = [requests[j % len(requests)] for j in range(n)]
            results, wall = await run_rate(sender, batch, rate, args.seed + i)
            row = summarize(results, wall, rate)
            rows.append(row)
            print(f"rate {rate:g}/s: " + ", ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}"
                                                  for k, v in row.items() if k != "rate"), flush=True)
    finally:
        await sender.close()
    best = max_rate_under_slo(rows, args.slo_ms)
    common = {"device": info["device"], "model": info["model"], "commit": git_commit(), "command": " ".join(sys.argv),
              "mode": "online-latency", "workload": args.dataset, "target": args.url or "in-process",
              "slo_ms": args.slo_ms, "max_rate_under_slo": best, "ignore_eos": ignore_eos}
    try:
        import torch

        common["torch"] = torch.__version__
    except ImportError:
        pass
    return [{**common, **row} for row in rows]


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.num_requests < 1:
        raise SystemExit("--num-requests must be >= 1")
    records = asyncio.run(main_async(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    json_path, png_path = args.out.with_suffix(".json"), args.out.with_suffix(".png")
    json_path.write_text(json.dumps(records, indent=1))
    best = records[0]["max_rate_under_slo"] if records else None
    plot(records, args.slo_ms, f"{records[0]['model']} · {args.dataset}", png_path)
    print(f"highest rate under {args.slo_ms:g} ms mean normalized latency: "
          f"{'none of the measured rates' if best is None else f'{best:g} req/s'}")
    print(f"wrote {json_path} and {png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
