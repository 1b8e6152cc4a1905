"""The decode worker: receives prompts' KV from prefill workers, decodes them in one continuous batch.

    Reserve (kvtransfer)  -> blocks reserved for the prompt; KV frames land in them
    Handoff               -> prompt ids, first token, sampling params, reply address
    both present          -> LLMEngine.add_prefilled(): num_computed_tokens = prompt_len, then decode
    every step            -> TokenChunks (index 1, 2, ...) to the requester; Abort frees at once
    PrefillRequest        -> (no decode target: role cover, no prefill worker is live) served whole here

Outputs: the loop thread runs the engine's core (LLMEngine.step_core: token ids) and hands each step
to the output thread (common/output_thread.py), which detokenizes, matches stop strings (reported
back to the engine, which finishes the sequence before its next schedule), builds and sends the
TokenChunks. The loop tells it, in the same queue, where each request's chunks go (_Route) and
which were aborted (_Unroute); chunk indexes and routes live on that thread alone.

A Handoff whose KV never completes is failed after `handoff_timeout` (the reservation itself times
out in kvtransfer and frees its blocks); KV without a Handoff likewise.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from dataclasses import dataclass

import msgspec
import zmq

from common.heartbeat import Heartbeat
from common.messages import Abort, Handoff, PrefillRequest
from common.output_thread import OutputThread
from common.worker_io import ChunkSender, drain_requests, output_chunks, request_socket
from engine.config import EngineConfig
from engine.errors import TandemError
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from kvtransfer.pages import RankCaches
from kvtransfer.plan import KVLayout
from kvtransfer.receiver import RankReceiver
from kvtransfer.reservations import BlockPoolReserver, Reservations
from kvtransfer.zmq_transport import KVServer, RemoteRank

log = logging.getLogger(__name__)


@dataclass
class _Route:
    """(output thread) Where a request's chunks go, from which index."""
    request_id: str
    reply_to: str
    attempt: int
    first_index: int  # 1 after a Handoff (the prefill worker sent index 0), 0 served whole
    n: int
    admitted: float  # monotonic: its TPOT starts here
    slo_tpot_ms: float | None


@dataclass
class _Unroute:
    request_id: str  # aborted: nothing more of it goes out


@dataclass
class _Forget:
    reply_to: str  # the requester is gone: close the output thread's socket to it


def kv_dist_args(config: EngineConfig) -> dict:
    """KVServer's transport settings: torch.distributed (none: ZeroMQ), and the tcp page stream."""
    kv = config.kv_transfer
    backend = kv.backend(config.device.device)
    return {"dist_backend": backend, "device": config.device.device if backend == "nccl" else "cpu",
            "dist_timeout": kv.timeout_s, "stream": kv.stream(config.device.device)}


