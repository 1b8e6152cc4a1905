"""A worker's link to the cluster (torch-free): its registration on an etcd lease, and its load
heartbeats over ZeroMQ to every coordinator (DESIGN.md §5: etcd is not on the request path).

Runs an asyncio loop on its own thread, so a long model step never delays a lease refresh or a beat.
The worker's loop hands it load samples (`heartbeat`); the agent sends the newest one every
`interval` to each coordinator listed under coordinators/ (standbys stay warm for a takeover). A
worker loop that stops sampling for `stall_after` seconds (hung, not dead) stops being vouched for:
the beats stop and the coordinator marks the worker suspect.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time

import msgspec
import zmq
import zmq.asyncio

from common import security
from common.coordinator_protocol import MAX_KV_EVENTS, VERSION, Beat, CoordinatorInfo, KVEvents, encode
from common.etcd import keys
from common.etcd.session import Session
from common.etcd.watch import PrefixMirror
from common.registry import Load, Registry, WorkerInfo

log = logging.getLogger(__name__)


class EtcdRegistry(Registry):
    def __init__(self, endpoints: list[str], cluster: str, ttl: int = 3, interval: float = 0.2,
                 stall_after: float = 30.0, timeout: float = 10.0, kv_snapshot_s: float = 30.0):
        """`kv_snapshot_s`: how often the worker's whole prefix cache goes to the coordinators anyway
        (KV events lost on the way cost hits until then)."""
        self.endpoints, self.cluster, self.ttl = endpoints, cluster, ttl
        self.kv_snapshot_s = kv_snapshot_s
        self._kv: queue.SimpleQueue = queue.SimpleQueue()  # (stored, removed, snapshot) from the worker
        self._kv_seq = 0
        self._kv_snapshot_at = 0.0
        self._want_snapshot = False
        self.kv_messages_sent = 0
        self.interval, self.stall_after, self.timeout = interval, stall_after, timeout
        self._latest: Load | None = None
        self._gone: queue.SimpleQueue = queue.SimpleQueue()
        self._incarnation = time.time_ns()
        self._latest_at = 0.0
        self._key: str | None = None
        self.session: Session | None = None
        self.coordinators: dict[str, CoordinatorInfo] = {}
        self.beats_sent = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="cluster-agent", daemon=True)
        self._thread.start()
        self._call(self._start())

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(self.timeout)

    async def _start(self) -> None:
        self.session = await Session(self.endpoints, ttl=self.ttl).start()
        self._ctx = zmq.asyncio.Context()
        self._socks: dict[str, zmq.asyncio.Socket] = {}
        self._mirror = PrefixMirror(self.session, keys.coordinators(self.cluster), self._coordinator_changed).start()
        self._gw_mirror = PrefixMirror(self.session, keys.gateways(self.cluster), self._gateway_changed).start()
        self._wake = asyncio.Event()
        self._beater = asyncio.create_task(self._beat_loop())

    def _coordinator_changed(self, key: str, old: bytes | None, new: bytes | None) -> None:
        cid = keys.worker_id_of(key)
        if new is None:
            info = self.coordinators.pop(cid, None)
            sock = self._socks.pop(info.heartbeats, None) if info else None
            if sock is not None:
                sock.close(0)
            return
        try:
            if cid not in self.coordinators:
                self._want_snapshot = True  # a new (or restarted) coordinator knows nothing of our cache
            self.coordinators[cid] = msgspec.json.decode(new, type=CoordinatorInfo)
        except (msgspec.DecodeError, msgspec.ValidationError):
            log.warning("ignored a malformed coordinator record at %s", key)

    def _gateway_changed(self, key: str, old: bytes | None, new: bytes | None) -> None:
        if new is None and old is not None:  # a gateway's lease is gone: it died (or stopped)
            try:
                reply_to = msgspec.json.decode(old).get("reply_to")
            except (msgspec.DecodeError, AttributeError):
                return
            if reply_to:
                self._gone.put(reply_to)

    async def _beat_loop(self) -> None:
        seq = 0
        while True:
            try:  # a fresh sample goes out at once; without one, the last is repeated every interval
                await asyncio.wait_for(self._wake.wait(), self.interval)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            load = self._latest
            if load is None or time.monotonic() - self._latest_at > self.stall_after:
                continue  # nothing to vouch for (not registered yet, or the worker's loop is stuck)
            seq += 1
            self.beats_sent += await self._send_all(encode(Beat(VERSION, seq, load, self._incarnation)))
            for data in self._kv_messages(load.worker_id):
                sent = await self._send_all(data)
                self.kv_messages_sent += sent
                if sent < len(self.coordinators):
                    self._want_snapshot = True  # a coordinator missed it: resync it

    async def _send_all(self, data: bytes) -> int:
        """Sends `data` to every coordinator's heartbeat socket without waiting; returns how many took it."""
        n = 0
        for info in list(self.coordinators.values()):
            try:
                sock = self._socks.get(info.heartbeats)
                if sock is None:
                    sock = security.client(self._ctx.socket(zmq.PUSH))
                    sock.setsockopt(zmq.LINGER, 0)
                    sock.setsockopt(zmq.SNDHWM, 4)  # a dead coordinator does not pile beats up here
                    self._socks[info.heartbeats] = sock
                    sock.connect(info.heartbeats)
                await sock.send(data, zmq.NOBLOCK)
                n += 1
            except zmq.Again:
                pass
            except zmq.ZMQError as e:  # a malformed coordinator record: the others still get beats
                log.warning("heartbeats to %s: %s", info.heartbeats, e)
        return n

    def _kv_messages(self, worker_id: str) -> list[bytes]:
        """The KV events the worker handed over since the last beat, as KVEvents messages (a snapshot
        in parts of at most MAX_KV_EVENTS hashes)."""
        out = []
        while True:
            try:
                stored, removed, snapshot = self._kv.get_nowait()
            except queue.Empty:
                return out
            if snapshot:
                parts = max(1, -(-len(stored) // MAX_KV_EVENTS))
                chunks = [(stored[i * MAX_KV_EVENTS:(i + 1) * MAX_KV_EVENTS], [], i, parts) for i in range(parts)]
            else:  # a delta is bounded by the engine's KVEventLog (it overflows into a snapshot first)
                chunks = [(stored, removed, 0, 1)]
            for st, rm, part, parts in chunks:
                self._kv_seq += 1
                out.append(encode(KVEvents(VERSION, worker_id, self._incarnation, self._kv_seq, st, rm,
                                           snapshot, part, parts)))

    # ---- Registry ------------------------------------------------------------------------------
    def register(self, info: WorkerInfo) -> None:
        self._key = keys.worker(self.cluster, info.role, info.worker_id)
        self._call(self.session.register(self._key, msgspec.json.encode(info)))

    def heartbeat(self, load: Load) -> None:
        self._latest, self._latest_at = load, time.monotonic()
        self._loop.call_soon_threadsafe(self._wake.set)  # the agent's loop sends it now

    def kv_events(self, stored: list[int], removed: list[int], snapshot: bool) -> None:
        if snapshot:
            self._want_snapshot, self._kv_snapshot_at = False, time.monotonic()
        self._kv.put((stored, removed, snapshot))

    def kv_snapshot_wanted(self) -> bool:
        return self._want_snapshot or time.monotonic() - self._kv_snapshot_at > self.kv_snapshot_s

    def gone_requesters(self) -> list[str]:
        out = []
        while True:
            try:
                out.append(self._gone.get_nowait())
            except queue.Empty:
                return out

    def deregister(self, worker_id: str) -> None:
        async def stop():
            self._beater.cancel()
            await self._mirror.stop()
            await self._gw_mirror.stop()
            for s in self._socks.values():
                s.close(0)
            await self.session.close()  # revokes the lease: the registration goes at once
        try:
            self._call(stop())
        except Exception as e:  # etcd gone: the lease expires on its own
            log.warning("deregistering %s: %s", worker_id, e)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
