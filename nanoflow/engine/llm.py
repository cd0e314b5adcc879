"""The offline API: ``LLM(...).generate(prompts, sampling_params)``.

>>> from nanoflow import LLM, SamplingParams
>>> llm = LLM()                                   # the embedded SmolLM2-135M-Instruct
>>> out = llm.generate(["The capital of France is"], SamplingParams(max_tokens=8, temperature=0))
>>> out[0].text, out[0].finish_reason
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from nanoflow.config import ADMISSION_PACE, EngineArgs
from nanoflow.engine.outputs import RequestOutput
from nanoflow.scheduler.request import SamplingParams

FREEZE_MIN_REQUESTS = 64
"""``LLM.generate`` exempts the requests it queued from Python's cyclic GC (:meth:`Engine.freeze_gc`) from this many
on: for an offline batch they live for the whole run, and the one collection that freezing costs pays off."""


class LLM:
    def __init__(self, model: str | None = None, *, dtype: str = "auto", device: str = "auto",
                 load_format: str = "auto", dense_batch_size: int | None = None, max_model_len: int | None = None,
                 kv_cache_tokens: int | None = None, gpu_memory_utilization: float | None = None, tp: int = 1,
                 seed: int = 0, async_scheduling: bool = True,
                 cuda_graphs: bool = True, compile: bool = True, pipeline: str | None = None,
                 max_num_seqs: int | None = None, block_size: int = 16, resource_knob: str = "grid",
                 kv_cache_dtype: str = "auto", batch_invariant: bool = False, admission_pace: float = ADMISSION_PACE,
                 **extra: Any):
        self.args = EngineArgs(model=model, dtype=dtype, device=device, load_format=load_format,
                               dense_batch_size=dense_batch_size, max_model_len=max_model_len,
                               kv_cache_tokens=kv_cache_tokens, gpu_memory_utilization=gpu_memory_utilization,
                               tp=tp, seed=seed, async_scheduling=async_scheduling,
                               cuda_graphs=cuda_graphs, compile=compile, pipeline=pipeline,
                               max_num_seqs=max_num_seqs, block_size=block_size, resource_knob=resource_knob,
                               kv_cache_dtype=kv_cache_dtype, batch_invariant=batch_invariant,
                               admission_pace=admission_pace, extra=extra)
        from nanoflow.engine.builder import create_engine

        self.engine = create_engine(self.args)

    def shutdown(self) -> None:
        """Release the engine (idempotent). Under tensor parallelism this also ends the followers and leaves the
        process group now, while the interpreter is whole: a gloo group left for interpreter teardown can abort
        the process ("terminate called without an active exception") after all the work is done."""
        stop = getattr(self.engine, "shutdown", None)
        if stop is not None:
            stop()
        else:
            self.engine.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    def generate(self, prompts: Sequence[str] | Sequence[Sequence[int]] | str,
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Generate for every prompt; outputs come back in prompt order, failed requests with ``"error"``."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"got {len(params)} SamplingParams for {len(prompts)} prompts; pass one, or one "
                                 "per prompt")
        outputs = [self.engine.add_request(p if isinstance(p, str) else list(p), sp)
                   for p, sp in zip(prompts, params)]
        if len(outputs) >= FREEZE_MIN_REQUESTS:
            # The queued requests (token lists, sequences, outputs) live for the whole run: exempt them from the
            # cyclic GC's full passes, which otherwise walk every prompt token list every few seconds
            # (scripts/gc_probe.py; the likely cause of 45-104 ms GPU-idle gaps every ~66 steps of a 2,048-request
            # LLaMA-3-8B run on an H100, 1.3% of its wall time). One collection first; Engine.close unfreezes.
            self.engine.freeze_gc()
        bar = None
        if use_tqdm:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(outputs), desc="generate", unit="req", dynamic_ncols=True)
            bar.update(sum(o.finished for o in outputs))
        done = sum(o.finished for o in outputs)

        def progress(_n: int) -> None:
            nonlocal done
            now = sum(o.finished for o in outputs)
            if bar is not None and now > done:
                bar.update(now - done)
            done = now

        self.engine.run_until_done(progress if bar is not None else None)
        if bar is not None:
            bar.close()
        return outputs
