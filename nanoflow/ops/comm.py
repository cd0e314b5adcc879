"""Tensor-parallel collectives: what the NETWORK nano-ops call (paper §2.3, §3.3).

A :class:`Communicator` holds two process groups over the same ranks:

- the *device group* (NCCL on GPUs, gloo on CPU) carries activations: the all-reduce after ``o_proj`` and after
  ``down`` (``attn_all_reduce`` / ``ffn_all_reduce`` in ``models.layers``), the vocab-parallel embedding's
  all-reduce and the LM head's all-gather. On NCCL a collective is enqueued on the *current* CUDA stream's order
  (torch makes NCCL's stream wait on it and the current stream wait on the result), so it sits in the nano-op
  pipeline like any kernel and is captured into CUDA graphs with the rest of the forward.
- the *control group* (always gloo, on the host) carries Python objects: the leader's per-iteration plan, barriers.
  Keeping it off the GPU lets a follower receive plan ``i+1`` while its GPU still runs plan ``i`` (async scheduling).
  Its timeout is long: an idle follower waits there for as long as the leader has no work.

Resource knob: NCCL's channel count bounds how many SMs a collective occupies (each channel is one thread block).
``CommSettings.nccl_channels`` sets ``NCCL_MIN_NCHANNELS = NCCL_MAX_NCHANNELS`` (and the communicator's
``min_ctas``/``max_ctas`` where this torch exposes them) *before* the communicator is created; it cannot change later.

Dead peers: collectives have a timeout (``CommSettings.timeout_s``); a peer process that exits closes its sockets, so
gloo fails at once, and under torchrun / accelerate the launcher also terminates the surviving ranks. Failures are
re-raised as :class:`PeerLostError` naming the rank and operation. NCCL errors are asynchronous: the watchdog
(``TORCH_NCCL_ASYNC_ERROR_HANDLING``) tears the process down after the timeout; collectives replayed from a CUDA graph
are invisible to the watchdog, so there the launcher is what ends the survivors.

The launch environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``, as torchrun and
``accelerate launch`` set them, plus NanoFlow's ``NANOFLOW_TP_*`` knobs) is read only in :func:`read_launch_env`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Protocol

import torch
import torch.distributed as dist

from nanoflow.config import ConfigError

log = logging.getLogger("nanoflow")

DEFAULT_TIMEOUT_S = 600.0  # compile / autotune / first graph capture on one rank can keep the others waiting
CONTROL_TIMEOUT_S = 30 * 24 * 3600.0  # followers idle on the control group while the leader has no requests


class PeerLostError(RuntimeError):
    """A collective failed or timed out: another tensor-parallel rank exited or hung (its log says why)."""


class TensorParallelComm(Protocol):
    """What the model, runner and distributed engine need; another backend (e.g. deepspeed.comm) can implement it."""

    rank: int
    world_size: int

    def all_reduce(self, t: torch.Tensor) -> None: ...

    def all_gather_last_dim(self, t: torch.Tensor) -> torch.Tensor: ...

    def broadcast_object(self, obj: Any, src: int = 0) -> Any: ...

    def all_gather_object(self, obj: Any) -> list[Any]: ...

    def barrier(self) -> None: ...


@dataclass(frozen=True)
class CommSettings:
    """Knobs fixed when the communicator is created.

    ``nccl_channels``: NCCL channels (= SMs) per collective; ``None`` keeps NCCL's choice. ``high_priority``: run
    NCCL's internal stream at high priority, so a collective is scheduled ahead of queued GEMM blocks.
    """

    timeout_s: float = DEFAULT_TIMEOUT_S
    nccl_channels: int | None = None
    high_priority: bool = False

    def __post_init__(self) -> None:
        if self.timeout_s <= 0:
            raise ConfigError(f"collective timeout must be positive, got {self.timeout_s} s (NANOFLOW_TP_TIMEOUT_S)")
        if self.nccl_channels is not None and not 1 <= self.nccl_channels <= 64:
            raise ConfigError(f"nccl_channels must be in [1, 64], got {self.nccl_channels} (NANOFLOW_NCCL_CHANNELS)")


@dataclass(frozen=True)
class LaunchEnv:
    """One process's place in a torchrun / accelerate launch, and the NanoFlow TP knobs from the environment."""

    rank: int
    world_size: int
    local_rank: int
    settings: CommSettings
    fail_after_steps: int | None = None  # test hook: a follower exits after this many steps