class DecodeWorker:
    def __init__(self, config: EngineConfig, worker_id: str = "decode-0", host: str = "127.0.0.1",
                 port: int = 0, kv_port: int = 0, kv_timeout: float = 10.0, handoff_timeout: float = 15.0):
        self.worker_id = worker_id
        self.engine = LLMEngine(config, rank_module="decode.rank_main")
        self.layout = KVLayout.of(self.engine.model_config, self.engine.config)
        self.metrics = Counter()
        # the block manager is changed by this loop (steps, admissions, aborts) and by the KV thread
        # (reservations): one lock for both
        self.bm_lock = threading.RLock()
        self.pool = BlockPoolReserver(self.engine.block_manager, self.bm_lock)
        self._ready: queue.SimpleQueue = queue.SimpleQueue()  # (request_id, attempt) from the KV thread
        runner = self.engine.runner
        caches = RankCaches(runner.kv_caches, runner.model.layer_start, 0)  # rank 0 holds the first heads
        receiver = RankReceiver(0, self.layout, caches, lambda *a: self.reservations.on_rank_done(*a), self.metrics)
        ranks: list = [receiver]
        self.reservations = Reservations(self.layout, ranks, self.pool.reserve, self._release_reservation,
                                         None, self._on_kv_ready,
                                         timeout=kv_timeout, metrics=self.metrics, refuse=self._refuse)
        self.kv_server = KVServer(f"tcp://{host}:{kv_port}", receiver, self.reservations, **kv_dist_args(config))
        self._kv_endpoints = [self.kv_server.endpoint]
        if self.layout.num_ranks > 1:  # the other ranks' KV servers; the driver stands in for them
            self._kv_endpoints = self.engine.executor.exchange(self.kv_server.endpoint)
            ranks += [RemoteRank(r, ep) for r, ep in enumerate(self._kv_endpoints) if r > 0]
        self.ctx = zmq.Context.instance()
        self.sock, self.endpoint = request_socket(self.ctx, host, port)
        self.chunks = ChunkSender(self.ctx, worker_id)  # the loop thread's (error chunks)
        self._stream = ChunkSender(self.ctx, worker_id)  # the output thread's (token chunks)
        self.handoff_timeout = handoff_timeout
        self._handoffs: dict[str, tuple[Handoff, float]] = {}  # request_id -> (handoff, deadline)
        self._kv_done: dict[str, int] = {}  # request_id -> attempt whose KV is in
        self._kv_deadline: dict[str, float] = {}  # request_id -> when KV without a Handoff is dropped
        self._live: dict[str, tuple[str, int]] = {}  # request_id -> (reply_to, attempt)
        self._routes: dict[str, _Route] = {}  # (output thread)
        self._first_index: dict = {}  # (output thread) (request_id, sample index) -> next chunk index
        self._tpot: queue.SimpleQueue = queue.SimpleQueue()  # (seconds, target ms, at) from the output thread
        self._aborted: dict[str, tuple[int, float]] = {}  # request_id -> (attempt, forget after)
        self._stop = False
        # (the KV thread's reservations change the block manager too: its KV events are read under bm_lock)
        self.heartbeat = Heartbeat(None, worker_id, kv_lock=self.bm_lock)  # `cluster worker --registry` sets the registry
        self.outputs = OutputThread(self._on_output, name=f"{worker_id}-outputs")

    @property
    def kv_endpoints(self) -> list[str]:
        return list(self._kv_endpoints)

    def start(self) -> None:
        self.kv_server.start()

    def _release_reservation(self, request_id: str, attempt: int | None = None) -> None:
        self.pool.release(request_id, attempt)

    def _on_kv_ready(self, request_id: str, attempt: int, block_ids: list[int]) -> None:
        """(KV thread) every rank has the request's pages."""
        self._ready.put((request_id, attempt))

    def _refuse(self, request_id: str, attempt: int) -> str | None:
        # called on the KV thread; a dict lookup is atomic enough for a tombstone check
        a = self._aborted.get(request_id)
        return "aborted by the requester" if a is not None and a[0] >= attempt else None

    # ---- the loop --------------------------------------------------------------------------------
    def run(self, until=None) -> None:
        """Serves until `stop()` (or `until()` returns True)."""
        while not self._stop and not (until and until()):
            if getattr(self.engine.executor, "broken", False):
                raise RuntimeError("a rank of this worker died; the worker goes down with it")
            self.outputs.check()
            self.poll(0 if self.engine.has_unfinished_requests() else 20)
            self._admit()
            self._expire()
            self._drop_orphans()
            if self.engine.has_unfinished_requests():
                t0 = time.monotonic()
                self._step()
                self.heartbeat.step_done(time.monotonic() - t0, *self.engine.last_step)
            self._record_tpot()
            self.heartbeat.kv_received_bytes = self.metrics["blocks_received"] * self.layout.block_bytes()
            self.heartbeat.maybe_beat(self.engine, len(self._handoffs) + self.reservations.num_pending)

    def stop(self) -> None:
        self._stop = True

    def close(self) -> None:
        self.kv_server.stop()
        self.outputs.close()
        self._stream.close()
        self.chunks.close()
        self.sock.close(0)
        self.engine.shutdown()

    def poll(self, timeout_ms: int) -> None:
        drain_requests(self.sock, timeout_ms, self._handle, self.metrics, chunks=self.chunks)

    def _handle(self, msg) -> None:
        if isinstance(msg, Handoff):
            old = self._handoffs.get(msg.request_id)
            if not self._refuse(msg.request_id, msg.attempt) and (old is None or old[0].attempt <= msg.attempt):
                self._handoffs[msg.request_id] = (msg, time.monotonic() + self.handoff_timeout)
        elif isinstance(msg, Abort):
            self._abort(msg.request_id, msg.attempt)
        elif isinstance(msg, PrefillRequest) and msg.decode is None:
            self._serve_whole(msg)
        else:
            self.metrics["messages_unexpected"] += 1

    def _serve_whole(self, req: PrefillRequest) -> None:
        """Role cover: no prefill worker is live, so the coordinator placed the whole request here; this
        worker prefills it too and streams every token from index 0."""
        rid = req.request_id
        live = self._live.get(rid)
        if self._refuse(rid, req.attempt) or (live is not None and live[1] >= req.attempt):
            return  # aborted, or a duplicate
        if live is not None:  # an older attempt still runs here: the newer one replaces it
            self._abort(rid, live[1])
        try:
            params = SamplingParams(**msgspec.structs.asdict(req.params))
            with self.bm_lock:
                self.engine.add_request(rid, req.prompt_token_ids, params, held_tokens=req.held_tokens,
                                        held_text=req.held_text)
        except (TandemError, TypeError, ValueError) as e:  # bad input fails this request only
            self.chunks.error(req.reply_to, rid, req.attempt, str(e))
            return
        self._live[rid] = (req.reply_to, req.attempt)
        self.outputs.submit(_Route(rid, req.reply_to, req.attempt, 0, params.n, time.monotonic(), req.slo_tpot_ms),
                            wait=False)
        self.metrics["admitted_whole"] += 1

    def _admit(self) -> None:
        with self.bm_lock:
            self._admit_locked()

    def _admit_locked(self) -> None:
        while True:
            try:
                rid, attempt = self._ready.get_nowait()
            except queue.Empty:
                break
            if self._refuse(rid, attempt) or self._kv_done.get(rid, -1) > attempt:  # aborted, or superseded
                self.pool.release(rid, attempt)
                continue
            self._kv_done[rid] = attempt  # a newer attempt's reservation already freed an older one's KV
            self._kv_deadline[rid] = time.monotonic() + self.handoff_timeout
        for rid in [r for r in self._handoffs if r in self._kv_done]:
            h, _ = self._handoffs[rid]
            attempt = self._kv_done[rid]
            if attempt < h.attempt:  # stale KV: the newer attempt's is on its way
                self.pool.release(rid, attempt)
                del self._kv_done[rid]
                self._kv_deadline.pop(rid, None)
                continue
            if h.attempt < attempt:  # stale Handoff: the newer attempt's is on its way
                del self._handoffs[rid]
                continue
            del self._handoffs[rid], self._kv_done[rid]
            self._kv_deadline.pop(rid, None)
            holder = self.pool.take(rid, attempt)
            if holder is None:  # superseded while queued
                continue
            live = self._live.get(rid)
            if live is not None and live[1] < attempt:  # an older attempt of it still decodes here: it moved
                self.engine.abort_request(rid)
                self._live.pop(rid)
                self.outputs.submit(_Unroute(rid), wait=False)
            try:
                params = SamplingParams(**msgspec.structs.asdict(h.params))
                self.engine.add_prefilled(rid, h.prompt_token_ids, h.first_token, params, holder.block_ids,
                                          h.held_tokens, h.held_text)
            except (TandemError, TypeError, ValueError) as e:  # a malformed Handoff must not take D down
                self.engine.block_manager.free(holder)
                self.chunks.error(h.reply_to, rid, h.attempt, str(e), index=1)
                continue
            self._live[rid] = (h.reply_to, h.attempt)
            self.outputs.submit(_Route(rid, h.reply_to, h.attempt, 1, 1, time.monotonic(), h.slo_tpot_ms), wait=False)
            self.metrics["admitted"] += 1

    def _expire(self) -> None:
        now = time.monotonic()
        for rid in [r for r, (_, t) in self._aborted.items() if t <= now]:
            del self._aborted[rid]
        for rid in [r for r, dl in self._kv_deadline.items() if dl <= now]:  # KV in, no Handoff (P died)
            del self._kv_deadline[rid]
            attempt = self._kv_done.pop(rid, None)
            if attempt is not None:
                self.pool.release(rid, attempt)
                self.metrics["kv_without_handoff"] += 1
        for rid in [r for r, (_, dl) in self._handoffs.items() if dl <= now]:
            h, _ = self._handoffs.pop(rid)
            self.chunks.error(h.reply_to, rid, h.attempt, "the prompt's KV never arrived", index=1,
                              code="unavailable")
            self.metrics["handoffs_expired"] += 1

    def _step(self) -> None:
        with self.bm_lock:
            core = self.engine.step_core()
        for rid in core.finished:  # its last chunks are the output thread's to send
            self._live.pop(rid, None)
        self.outputs.submit(core)

    def _record_tpot(self) -> None:
        while True:
            try:
                seconds, target, at = self._tpot.get_nowait()
            except queue.Empty:
                return
            self.heartbeat.slo.record("tpot", seconds, target, at)

    # ---- the output thread -------------------------------------------------------------------------
    def _on_output(self, item) -> None:
        if isinstance(item, _Route):
            self._routes[item.request_id] = item
            self._first_index[(item.request_id, 0)] = item.first_index
        elif isinstance(item, _Unroute):
            self._unroute(item.request_id)
        elif isinstance(item, _Forget):
            self._stream.forget(item.reply_to)
        else:
            outputs, stops = self.engine.outputs.process(item)
            for hit in stops:
                self.engine.report_stop(hit)
            for ro in outputs:
                self._send(ro)

    def _send(self, ro) -> None:
        route = self._routes.get(ro.request_id)
        if route is None:
            return
        for chunk in output_chunks(ro, route.attempt, self._first_index, self.worker_id):
            self._stream.send(route.reply_to, chunk)
        if ro.finished:
            n = self._first_index.get((ro.request_id, 0), 1) - 1  # tokens decoded here
            self._unroute(ro.request_id)
            if n > 0 and ro.outputs[0].finish_reason in ("stop", "length"):
                now = time.monotonic()
                self._tpot.put(((now - route.admitted) / n, route.slo_tpot_ms, now))

    def _unroute(self, request_id: str) -> None:
        route = self._routes.pop(request_id, None)
        for i in range(route.n if route is not None else 1):
            self._first_index.pop((request_id, i), None)

    def _drop_orphans(self) -> None:
        """Requests of a gateway that died (its etcd lease is gone) have nobody to stream to."""
        reg = self.heartbeat.registry
        for reply_to in (reg.gone_requesters() if reg is not None else []):
            doomed = {rid: att for rid, (rt, att) in self._live.items() if rt == reply_to}
            doomed.update({rid: h.attempt for rid, (h, _) in self._handoffs.items() if h.reply_to == reply_to})
            for rid, att in doomed.items():
                self._abort(rid, att)
                self.metrics["aborted_orphans"] += 1
            self.chunks.forget(reply_to)
            self.outputs.submit(_Forget(reply_to), wait=False)

    def _abort(self, request_id: str, attempt: int) -> None:
        # a tombstone, so a Reserve or Handoff of this attempt (or an older one) still on its way is
        # refused; everything of a newer attempt (a migration back to this worker) is left alone
        prev = self._aborted.get(request_id)
        self._aborted[request_id] = (max(attempt, prev[0] if prev else -1), time.monotonic() + 60.0)
        # the reservation table before the block lock: the KV thread takes them in that order
        self.reservations.on_abort(request_id, attempt, "aborted by the requester", notify_sender=True)
        with self.bm_lock:
            h = self._handoffs.get(request_id)
            if h is not None and h[0].attempt <= attempt:
                del self._handoffs[request_id]
            live = self._live.get(request_id)
            if live is not None and live[1] <= attempt:
                self.engine.abort_request(request_id)
                self._live.pop(request_id)
                self.outputs.submit(_Unroute(request_id), wait=False)
            self._admit_locked()  # KV that landed but is still queued for the loop: release it too
            kv = self._kv_done.get(request_id)
            if kv is not None and kv <= attempt:
                del self._kv_done[request_id]
                self._kv_deadline.pop(request_id, None)
                self.pool.release(request_id, kv)
        self.metrics["aborted"] += 1
