"""``gpu_memory_utilization`` on a GPU (marked ``gpu``; scripts/device/memory_run.sh): the measured KV cache keeps
the engine under its share of the device through a real run, and the reading the probe takes is the allocator's."""

from __future__ import annotations

import pytest
import torch

from nanoflow.config import EngineArgs
from nanoflow.engine.memory_profile import GiB, cuda_memory_info, memory_summary

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_engine_stays_under_its_share_through_a_run() -> None:
    from nanoflow.engine.engine import Engine
    from nanoflow.scheduler.request import SamplingParams

    device = torch.device("cuda")
    in_use_before, total = cuda_memory_info(device)
    util = min(0.9, (in_use_before + 30 * GiB) / total)  # 30 GiB for the engine: 15 of weights, ~11 of KV
    engine = Engine(EngineArgs(model="llama-3-8b", load_format="dummy", dtype="bfloat16", device="cuda",
                               dense_batch_size=1024, max_model_len=4096, gpu_memory_utilization=util))
    try:
        prof = engine.memory_profile
        assert prof is not None and prof.kv_tokens == engine.kv_tokens > 0
        assert 15 < prof.non_kv_bytes / GiB < 40  # 16 GB of weights, then buffers, graphs, workspaces
        params = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)
        outs = [engine.add_request(list(range(1, 1 + 700 + 13 * i)), params) for i in range(96)]
        engine.run_until_done()
        assert all(len(o.token_ids) == 64 for o in outs)
        mem = memory_summary(device, engine.runner.kv_cache)
        assert mem["in_use_gib"] <= util * total / GiB + 0.5, (mem, prof.summary())
        assert abs(mem["kv_cache_gib"] - prof.kv_bytes / GiB) < 0.01
    finally:
        engine.close()