def _int_env(env: dict[str, str], name: str) -> int | None:
    value = env.get(name)
    if value is None or value.strip() == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} must be an integer") from None


def read_launch_env(env: dict[str, str] | None = None) -> LaunchEnv | None:
    """The launch facts, or ``None`` when this process was not started by torchrun / accelerate (no ``RANK``)."""
    env = dict(os.environ) if env is None else env
    rank, world = _int_env(env, "RANK"), _int_env(env, "WORLD_SIZE")
    if rank is None or world is None:
        return None
    if not 0 <= rank < world:
        raise ConfigError(f"RANK={rank} is outside [0, WORLD_SIZE={world}); check the launcher's arguments")
    local = _int_env(env, "LOCAL_RANK")
    timeout = env.get("NANOFLOW_TP_TIMEOUT_S")
    settings = CommSettings(timeout_s=float(timeout) if timeout else DEFAULT_TIMEOUT_S,
                            nccl_channels=_int_env(env, "NANOFLOW_NCCL_CHANNELS"),
                            high_priority=env.get("NANOFLOW_NCCL_HIGH_PRIORITY", "").lower() in ("1", "true", "yes"))
    return LaunchEnv(rank, world, rank if local is None else local, settings,
                     _int_env(env, "NANOFLOW_TP_TEST_EXIT_AFTER"))


