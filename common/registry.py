"""Where workers announce themselves and their load. Torch-free.

`Registry` is the interface; `DirectoryRegistry` (JSON files in a directory, written atomically) is
the static stand-in until the coordinator issue puts registrations on etcd leases and load on
ZeroMQ heartbeats. A worker registers after its warm-up, heartbeats its load every `interval`, and
deregisters when it stops; a registration whose heartbeats stop is stale after `stale_after`.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import msgspec

from common.kv_layout import KVLayoutSpec


class WorkerInfo(msgspec.Struct, frozen=True):
    worker_id: str
    role: str  # "prefill" | "decode" | "colocated"
    model: str
    tp: int
    pp: int
    block_size: int
    kv_capacity_tokens: int
    endpoint: str  # request socket
    kv_endpoints: list[str]  # decode: one per rank
    layout: KVLayoutSpec
    pid: int
    startup_s: float
    profile: dict = {}  # cost model measured at start-up: {"prefill": {a, b, c}, "decode": {base, per_seq, per_token}}
    kv_hash_root: int = 0  # its prefix cache's root block hash (engine/block_manager.py); 0: no prefix cache


class Load(msgspec.Struct, frozen=True):
    worker_id: str
    ts: float  # time.time() of the sample
    num_waiting: int
    num_running: int
    free_blocks: int
    num_blocks: int
    step_ms: float  # mean step time over the last interval (0 when idle)
    steps: int  # steps in the last interval
    pending_transfers: int = 0
    queued_tokens: int = 0  # tokens scheduled but not computed yet (prompts waiting or mid-prefill)
    tokens: int = 0  # tokens computed by the steps of the interval (prefill chunks + decode tokens)
    seqs: int = 0  # sequences scheduled, summed over the steps of the interval
    # SLO attainment seen by this worker over the last minute (common/heartbeat.py::SloWindow)
    ttft_met: int = 0
    ttft_total: int = 0
    tpot_met: int = 0
    tpot_total: int = 0
    # since the worker started (counters): prompt tokens it was asked to prefill, or to receive for
    # decode; of those, tokens whose KV its prefix cache held; KV page bytes it shipped and received
    prompt_tokens_total: int = 0
    prefix_hit_tokens_total: int = 0
    kv_sent_bytes_total: int = 0
    kv_received_bytes_total: int = 0
    # speculative decoding (counters): guessed tokens verified, and of those accepted
    spec_proposed_tokens_total: int = 0
    spec_accepted_tokens_total: int = 0


class Registry:
    def register(self, info: WorkerInfo) -> None: ...

    def heartbeat(self, load: Load) -> None: ...

    def deregister(self, worker_id: str) -> None: ...

    def workers(self, role: str | None = None) -> list[WorkerInfo]: ...

    def load(self, worker_id: str) -> Load | None: ...

    def kv_events(self, stored: list[int], removed: list[int], snapshot: bool) -> None:
        """The worker's prefix-cache changes (or, `snapshot`, all it holds) for the coordinators' KV
        index; sent with the next beat."""

    def kv_snapshot_wanted(self) -> bool:
        """Whether the next kv_events should be a snapshot (a coordinator appeared, or missed some)."""
        return False

    def gone_requesters(self) -> list[str]:
        """Reply endpoints of requesters (gateways) that died since the last call: their requests here
        have nobody to stream to and are aborted."""
        return []


class DirectoryRegistry(Registry):
    def __init__(self, path: str | os.PathLike, stale_after: float = 3.0):
        self.path = Path(path)
        (self.path / "workers").mkdir(parents=True, exist_ok=True)
        (self.path / "load").mkdir(parents=True, exist_ok=True)
        self.stale_after = stale_after

    def _write(self, f: Path, data: bytes) -> None:
        tmp = f.with_suffix(".tmp")
        tmp.write_bytes(data)
        tmp.replace(f)  # atomic: readers never see half a file

    def register(self, info: WorkerInfo) -> None:
        self._write(self.path / "workers" / f"{info.worker_id}.json", msgspec.json.encode(info))

    def heartbeat(self, load: Load) -> None:
        self._write(self.path / "load" / f"{load.worker_id}.json", msgspec.json.encode(load))

    def deregister(self, worker_id: str) -> None:
        for sub in ("workers", "load"):
            try:
                (self.path / sub / f"{worker_id}.json").unlink()
            except FileNotFoundError:
                pass

    def workers(self, role: str | None = None, live_only: bool = True) -> list[WorkerInfo]:
        out = []
        for f in sorted((self.path / "workers").glob("*.json")):
            try:
                info = msgspec.json.decode(f.read_bytes(), type=WorkerInfo)
            except (msgspec.DecodeError, msgspec.ValidationError, OSError):
                continue
            if role is not None and info.role != role:
                continue
            if live_only:
                load = self.load(info.worker_id)
                if load is None or time.time() - load.ts > self.stale_after:
                    continue
            out.append(info)
        return out

    def load(self, worker_id: str) -> Load | None:
        try:
            return msgspec.json.decode((self.path / "load" / f"{worker_id}.json").read_bytes(), type=Load)
        except (FileNotFoundError, msgspec.DecodeError, msgspec.ValidationError):
            return None
