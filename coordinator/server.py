"""The coordinator process (DESIGN.md §1, §5-7). Torch-free; one asyncio loop.

Every replica keeps a warm live view: worker registrations mirrored from etcd (workers/), their load
from ZeroMQ heartbeats (every worker beats to every coordinator), drains from etcd (drain/). One
replica leads (coordinator/election.py); only the leader answers placements (the others reply
`not_leader`, and gateways follow the leader key). Every replica publishes worker events on its PUB
socket, so a gateway subscribed to any of them hears of a failure.

Sockets (bound on `host`; port 0 = any free port; published under coordinators/<id>):
    placement  ROUTER  Place -> Placed | Rejected
    heartbeats PULL    Beat
    events     PUB     WorkerEvent (suspect, dead, draining, live)
Admin HTTP API (aiohttp) on admin_host:admin_port (127.0.0.1:8001): see ADMIN_OPENAPI.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections import deque
from dataclasses import dataclass, field

import msgspec
import zmq

from common import security
from common.coordinator_protocol import (
    VERSION,
    CoordinatorInfo,
    KVEvents,
    MessageError,
    Place,
    Placed,
    Rejected,
    WorkerAddr,
    WorkerEvent,
    decode_beat,
    decode_place,
    encode,
)
from common.etcd import keys
from common.etcd.session import Session
from common.etcd.watch import PrefixMirror
from common.metrics import Metrics
from common.registry import WorkerInfo
from common.zmq_loop import Reader
from coordinator.costs import CostRefiner
from coordinator.election import Election
from coordinator.kv_index import KVIndex
from coordinator.live_view import LiveView, shape_of
from coordinator.policy import (
    DecodeCost,
    PlacementRequest,
    PrefillCost,
    Rejection,
    make_policy,
)
from coordinator.status import WorkerCollector, cluster_status

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 1 << 20


@dataclass
class CoordinatorConfig:
    etcd: list[str]
    cluster: str = "default"
    coordinator_id: str = ""
    host: str = "127.0.0.1"  # interface of the ZeroMQ sockets
    placement_port: int = 0
    heartbeat_port: int = 0
    events_port: int = 0
    admin_host: str = "127.0.0.1"
    admin_port: int = 8001  # 0: any free port
    policy: str = "slo"
    suspect_after: float = 1.0  # seconds without a heartbeat
    lease_ttl: int = 2
    ttft_ms: float | None = None  # the cluster's default SLOs (a request may name its own)
    tpot_ms: float | None = None
    slo_classes: dict = None  # name -> (ttft_ms | None, tpot_ms | None); "batch" (no SLOs) is built in
    kv_aware: bool = True  # False: placement ignores the KV index (and no decode worker prefills locally)
    local_prefill_tokens: int | None = None  # the slo policy's local prefill threshold (None: cost model)
    kv_bandwidth_gb_s: float = 2.0

    def __post_init__(self):
        if not self.etcd:
            raise ValueError("coordinator: at least one etcd endpoint is needed")
        if self.suspect_after <= 0:
            raise ValueError(f"suspect_after = {self.suspect_after!r}: must be > 0")
        keys.root(self.cluster)
        make_policy(self.policy, self.local_prefill_tokens)
        if not self.kv_bandwidth_gb_s > 0:
            raise ValueError(f"kv_bandwidth_gb_s = {self.kv_bandwidth_gb_s!r}: must be > 0")
        self.slo_classes = {"batch": (None, None), **(self.slo_classes or {})}
        self.coordinator_id = self.coordinator_id or f"coord-{uuid.uuid4().hex[:8]}"


@dataclass
class _State:
    suspect: set[str] = field(default_factory=set)
    events: deque = field(default_factory=lambda: deque(maxlen=200))  # recent, for the admin API


class Coordinator:
    def __init__(self, config: CoordinatorConfig):
        self.config = config
        self.view = LiveView(config.suspect_after, config.kv_bandwidth_gb_s)
        self.refiner = CostRefiner()
        self._measured: set[tuple[str, str]] = set()  # (model, shape) profiles from `cluster profile`
        self.policy = make_policy(config.policy, config.local_prefill_tokens if config.kv_aware else 0)
        self.state = _State()
        self.session: Session | None = None
        self.election: Election | None = None
        self.info: CoordinatorInfo | None = None
        self.leader_info: CoordinatorInfo | None = None
        self._beat_seq: dict[str, tuple[int, int]] = {}  # worker -> (incarnation, last seq)
        self.kv_index = KVIndex()  # which worker's prefix cache holds which block (from KVEvents)
        self._tasks: list[asyncio.Task] = []
        self._runner = None
        self._stopped = asyncio.Event()
        m = self.metrics = Metrics()
        self.m_placements = m.counter("placements", "placement decisions", ["result"])
        self.m_place_latency = m.histogram("placement_seconds", "time to decide a placement",
                                           buckets=(1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 1e-2, 0.1))
        self.m_bad = m.counter("messages_dropped", "malformed messages dropped", ["socket"])
        self.m_beats = m.counter("heartbeats", "heartbeats received")
        self.m_kv_events = m.counter("kv_events", "workers' KV event messages", ["result"])
        self.m_events = m.counter("worker_events", "worker events published", ["state"])
        self.m_leader = m.gauge("coordinator_is_leader", "1 while this replica leads")
        self.m_refinements = m.counter("cost_model_refinements", "cost models rescaled from heartbeats")
        m.register(WorkerCollector(self))  # per-worker series, read from the live view at each scrape

    @property
    def is_leader(self) -> bool:
        return self.election is not None and self.election.is_leader

    # ---- lifecycle ---------------------------------------------------------------------------------
    async def start(self) -> Coordinator:
        c = self.config
        self.session = await Session(c.etcd, ttl=c.lease_ttl).start()
        self.ctx = zmq.Context()
        self.router = self._bind(zmq.ROUTER, c.placement_port)
        self.pull = self._bind(zmq.PULL, c.heartbeat_port)
        self.pub = self._bind(zmq.PUB, c.events_port)
        admin = await self._start_admin()
        self.info = CoordinatorInfo(c.coordinator_id, self.router.getsockopt_string(zmq.LAST_ENDPOINT),
                                    self.pull.getsockopt_string(zmq.LAST_ENDPOINT),
                                    self.pub.getsockopt_string(zmq.LAST_ENDPOINT), admin, os.getpid())
        self.election = Election(self.session, keys.leader(c.cluster), msgspec.json.encode(self.info))
        self.workers = PrefixMirror(self.session, keys.workers(c.cluster), self._worker_changed).start()
        self.drains = PrefixMirror(self.session, keys.drains(c.cluster), self._drain_changed).start()
        self.leader_mirror = PrefixMirror(self.session, keys.leader(c.cluster), self._leader_changed).start()
        self.profile_mirror = PrefixMirror(self.session, keys.profiles(c.cluster), self._profile_changed).start()
        self.gateway_mirror = PrefixMirror(self.session, keys.gateways(c.cluster), lambda *a: None).start()
        await self.session.register(keys.coordinator(c.cluster, c.coordinator_id), msgspec.json.encode(self.info))
        loop = asyncio.get_running_loop()
        self._beat_reader = Reader(loop, self.pull, self._on_beat)
        self._router_reader = Reader(loop, self.router, self._on_place, multipart=True)
        for coro in (self._monitor(), self._lead(), self._refine()):
            self._tasks.append(asyncio.create_task(coro))
        log.info("coordinator %s: placement %s, heartbeats %s, events %s, admin %s", c.coordinator_id,
                 self.info.placement, self.info.heartbeats, self.info.events, self.info.admin)
        return self

    def _bind(self, kind: int, port: int) -> zmq.Socket:
        s = security.server(self.ctx.socket(kind))
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        if kind == zmq.ROUTER:
            s.setsockopt(zmq.ROUTER_MANDATORY, 0)
        addr = f"tcp://{self.config.host}"
        if port:
            s.bind(f"{addr}:{port}")
        else:
            s.bind_to_random_port(addr)
        return s

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    def stop(self) -> None:
        self._stopped.set()

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for mirror in (self.workers, self.drains, self.leader_mirror, self.profile_mirror, self.gateway_mirror):
            await mirror.stop()
        if self.election is not None and self.election.is_leader:
            try:
                await self.election.resign()
            except Exception as e:
                log.warning("resigning: %s", e)
        if self._runner is not None:
            await self._runner.cleanup()
        await self.session.close()
        for r in (self._beat_reader, self._router_reader):
            r.close()
        for s in (self.router, self.pull, self.pub):
            s.close(0)
        self.ctx.term()

    # ---- etcd mirrors ------------------------------------------------------------------------------
    def _worker_changed(self, key: str, old: bytes | None, new: bytes | None) -> None:
        now = time.monotonic()
        wid = keys.worker_id_of(key)
        if new is None:
            v = self.view.deregistered(wid)
            self.state.suspect.discard(wid)
            self._beat_seq.pop(wid, None)
            self.kv_index.forget(wid)
            if v is not None:
                self._publish(wid, v.info.role, "dead", "its etcd lease is gone")
                if self.is_leader:
                    asyncio.ensure_future(self._forget_drain(wid))
            return
        try:
            info = msgspec.json.decode(new, type=WorkerInfo)
            self.view.registered(info, now)
        except (msgspec.DecodeError, msgspec.ValidationError, TypeError) as e:
            self.m_bad.labels(socket="registry").inc()
            log.warning("ignored a malformed registration at %s: %s", key, e)
            return
        if keys.drain(self.config.cluster, wid) in self.drains.items:
            self.view.drain(wid)
        if info.profile and self.is_leader:
            asyncio.ensure_future(self._store_profile(info))
        log.info("worker %s (%s, %s) registered", wid, info.role, info.model)

    def _drain_changed(self, key: str, old: bytes | None, new: bytes | None) -> None:
        wid = keys.worker_id_of(key)
        if self.view.drain(wid, new is not None) and new is not None:
            v = self.view.workers[wid]
            self._publish(wid, v.info.role, "draining", "drained by an operator")

    async def _store_profile(self, info: WorkerInfo) -> None:
        """The first profile measured for a (model, shape) becomes the stored one (fenced: leader only);
        `cluster profile` overwrites it with a fuller measurement."""
        key = keys.profile(self.config.cluster, info.model, shape_of(info))
        try:
            if await self.session._call(self.session.client.get(key.encode())) is None:
                await self.election.fenced_put(key, msgspec.json.encode(
                    {**info.profile, "source": f"start-up profile of {info.worker_id}", "ts": time.time()}))
        except Exception as e:
            log.debug("storing the profile of %s: %s", info.worker_id, e)

    async def store_profile(self, model: str, shape: str, profile: dict) -> bool:
        """A fenced write of a measured profile (the leader's); every replica's mirror applies it."""
        if not self.is_leader:
            return False
        return await self.election.fenced_put(keys.profile(self.config.cluster, model, shape),
                                              msgspec.json.encode({**profile, "ts": time.time()}))

    async def _forget_drain(self, wid: str) -> None:
        try:
            await self.session._call(self.session.client.delete(keys.drain(self.config.cluster, wid).encode()))
        except Exception as e:
            log.debug("forgetting drain of %s: %s", wid, e)

    def _profile_changed(self, key: str, old: bytes | None, new: bytes | None) -> None:
        model, _, shape = key.removeprefix(keys.profiles(self.config.cluster)).rpartition("/")
        try:
            prof = msgspec.json.decode(new) if new else None
            # a profile measured end to end (`cluster profile`: TTFT and inter-token gaps as clients see
            # them) is not rescaled by the refiner, which compares with bare step times
            if isinstance(prof, dict) and prof.get("source") == "cluster profile":
                self._measured.add((model, shape))
            else:
                self._measured.discard((model, shape))
            if prof is not None:
                prof = {side: prof[side] for side in ("prefill", "decode") if isinstance(prof.get(side), dict)}
                PrefillCost(**prof.get("prefill", {}))  # validated before any worker uses it
                DecodeCost(**prof.get("decode", {}))
        except (msgspec.DecodeError, TypeError) as e:
            self.m_bad.labels(socket="profiles").inc()
            log.warning("ignored a malformed profile at %s: %s", key, e)
            return
        self.view.shape_profile(model, shape, prof, time.monotonic())

    def _leader_changed(self, key: str, old: bytes | None, new: bytes | None) -> None:
        try:
            self.leader_info = msgspec.json.decode(new, type=CoordinatorInfo) if new else None
        except (msgspec.DecodeError, msgspec.ValidationError):
            self.leader_info = None

    # ---- sockets -----------------------------------------------------------------------------------
    def _publish(self, worker_id: str, role: str, state: str, reason: str) -> None:
        ev = WorkerEvent(VERSION, worker_id, role, state, reason, time.time())
        self.state.events.append(ev)
        self.m_events.labels(state=state).inc()
        log.warning("worker %s (%s) is %s: %s", worker_id, role, state, reason) if state != "live" else \
            log.info("worker %s (%s) is live again", worker_id, role)
        try:
            self.pub.send(encode(ev), zmq.NOBLOCK)
        except zmq.ZMQError:
            pass

    def _on_beat(self, data: bytes) -> None:
        now = time.monotonic()
        try:
            beat = decode_beat(data)
        except MessageError as e:
            self.m_bad.labels(socket="heartbeats").inc()
            log.debug("dropped: %s", e)
            return
        if isinstance(beat, KVEvents):
            ok = self.kv_index.apply(beat)  # (a worker not registered yet, or gone: see _refine)
            self.m_kv_events.labels(result="applied" if ok else "stale").inc()
            return
        wid = beat.load.worker_id
        inc, last = self._beat_seq.get(wid, (None, 0))
        if inc == beat.incarnation and beat.seq <= last:
            return  # an older beat of this incarnation, overtaken (a restarted worker is a new incarnation)
        self._beat_seq[wid] = (beat.incarnation, beat.seq)
        self.m_beats.inc()
        age = max(0.0, time.time() - beat.load.ts)  # wall clocks: same host, or NTP across hosts
        self.view.heartbeat(beat.load, now, sampled_at=now - age)
        v = self.view.workers.get(wid)
        if v is not None and beat.load.steps:
            ld = beat.load
            self.refiner.observe(v.info.model, shape_of(v.info), v.info.role, ld.steps, ld.step_ms, ld.tokens,
                                 ld.seqs, self.view.prefill_costs.get(wid, PrefillCost()),
                                 self.view.decode_costs.get(wid, DecodeCost()))

    def _on_place(self, frames: list) -> None:
        if len(frames) != 2:
            self.m_bad.labels(socket="placement").inc()
            return
        ident, data = frames
        t0 = time.perf_counter()
        try:
            req = decode_place(data)
        except MessageError as e:
            self.m_bad.labels(socket="placement").inc()
            log.debug("dropped: %s", e)
            return
        reply = self.place(req)
        self.m_place_latency.observe(time.perf_counter() - t0)
        self.m_placements.labels(result="placed" if isinstance(reply, Placed) else reply.code).inc()
        try:
            self.router.send_multipart([ident, encode(reply)], zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # the gateway went away
        self._router_reader.kick()  # the send may have taken the FD's edge

    def place(self, req: Place) -> Placed | Rejected:
        """One placement decision (the leader's): pure computation on the live view."""
        rid = req.request_id
        if not self.is_leader:
            return Rejected(VERSION, rid, "not_leader", "this coordinator is a standby", 0.1)
        if req.prompt_tokens < 1 or req.max_tokens < 0:
            return Rejected(VERSION, rid, "bad_request", "prompt_tokens must be >= 1 and max_tokens >= 0", 0)
        if req.model and req.model not in self.view.models():
            return Rejected(VERSION, rid, "unknown_model", f"no worker serves model {req.model!r}", 5.0)
        c = self.config
        ttft, tpot = c.ttft_ms, c.tpot_ms
        if req.slo_class:
            if req.slo_class not in c.slo_classes:
                return Rejected(VERSION, rid, "bad_request", f"unknown SLO class {req.slo_class!r} (known: "
                                f"{', '.join(sorted(c.slo_classes))})", 0)
            ttft, tpot = c.slo_classes[req.slo_class]
        ttft = req.ttft_ms if req.ttft_ms is not None else ttft
        tpot = req.tpot_ms if req.tpot_ms is not None else tpot
        preq = PlacementRequest(req.prompt_tokens, req.max_tokens, ttft / 1e3 if ttft else float("inf"),
                                tpot / 1e3 if tpot else float("inf"), self._cached(req))
        result, colocated = self.view.place(self.policy, preq, time.monotonic(), req.model, req.exclude)
        if isinstance(result, Rejection):
            code = "no_workers" if result.reason.startswith("no healthy") else "overloaded"
            return Rejected(VERSION, rid, code, result.reason, result.retry_after)
        p = self._addr(result.prefill)
        d = None if colocated else self._addr(result.decode)
        return Placed(VERSION, rid, p, d, result.predicted_ttft * 1e3, result.predicted_tpot * 1e3, ttft, tpot)

    def _cached(self, req: Place) -> dict[str, int]:
        """Prompt tokens each worker holds in its prefix cache, by the KV index (a hint: the worker
        looks the prefix up itself), counting only workers whose hashes chain the same way."""
        if not self.config.kv_aware or not req.block_hashes or req.block_size <= 0:
            return {}
        out = {}
        for wid, blocks in self.kv_index.match(req.block_hashes).items():
            v = self.view.workers.get(wid)
            if v is not None and v.info.kv_hash_root == req.hash_root and v.info.block_size == req.block_size:
                out[wid] = blocks * req.block_size
        return out

    def _addr(self, wid: str) -> WorkerAddr:
        i = self.view.workers[wid].info
        return WorkerAddr(wid, i.role, i.endpoint, i.kv_endpoints, i.layout)

    async def _monitor(self, period: float = 0.05) -> None:
        """Suspects: registered workers silent for longer than suspect_after."""
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            silent = set(self.view.suspects(now))
            for wid in silent - self.state.suspect:
                v = self.view.workers.get(wid)
                if v is not None:
                    self._publish(wid, v.info.role, "suspect",
                                  f"no heartbeat for {now - v.heard_at:.2f} s (limit {self.config.suspect_after} s)")
            for wid in self.state.suspect - silent:
                v = self.view.workers.get(wid)
                if v is not None:
                    self._publish(wid, v.info.role, "live", "heartbeats resumed")
            self.state.suspect = silent
            self.m_leader.set(1 if self.is_leader else 0)

    async def _refine(self, period: float = 5.0) -> None:
        """The leader stores cost models the fleet's step times disagree with, rescaled (costs.py)."""
        while True:
            await asyncio.sleep(period)
            for wid in self.kv_index.workers() - self.view.workers.keys():  # events of workers that
                self.kv_index.forget(wid)  # never registered, or came after their deregistration
            if not self.is_leader:
                continue
            profiles = {k: v for k, v in self.view.shape_profiles.items() if k not in self._measured}
            for model, shape, prof, ratios in self.refiner.proposals(profiles):
                key = keys.profile(self.config.cluster, model, shape)
                body = {**prof, "source": "online refinement", "ratios": ratios, "ts": time.time()}
                try:
                    if await self.election.fenced_put(key, msgspec.json.encode(body)):
                        log.info("cost model of %s/%s refined by %s", model, shape, ratios)
                        self.m_refinements.inc()
                except Exception as e:  # etcd unavailable: the next period tries again
                    log.debug("storing a refined profile: %s", e)

    async def _lead(self) -> None:
        while True:
            await self.election.campaign()
            log.info("coordinator %s leads cluster %s", self.config.coordinator_id, self.config.cluster)
            for v in list(self.view.workers.values()):  # registered before this replica led
                if v.info.profile:
                    await self._store_profile(v.info)
            while self.election.is_leader:
                await asyncio.sleep(0.05)
            log.warning("coordinator %s lost the lead; campaigning again", self.config.coordinator_id)
            while self.session.lost.is_set():
                await asyncio.sleep(0.05)

    # ---- admin API ---------------------------------------------------------------------------------
    async def _start_admin(self) -> str:
        from aiohttp import web

        from coordinator.admin import build_app

        self._runner = web.AppRunner(build_app(self), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.config.admin_host, self.config.admin_port)
        await site.start()
        port = self._runner.addresses[0][1]
        return f"http://{self.config.admin_host}:{port}"

    def cluster_status(self) -> dict:
        """What GET /v1/cluster answers (coordinator/status.py)."""
        return cluster_status(self)

    async def drain(self, worker_id: str) -> bool:
        if worker_id not in self.view.workers:
            return False
        await self.session._call(self.session.client.put(keys.drain(self.config.cluster, worker_id).encode(),
                                                         str(time.time()).encode()))
        self.view.drain(worker_id)
        return True

    async def profiles(self) -> dict:
        got = await self.session._call(self.session.client.get_prefix(keys.profiles(self.config.cluster).encode()))
        out = {}
        for kv in got:
            try:
                out[kv.key.decode().removeprefix(keys.profiles(self.config.cluster))] = msgspec.json.decode(kv.value)
            except msgspec.DecodeError:
                continue
        return out


async def serve(config: CoordinatorConfig, ready=None) -> None:
    coord = await Coordinator(config).start()
    if ready is not None:
        ready(coord)
    try:
        await coord.wait_stopped()
    finally:
        await coord.close()