class Communicator:
    """Collectives of one tensor-parallel group over torch.distributed. Every rank must call every collective,
    in the same order, with tensors of the same shape and dtype."""

    def __init__(self, group: Any, control: Any, rank: int, world_size: int, local_rank: int,
                 device: torch.device, backend: str, settings: CommSettings | None = None):
        self.group = group
        self.control = control
        self.rank = rank
        self.world_size = world_size
        self.local_rank = local_rank
        self.device = device
        self.backend = backend
        self.settings = settings or CommSettings()
        self.owner: Any = None  # the one engine driving this group's collectives (rank 0's DistributedEngine)
        self._gather_into = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    def _lost(self, op: str, exc: BaseException) -> PeerLostError:
        return PeerLostError(f"rank {self.rank}/{self.world_size}: {op} over {self.backend} failed ({exc}). If "
                             "another tensor-parallel rank exited or hung, its log says why (collective timeout: "
                             "NANOFLOW_TP_TIMEOUT_S)")

    # ---- device collectives (the NETWORK nano-ops) -----------------------------------------------------------
    def all_reduce(self, t: torch.Tensor) -> None:
        """Sum ``t`` over the ranks, in place. ``t`` must be contiguous (a row slice of an activation buffer is)."""
        if not t.is_contiguous():
            raise ValueError(f"all_reduce needs a contiguous tensor, got shape {tuple(t.shape)} strides {t.stride()}")
        try:
            dist.all_reduce(t, group=self.group)
        except RuntimeError as exc:
            raise self._lost("all_reduce", exc) from exc

    def all_gather_last_dim(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's ``t`` along the last dim in rank order: ``[..., n] -> [..., world_size * n]``."""
        t = t.contiguous()
        if t.dim() == 0:
            raise ValueError("all_gather_last_dim needs a tensor with at least one dimension")
        # Gathered along dim 0 (what every backend accepts), then moved: rank r's shard lands at columns
        # [r * n, (r + 1) * n) of the result.
        out = torch.empty((self.world_size * t.shape[0], *t.shape[1:]), dtype=t.dtype, device=t.device)
        try:
            self._gather_into(out, t, group=self.group)
        except RuntimeError as exc:
            raise self._lost("all_gather", exc) from exc
        stacked = out.view(self.world_size, *t.shape)  # [w, ..., n]
        return stacked.movedim(0, -2).reshape(*t.shape[:-1], self.world_size * t.shape[-1])

    # ---- host objects (the control plane) --------------------------------------------------------------------
    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """``obj`` from rank ``src`` (picklable), returned on every rank; ``obj`` is ignored on the others."""
        box = [obj if self.rank == src else None]
        try:
            dist.broadcast_object_list(box, src=src, group=self.control)
        except RuntimeError as exc:
            raise self._lost("broadcast_object", exc) from exc
        return box[0]

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order."""
        out: list[Any] = [None] * self.world_size
        try:
            dist.all_gather_object(out, obj, group=self.control)
        except RuntimeError as exc:
            raise self._lost("all_gather_object", exc) from exc
        return out

    def barrier(self) -> None:
        try:
            dist.barrier(group=self.control)
        except RuntimeError as exc:
            raise self._lost("barrier", exc) from exc

    def close(self) -> None:
        """Destroy the process groups and drop this communicator's handles to them (idempotent; unusable afterwards).

        Dropping the handles matters: ``destroy_process_group`` only unregisters the groups, and a gloo group that a
        live object still references is destroyed during interpreter teardown, where its worker threads can abort
        the process ("terminate called without an active exception") after all the work is done."""
        if dist.is_initialized():
            dist.destroy_process_group()
        self.group = self.control = None


def _nccl_options(settings: CommSettings) -> Any:
    """``ProcessGroupNCCL.Options`` with the priority and CTA bounds, or ``None`` if this torch has no NCCL."""
    options_cls = getattr(getattr(dist, "ProcessGroupNCCL", None), "Options", None)
    if options_cls is None:
        return None
    opts = options_cls()
    opts.is_high_priority_stream = settings.high_priority
    config = getattr(opts, "config", None)
    if settings.nccl_channels is not None and config is not None and hasattr(config, "max_ctas"):
        config.min_ctas = settings.nccl_channels
        config.max_ctas = settings.nccl_channels
    return opts


def init_from_env(device: torch.device | str, expected_world_size: int | None = None,
                  launch: LaunchEnv | None = None) -> Communicator | None:
    """Join the process group a launcher set up; ``None`` when not launched (no ``RANK`` in the environment).

    ``device`` of type cuda (with or without an index) becomes ``cuda:LOCAL_RANK`` and is made current; NCCL is the
    device backend there, gloo on CPU. Raises ConfigError when ``expected_world_size`` (the ``--tp`` value) differs
    from the launcher's process count, or when there are fewer GPUs than local ranks.
    """
    launch = launch or read_launch_env()
    if launch is None:
        return None
    if expected_world_size is not None and expected_world_size != launch.world_size:
        raise ConfigError(f"--tp {expected_world_size} but the launcher started {launch.world_size} processes; use "
                          f"torchrun --nproc-per-node {expected_world_size} (or accelerate launch --num_processes "
                          f"{expected_world_size}), or --tp {launch.world_size}")
    device = torch.device(device)
    settings = launch.settings
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if launch.local_rank >= count:
            raise ConfigError(f"LOCAL_RANK {launch.local_rank} needs GPU {launch.local_rank} but only {count} are "
                              "visible; start at most one process per GPU")
        device = torch.device("cuda", launch.local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
        # NVLink SHARP multicast stays off on the lent machines (and is not needed for TP=2..8 all-reduce).
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
        # 3 = on a failed / timed-out collective, tear the process down (the launcher then stops the others).
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "3")
        if settings.nccl_channels is not None:
            os.environ["NCCL_MIN_NCHANNELS"] = os.environ["NCCL_MAX_NCHANNELS"] = str(settings.nccl_channels)
    elif device.type == "cpu":
        backend = "gloo"
    else:
        raise ConfigError(f"tensor parallelism runs on cuda or cpu, not {device.type}")
    timeout = timedelta(seconds=settings.timeout_s)
    if not dist.is_initialized():
        kwargs: dict[str, Any] = {"backend": backend, "timeout": timeout, "rank": launch.rank,
                                  "world_size": launch.world_size}
        if backend == "nccl":
            kwargs["device_id"] = device  # eager NCCL init, bound to this GPU
            opts = _nccl_options(settings) if settings.nccl_channels or settings.high_priority else None
            if opts is not None:
                kwargs["pg_options"] = opts
        dist.init_process_group(**kwargs)
    elif dist.get_world_size() != launch.world_size:
        raise ConfigError(f"torch.distributed is already initialised with {dist.get_world_size()} ranks, but "
                          f"WORLD_SIZE is {launch.world_size}")
    control = dist.new_group(backend="gloo", timeout=timedelta(seconds=CONTROL_TIMEOUT_S))
    log.info("rank %d/%d joined the tensor-parallel group (%s on %s, timeout %.0f s, nccl channels %s)",
             launch.rank, launch.world_size, backend, device, settings.timeout_s, settings.nccl_channels or "auto")
    return Communicator(dist.group.WORLD, control, launch.rank, launch.world_size, launch.local_rank, device,
                        dist.get_backend(), settings)
