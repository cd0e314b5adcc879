"""Tensor parallelism on CPU (gloo): ``run-offline --tp 2`` under torchrun / accelerate generates what TP=1 generates.

References: a TP=1 run of the same command in this process, and (greedy cases) a plain greedy loop over Hugging Face
transformers' forward on the same weights. Tiny random LLaMA / Qwen2 models (4 heads, 2 KV heads, hidden 64, 2
layers) are saved with ``save_pretrained``; vocabularies of 131 (padded to 132 over 2 ranks) and 128. The plan
encoder/decoder and the launch-environment parsing are also checked in-process.
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from nanoflow.config import ConfigError, EngineArgs  # noqa: E402
from nanoflow.engine.distributed import TEST_EXIT_STATUS, PlanDecoder, PlanEncoder, make_engine  # noqa: E402
from nanoflow.ops.comm import CommSettings, LaunchEnv, init_from_env, read_launch_env  # noqa: E402
from nanoflow.scheduler.batcher import BatchPlan, ScheduledSeq  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MAX_TOKENS = 12
LAUNCH_TIMEOUT_S = 150


def _save_model(path: Path, arch: str, vocab: int) -> Path:
    cfg = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False, eos_token_id=None,
               bos_token_id=None)
    torch.manual_seed(0)
    if arch == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg))
    elif arch == "mixtral":  # experts sharded along their intermediate size, the router replicated
        model = transformers.MixtralForCausalLM(transformers.MixtralConfig(**cfg, num_local_experts=4,
                                                                           num_experts_per_tok=2))
    else:
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**cfg))
    with torch.no_grad():  # peaked logits: greedy choices are not decided by rounding noise
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    model.save_pretrained(path)
    rng = random.Random(vocab)
    prompts = [[rng.randrange(vocab) for _ in range(rng.randrange(3, 40))] for _ in range(6)]
    with open(path / "prompts.jsonl", "w") as f:
        for p in prompts:
            f.write(json.dumps({"prompt_token_ids": p}) + "\n")
    return path


def _hf_greedy(path: Path) -> list[list[int]]:
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    outs = []
    with torch.no_grad():
        for line in open(path / "prompts.jsonl"):
            ids = json.loads(line)["prompt_token_ids"]
            new: list[int] = []
            for _ in range(MAX_TOKENS):
                new.append(int(model(torch.tensor([ids + new])).logits[0, -1].argmax()))
            outs.append(new)
    return outs


def _cli_args(model: Path, out: Path, extra: list[str]) -> list[str]:
    return ["run-offline", "--model", str(model), "--device", "cpu", "--dataset", str(model / "prompts.jsonl"),
            "--output", str(out), "--max-tokens", str(MAX_TOKENS), "--ignore-eos", *extra]


def _tokens(path: Path) -> list[list[int]]:
    rows = [json.loads(line) for line in open(path)]
    assert all(r["finish_reason"] == "length" and r["error"] is None for r in rows)
    return [r["token_ids"] for r in rows]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **extra)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(launcher: str, cli: list[str]) -> subprocess.CompletedProcess[str]:
    if launcher == "torchrun":
        cmd = [str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2", "-m", "nanoflow.cli", *cli]
    else:  # accelerate's torchrun path; "--multi_gpu" is its name for it even on CPU (--cpu would start one process)
        cmd = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
               "-m", "nanoflow.cli", *cli]
    return subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)


CASES = {
    # name: (architecture, vocab, launcher, extra CLI flags); greedy, so HF transformers is a reference too.
    # Qwen2 has QKV biases (sharded with the heads); vocab 131 is padded to 132 over 2 ranks; dense 40 chunks prefill.
    "qwen2-vocab131-async-torchrun": ("qwen2", 131, "torchrun", ["--dense-batch-size", "40"]),
    "mixtral-vocab128-async-torchrun": ("mixtral", 128, "torchrun", ["--dense-batch-size", "48"]),
    # the MoE TP preset: all-reduces on their own stream, run in issue order on the CPU
    "mixtral-tp-preset-torchrun": ("mixtral", 128, "torchrun", ["--dense-batch-size", "64",
                                                                "--pipeline", "mixtral-tp-overlap"]),
    "llama-vocab128-sync-smallkv-accelerate": ("llama", 128, "accelerate",
                                               ["--no-async", "--kv-cache-tokens", "112", "--dense-batch-size", "64"]),
    # float8 KV cache: each rank rounds its own heads; TP=2 must still equal TP=1 (transformers is not a reference)
    "llama-fp8kv-torchrun": ("llama", 128, "torchrun", ["--kv-cache-dtype", "fp8", "--dense-batch-size", "64"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_tp2_matches_tp1(case: str, tmp_path: Path) -> None:
    from nanoflow.cli import main

    arch, vocab, launcher, extra = CASES[case]
    extra = ["--temperature", "0", *extra]
    model = _save_model(tmp_path / arch, arch, vocab)
    main(_cli_args(model, tmp_path / "tp1.jsonl", ["--tp", "1", *extra]))
    proc = _launch(launcher, _cli_args(model, tmp_path / "tp2.jsonl", ["--tp", "2", *extra]))
    assert proc.returncode == 0, proc.stderr[-4000:]
    tp1, tp2 = _tokens(tmp_path / "tp1.jsonl"), _tokens(tmp_path / "tp2.jsonl")
    assert len(tp2) == 6 and all(len(t) == MAX_TOKENS for t in tp2)
    assert tp2 == tp1
    if "--kv-cache-dtype" not in extra:
        assert tp2 == _hf_greedy(model)
    assert sorted(p.name for p in tmp_path.iterdir()) == [arch, "tp1.jsonl", "tp2.jsonl"]  # rank 1 wrote nothing


@pytest.mark.slow
def test_dead_follower_fails_the_leader_quickly(tmp_path: Path) -> None:
    """Rank 1 exits after 2 forwards (test hook); rank 0 must exit non-zero with PeerLostError, not hang.

    Launched by hand (no torchrun supervising), so the error path is NanoFlow's own.
    """
    model = _save_model(tmp_path / "llama", "llama", 128)
    port = str(_free_port())
    procs = []
    t0 = time.monotonic()
    for rank in (0, 1):
        env = _env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                   NANOFLOW_TP_TEST_EXIT_AFTER="2", NANOFLOW_TP_TIMEOUT_S="30")
        cli = _cli_args(model, tmp_path / "out.jsonl", ["--tp", "2", "--dense-batch-size", "32"])
        procs.append(subprocess.Popen([sys.executable, "-m", "nanoflow.cli", *cli], cwd=REPO, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        results = [p.communicate(timeout=LAUNCH_TIMEOUT_S) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    elapsed = time.monotonic() - t0
    assert procs[1].returncode == TEST_EXIT_STATUS, results[1][1][-2000:]
    assert procs[0].returncode not in (0, None)
    assert "PeerLostError" in results[0][1] and "rank 0/2" in results[0][1], results[0][1][-3000:]
    assert elapsed < 100
    assert not (tmp_path / "out.jsonl").exists()


# Run under torchrun: three engines built one after another in one process group (async and sync greedy, async
# sampled), prompt_logits (the "forward" message), and one bench mode through the TP bench driver.
_WORKER = """
import json, sys
from dataclasses import replace
from nanoflow.bench.throughput import mode_args
from nanoflow.bench.tp import _run_mode
from nanoflow.config import EngineArgs
from nanoflow.engine.builder import load_parts
from nanoflow.engine.distributed import DistributedEngine, follow, stop_followers
from nanoflow.ops.comm import init_from_env
from nanoflow.scheduler.request import SamplingParams

