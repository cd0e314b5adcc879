"""Host-memory and SSD tiers of the KV cache (paper §4.2.2): LRU entries keyed by token prefixes.

An entry holds the KV of ``n`` tokens for every layer as one CPU tensor laid out like the device cache without its
pages: ``[num_layers, 2, n, kv_heads, head_dim]``, stored as given — contiguous, or a token slice of a larger such
tensor (the offloading engine hands over a slice of a request's host-copy buffer: no copy at save time). The cache
does not care where the bytes live: the offloading engine's entries are ranges of its pinned host arena, which
``kv_transfer.to_device`` copies by DMA; a pageable entry (an SSD read) is bounced through a reused pinned block.
Entries are found by *token prefix*: each entry is indexed under a chained hash of its tokens at every block boundary
(``block_size, 2 * block_size, ...``), so ``longest_prefix`` walks a query's block boundaries from the longest down
and answers with the longest stored block-aligned prefix. Hash hits are confirmed against the stored
token ids, so a hash collision can only cost a miss, never wrong KV. A ``namespace`` (e.g. a conversation id) scopes
both the index and the lookups.

Tiers: host entries form one LRU order. When the host bytes exceed ``capacity_bytes``, least recently used entries
move to SSD: a background thread writes ``<ssd_dir>/<key>.kv`` (temp name, fsync, rename) with a header (magic, shape,
dtype, token count, a hash of the token ids, payload length, CRC32 of the payload). Until its file is renamed an
evicted entry keeps its tensor (reads still hit), so host memory may exceed the capacity by the writes in flight.
SSD entries are LRU too (oldest deleted when ``ssd_capacity_bytes`` would be exceeded) and are read back on demand:
a bad magic/header, a short payload, a checksum or token-hash mismatch -> the entry is dropped, a warning is logged
and the lookup goes on as a miss (the caller recomputes). An ``OSError`` from the disk (ENOSPC, EIO) logs a warning
and turns the SSD tier off: the cache goes on host-only, dropping what it evicts.

Thread safety: every public method takes one lock; the writer thread takes it only to publish a finished write.

Scheduler-side bookkeeping only: this module moves CPU tensors; device copies live in ``nanoflow.ops.kv_transfer``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import struct
import threading
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch

log = logging.getLogger("nanoflow")

_MAGIC = b"NFKV1\n"
_HOST, _WRITING, _DISK = "host", "writing", "disk"


class PrefixHit(NamedTuple):
    """A lookup answer: the first ``num_tokens`` tokens of ``kv`` (``[L, 2, m, H, D]``, ``m >= num_tokens``) match."""

    num_tokens: int
    kv: torch.Tensor


@dataclass
class _Entry:
    key: str
    namespace: str | None
    token_ids: list[int]
    nbytes: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    kv: torch.Tensor | None  # None once the entry lives only on disk
    state: str = _HOST
    ready: Any = None  # an event to wait on before reading kv (a device->host copy still in flight), or None
    boundary_hashes: list[str] = field(default_factory=list)


def _chain_hashes(namespace: str | None, token_ids: list[int], block_size: int, limit: int) -> list[str]:
    """Hex digests of the token prefixes ending at each block boundary ``<= limit`` (index k: ``(k+1)*block_size``)."""
    h = hashlib.blake2b(repr(namespace).encode(), digest_size=16)
    out = []
    for end in range(block_size, limit + 1, block_size):
        h.update(struct.pack(f"<{block_size}q", *token_ids[end - block_size:end]))
        out.append(h.copy().hexdigest())
    return out


def _entry_key(namespace: str | None, token_ids: list[int]) -> str:
    return hashlib.blake2b(repr(namespace).encode() + struct.pack(f"<{len(token_ids)}q", *token_ids),
                           digest_size=20).hexdigest()


def _tokens_digest(token_ids: list[int]) -> str:
    return hashlib.blake2b(struct.pack(f"<{len(token_ids)}q", *token_ids), digest_size=16).hexdigest()


class HostKVCache:
    """LRU KV store over host memory and (optionally) an SSD directory; see the module docstring for invariants."""

    def __init__(self, capacity_bytes: int, ssd_dir: Path | str | None = None, ssd_capacity_bytes: int = 0,
                 block_size: int = 16) -> None:
        if capacity_bytes < 0 or ssd_capacity_bytes < 0:
            raise ValueError(f"capacities must be >= 0 bytes, got host={capacity_bytes}, ssd={ssd_capacity_bytes}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.capacity_bytes = capacity_bytes
        self.ssd_capacity_bytes = ssd_capacity_bytes
        self.block_size = block_size
        self.ssd_dir = Path(ssd_dir) if ssd_dir is not None else None
        self.ssd_enabled = self.ssd_dir is not None and ssd_capacity_bytes > 0
        if self.ssd_enabled:
            self.ssd_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._host: OrderedDict[str, _Entry] = OrderedDict()  # LRU first; includes entries being written
        self._disk: OrderedDict[str, _Entry] = OrderedDict()
        self._index: dict[str, set[str]] = {}  # boundary hash -> entry keys
        self._entries: dict[str, _Entry] = {}
        self.host_bytes = 0
        self.disk_bytes = 0
        self._counters = dict(puts=0, hits=0, misses=0, ssd_writes=0, ssd_reads=0, ssd_errors=0, dropped=0)
        self._queue: queue.Queue[_Entry | None] = queue.Queue()
        self._writer: threading.Thread | None = None
        if self.ssd_enabled:
            self._writer = threading.Thread(target=self._write_loop, name="nanoflow-kv-ssd", daemon=True)
            self._writer.start()

    # ---- public API ----------------------------------------------------------------------------------------
    def put(self, token_ids: list[int], kv: torch.Tensor, namespace: str | None = None, ready: Any = None) -> bool:
        """Store the KV of ``token_ids`` (``kv``: CPU ``[L, 2, len(token_ids), H, D]``, kept as given, not copied: the
        caller must not modify it afterwards). Returns False when nothing
        was stored (fewer tokens than one block, or larger than the host tier).

        Entries of the same namespace whose tokens are a prefix of ``token_ids`` are dropped (subsumed: the new one
        answers every lookup they could). ``ready``: an object with ``synchronize()`` that must be called before
        ``kv`` is read (a non-blocking device->host copy)."""
        if kv.device.type != "cpu" or kv.dim() != 5 or kv.shape[1] != 2 or kv.shape[2] != len(token_ids):
            raise ValueError(f"kv must be a CPU tensor [L, 2, {len(token_ids)}, H, D], got {tuple(kv.shape)} on "
                             f"{kv.device}")
        token_ids = [int(t) for t in token_ids]
        if len(token_ids) < self.block_size:
            return False
        nbytes = kv.numel() * kv.element_size()
        if nbytes > self.capacity_bytes:
            log.debug("KV entry of %d bytes exceeds the host tier (%d bytes); not stored", nbytes, self.capacity_bytes)
            return False
        hashes = _chain_hashes(namespace, token_ids, self.block_size, len(token_ids))
        key = _entry_key(namespace, token_ids)
        with self._lock:
            self._counters["puts"] += 1
            # An older entry that is a prefix of this one is indexed under its last boundary, one of ours.
            for h in hashes:
                for k in list(self._index.get(h, ())):
                    old = self._entries[k]
                    if len(old.token_ids) <= len(token_ids) and old.token_ids == token_ids[:len(old.token_ids)]:
                        self._remove(old)
            entry = _Entry(key, namespace, token_ids, nbytes, tuple(kv.shape), kv.dtype, kv, ready=ready,
                           boundary_hashes=hashes)
            self._entries[key] = entry
            self._host[key] = entry
            self.host_bytes += nbytes
            for h in hashes:
                self._index.setdefault(h, set()).add(key)
            self._evict_host()
        return True

    def longest_prefix(self, token_ids: list[int], namespace: str | None = None,
                       max_tokens: int | None = None) -> PrefixHit | None:
        """The longest stored block-aligned prefix of ``token_ids`` (at most ``max_tokens`` tokens), or None.

        A hit becomes the most recently used entry (an SSD hit is read, verified and moved back to host memory)."""
        limit = len(token_ids) if max_tokens is None else min(max_tokens, len(token_ids))
        token_ids = [int(t) for t in token_ids[:limit]]
        hashes = _chain_hashes(namespace, token_ids, self.block_size, limit)
        with self._lock:
            for k in range(len(hashes) - 1, -1, -1):
                n = (k + 1) * self.block_size
                # Prefer the longest entry (likely the most complete one); any verified one is correct.
                for key in sorted(self._index.get(hashes[k], ()), key=lambda x: -len(self._entries[x].token_ids)):
                    entry = self._entries[key]
                    if entry.token_ids[:n] != token_ids[:n]:
                        continue  # a hash collision
                    kv = self._materialize(entry)
                    if kv is None:
                        continue  # dropped (corrupt file); try the others
                    self._counters["hits"] += 1
                    return PrefixHit(n, kv)
            self._counters["misses"] += 1
            return None

    def stats(self) -> dict[str, int]:
        """Counters and occupancy: entries/bytes per tier, puts, hits, misses, SSD writes/reads/errors, dropped."""
        with self._lock:
            return dict(self._counters, host_entries=len(self._host), host_bytes=self.host_bytes,
                        disk_entries=len(self._disk), disk_bytes=self.disk_bytes, ssd_enabled=int(self.ssd_enabled))

    def tier_of(self, token_ids: list[int], namespace: str | None = None) -> str | None:
        """"host", "writing", "disk" or None for the entry storing exactly ``token_ids`` (tests, diagnostics)."""
        key = _entry_key(namespace, [int(t) for t in token_ids])
        with self._lock:
            entry = self._entries.get(key)
            return None if entry is None else entry.state

    def discard_namespace(self, namespace: str | None) -> int:
        """Drop every entry of ``namespace`` (e.g. a request's swap space once it is back on the device)."""
        with self._lock:
            doomed = [e for e in self._entries.values() if e.namespace == namespace]
            for entry in doomed:
                self._remove(entry)
            return len(doomed)

    def flush(self) -> None:
        """Wait until every queued SSD write is done."""
        if self._writer is not None:
            self._queue.join()

    def close(self) -> None:
        """Stop the writer thread (pending writes finish first). The cache stays usable host-only."""
        if self._writer is not None:
            self._queue.put(None)
            self._writer.join()
            self._writer = None
            self.ssd_enabled = False

    # ---- internals (hold the lock) -------------------------------------------------------------------------
    def _path(self, key: str) -> Path:
        assert self.ssd_dir is not None
        return self.ssd_dir / f"{key}.kv"

    def _remove(self, entry: _Entry) -> None:
        self._entries.pop(entry.key, None)
        for h in entry.boundary_hashes:
            keys = self._index.get(h)
            if keys is not None:
                keys.discard(entry.key)
                if not keys:
                    del self._index[h]
        if self._host.pop(entry.key, None) is not None:
            self.host_bytes -= entry.nbytes
        if self._disk.pop(entry.key, None) is not None:
            self.disk_bytes -= entry.nbytes
            self._unlink(entry.key)
        entry.kv = None
        entry.state = "removed"

    def _unlink(self, key: str) -> None:
        try:
            self._path(key).unlink(missing_ok=True)
        except OSError as exc:
            log.warning("could not delete KV file %s: %s", self._path(key), exc)

    def _evict_host(self) -> None:
        """Move LRU host entries to SSD (or drop them) until the host tier fits; writes in flight do not count."""
        over = self.host_bytes - self.capacity_bytes
        for entry in list(self._host.values()):
            if over <= 0:
                break
            if entry.state == _WRITING:
                over -= entry.nbytes  # already leaving
                continue
            over -= entry.nbytes
            if self.ssd_enabled and entry.nbytes <= self.ssd_capacity_bytes:
                entry.state = _WRITING
                self._queue.put(entry)
            else:
                self._counters["dropped"] += 1
                self._remove(entry)

    def _materialize(self, entry: _Entry) -> torch.Tensor | None:
        if entry.state in (_HOST, _WRITING):
            if entry.state == _HOST:
                self._host.move_to_end(entry.key)
            if entry.ready is not None:
                entry.ready.synchronize()
                entry.ready = None
            return entry.kv
        kv = self._read(entry)
        if kv is None:
            return None
        self._disk.pop(entry.key)
        self.disk_bytes -= entry.nbytes
        self._unlink(entry.key)
        entry.kv, entry.state = kv, _HOST
        self._host[entry.key] = entry
        self.host_bytes += entry.nbytes
        self._evict_host()
        return kv

    def _read(self, entry: _Entry) -> torch.Tensor | None:
        path = self._path(entry.key)
        try:
            with open(path, "rb") as f:
                data = f.read()
            self._counters["ssd_reads"] += 1
            problem = None
            if not data.startswith(_MAGIC) or len(data) < len(_MAGIC) + 4:
                problem = "bad magic"
            else:
                (hlen,) = struct.unpack_from("<I", data, len(_MAGIC))
                start = len(_MAGIC) + 4
                header = json.loads(data[start:start + hlen].decode())
                payload = memoryview(data)[start + hlen:]
                if len(payload) != header["payload_bytes"] or header["payload_bytes"] != entry.nbytes:
                    problem = f"payload has {len(payload)} bytes, header says {header['payload_bytes']}"
                elif zlib.crc32(payload) != header["crc32"]:
                    problem = "checksum mismatch"
                elif header["tokens"] != _tokens_digest(entry.token_ids) or tuple(header["shape"]) != entry.shape:
                    problem = "file belongs to other tokens"
        except (OSError, ValueError, KeyError, UnicodeDecodeError, struct.error) as exc:
            problem = f"unreadable ({exc})"
        if problem is not None:
            log.warning("KV file %s is corrupt (%s); dropping it, its tokens will be recomputed", path, problem)
            self._counters["ssd_errors"] += 1
            self._remove(entry)
            return None
        flat = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
        kv = flat.view(entry.dtype).reshape(entry.shape)
        return kv

    # ---- writer thread -------------------------------------------------------------------------------------
    def _write_loop(self) -> None:
        while True:
            entry = self._queue.get()
            try:
                if entry is None:
                    return
                self._write_one(entry)
            finally:
                self._queue.task_done()

    def _write_one(self, entry: _Entry) -> None:
        with self._lock:
            if entry.state != _WRITING or entry.kv is None:
                return  # removed (subsumed) meanwhile
            kv, ready = entry.kv, entry.ready
            # Make room on the SSD, oldest first.
            while self.disk_bytes + entry.nbytes > self.ssd_capacity_bytes and self._disk:
                self._counters["dropped"] += 1
                self._remove(next(iter(self._disk.values())))
        if ready is not None:
            ready.synchronize()
        payload = kv.contiguous().view(-1).view(torch.uint8).numpy()
        header = json.dumps({"shape": list(entry.shape), "dtype": str(entry.dtype), "num_tokens": len(entry.token_ids),
                             "tokens": _tokens_digest(entry.token_ids), "payload_bytes": int(payload.nbytes),
                             "crc32": zlib.crc32(payload)}).encode()
        path = self._path(entry.key)
        tmp = path.with_suffix(f".tmp{threading.get_ident()}")
        try:
            self._write_file(tmp, path, header, payload)
        except OSError as exc:
            log.warning("writing KV to %s failed (%s); the KV cache goes on host-only", self.ssd_dir, exc)
            tmp.unlink(missing_ok=True)
            with self._lock:
                self._counters["ssd_errors"] += 1
                self.ssd_enabled = False
                if entry.state == _WRITING:
                    self._counters["dropped"] += 1
                    self._remove(entry)
                for other in list(self._host.values()):  # queued behind us: dropped, the tier is gone
                    if other.state == _WRITING and other is not entry:
                        other.state = _HOST
                self._evict_host()
            return
        with self._lock:
            self._counters["ssd_writes"] += 1
            if entry.state != _WRITING:  # removed while we wrote
                path.unlink(missing_ok=True)
                return
            self._host.pop(entry.key)
            self.host_bytes -= entry.nbytes
            entry.kv, entry.ready, entry.state = None, None, _DISK
            self._disk[entry.key] = entry
            self.disk_bytes += entry.nbytes

    @staticmethod
    def _write_file(tmp: Path, path: Path, header: bytes, payload: Any) -> None:
        """Temp name, fsync, rename: a crash leaves either the old state or a complete file, never a torn one."""
        with open(tmp, "wb") as f:
            f.write(_MAGIC)
            f.write(struct.pack("<I", len(header)))
            f.write(header)
            f.write(memoryview(payload))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