model, prompts_path, out = sys.argv[1:4]
comm = init_from_env("cpu", expected_world_size=2)
args = EngineArgs(model=model, device="cpu", tp=2, dense_batch_size=128, kv_cache_tokens=512, seed=0)
parts = load_parts(args, comm.device, comm.rank, comm.world_size)
if comm.rank != 0:
    follow(comm, parts)
    comm.close()
    sys.exit(0)
prompts = [json.loads(line)["prompt_token_ids"] for line in open(prompts_path)]
result = {}
for name, async_, temperature in (("async", True, 0.0), ("sync", False, 0.0), ("sampled", True, 0.8)):
    engine = DistributedEngine(replace(args, async_scheduling=async_), comm, parts)
    result[name + "_logits"] = engine.prompt_logits(prompts[:3]).tolist()
    params = SamplingParams(max_tokens=%d, temperature=temperature, top_k=20, ignore_eos=True)
    outs = [engine.add_request(p, params) for p in prompts]
    engine.run_until_done()
    result[name] = [o.token_ids for o in outs]
    engine.close()
reqs = [(p, 4) for p in prompts]
result["bench"] = _run_mode(mode_args(args, "non-overlap-sync", None), parts, comm, reqs, reqs[:2])
stop_followers(comm)
assert comm.group is None and comm.control is None  # no handle keeps a gloo group alive into interpreter teardown
json.dump(result, open(out, "w"))
"""


@pytest.mark.slow
def test_engines_rebuilt_in_one_group_and_prompt_logits(tmp_path: Path) -> None:
    from nanoflow import LLM, SamplingParams

    model = _save_model(tmp_path / "llama", "llama", 131)
    (tmp_path / "worker.py").write_text(_WORKER % MAX_TOKENS)
    cmd = [str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2", str(tmp_path / "worker.py"), str(model),
           str(model / "prompts.jsonl"), str(tmp_path / "out.json")]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads((tmp_path / "out.json").read_text())
    expected = _hf_greedy(model)
    assert got["async"] == expected and got["sync"] == expected
    prompts = [json.loads(line)["prompt_token_ids"] for line in open(model / "prompts.jsonl")]
    # Sampling: the same engine seed gives every request the same sampling seed at TP=1 and TP=2.
    tp1 = LLM(str(model), device="cpu", dense_batch_size=128, kv_cache_tokens=512, seed=0)
    sampled = tp1.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.8, top_k=20, ignore_eos=True),
                           use_tqdm=False)
    assert got["sampled"] == [o.token_ids for o in sampled] != expected
    hf = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = torch.stack([hf(torch.tensor([p])).logits[0, -1] for p in prompts[:3]])
    for name in ("async_logits", "sync_logits", "sampled_logits"):
        assert torch.allclose(torch.tensor(got[name]), ref, atol=1e-4, rtol=1e-4)
    bench = got["bench"]
    assert bench["incomplete"] == 0 and bench["errors"] == 0 and bench["throughput_tok_s"] > 0


# ---- in-process pieces -------------------------------------------------------------------------------------------
def _plan(it: int, seqs: list[tuple[str, int, int, list[int]]]) -> BatchPlan:
    ss = [ScheduledSeq(rid, start, n, [1] * n, True, table, None) for rid, start, n, table in seqs]
    return BatchPlan(it, ss, [], sum(s.num_tokens for s in ss), 64, [])


def test_plan_codec_round_trips_block_tables() -> None:
    """Independent reference: each decoded table equals the live table cut to ceil((start + n) / block_size)."""
    rng = random.Random(0)
    enc, dec = PlanEncoder(block_size=4), PlanDecoder()
    tables: dict[str, list[int]] = {}
    pos: dict[str, int] = {}
    next_block = 1
    for it in range(200):
        seqs = []
        for rid in ("a", "b", "c", "d"):
            if rng.random() < 0.2:  # preempted or finished: freed, later re-admitted from position 0
                tables.pop(rid, None)
                pos.pop(rid, None)
                continue
            start = pos.get(rid, 0)
            n = rng.randrange(1, 9)
            table = tables.setdefault(rid, [])
            while len(table) * 4 < start + n + rng.randrange(0, 6):  # the live table may run ahead of the plan
                table.append(next_block)
                next_block += 1
            seqs.append((rid, start, n, table))
            pos[rid] = start + n
        wire = enc.encode(_plan(it, seqs))
        got = dec.decode(wire)
        for (rid, start, n, table), s in zip(seqs, got.decode):
            assert s.request_id == rid and s.start == start and s.num_tokens == n
            assert s.block_table == table[: -(-(start + n) // 4)]
        assert got.num_tokens == sum(n for _, _, n, _ in seqs)
    # A follower that missed a plan gets a tail without its head: an error, never a wrong table.
    enc = PlanEncoder(block_size=4)
    enc.encode(_plan(0, [("z", 0, 4, [7])]))
    tail_only = enc.encode(_plan(1, [("z", 4, 1, [7, 8])]))
    assert tail_only.decode[0].full is False and tail_only.decode[0].blocks == [8]
    with pytest.raises(RuntimeError, match="out of step"):
        PlanDecoder().decode(tail_only)


def test_launch_env_parsing_and_errors() -> None:
    assert read_launch_env({}) is None
    env = read_launch_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "NANOFLOW_NCCL_CHANNELS": "8",
                           "NANOFLOW_TP_TIMEOUT_S": "45"})
    assert env == LaunchEnv(1, 2, 1, CommSettings(timeout_s=45.0, nccl_channels=8))
    with pytest.raises(ConfigError, match="RANK=2"):
        read_launch_env({"RANK": "2", "WORLD_SIZE": "2"})
    with pytest.raises(ConfigError, match="NANOFLOW_NCCL_CHANNELS"):
        read_launch_env({"RANK": "0", "WORLD_SIZE": "2", "NANOFLOW_NCCL_CHANNELS": "0"})
    with pytest.raises(ConfigError, match="torchrun --nproc-per-node 4"):
        init_from_env("cpu", expected_world_size=4, launch=LaunchEnv(0, 2, 0, CommSettings()))


def test_tp_without_a_launcher_says_how_to_launch(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigError, match="torchrun --nproc-per-node 2"):
        make_engine(EngineArgs(model="llama-3-8b", device="cpu", tp=2))
