"""The prefill worker: computes prompts' KV, streams it layer by layer to their decode workers, and
reports the first token. With no decode target it serves the request itself (colocated mode).

    PrefillRequest -> reserve blocks at D (kvtransfer; "no room" -> error chunk at once)
                   -> scheduled with chunked prefill in this worker's batch; the step that computes the
                      prompt's last chunk pins its pages and ships each layer as soon as it is computed
                   -> first token: TokenChunk(index 0) to the requester, Handoff to D
                   -> pages freed on D's Ack, its refusal, or no Ack in time
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import Counter

import msgspec
import zmq

from common import security
from common.heartbeat import Heartbeat
from common.messages import VERSION, Abort, Handoff, PrefillRequest, TokenChunk, encode
from common.worker_io import ChunkSender, drain_requests, output_chunks, request_socket, wire_logprobs
from engine.block_manager import chain_hashes
from engine.config import EngineConfig
from engine.errors import TandemError
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from kvtransfer.connector import DataPath, ShipItem, ShipPlan, encode_plan
from kvtransfer.plan import IncompatibleLayouts, KVLayout
from kvtransfer.sender import SendTransfer, TransferState
from kvtransfer.zmq_transport import KVClient
from prefill.shipping import Shipper

log = logging.getLogger(__name__)


@dataclasses.dataclass
class _Pending:
    req: PrefillRequest
    params: SamplingParams  # the request's own (P runs it with max_tokens = 1)
    transfer: SendTransfer | None  # None: colocated
    holder: object = None  # pinned pages
    arrived: float = 0.0  # monotonic, when the request reached this worker (its TTFT starts)
    first_at: float = 0.0  # colocated: when its first token left (its TPOT starts)


class PrefillWorker:
    def __init__(self, config: EngineConfig, worker_id: str = "prefill-0", host: str = "127.0.0.1", port: int = 0,
                 reserve_timeout: float = 5.0, ack_timeout: float = 10.0):
        self.worker_id = worker_id
        self.shipper = Shipper()  # rank 0's; followers run their own (prefill.rank_main)
        self.engine = LLMEngine(config, connector=self.shipper, rank_module="prefill.rank_main")
        self.layout = KVLayout.of(self.engine.model_config, self.engine.config)
        kv = config.kv_transfer
        backend = kv.backend(config.device.device)  # every rank's Shipper sends payloads this way
        self.kv_path = DataPath(backend, config.device.device if backend == "nccl" else "cpu", kv.timeout_s,
                                kv.stream(config.device.device))
        self.client = KVClient(0)  # the driver's control path: reserve, ack, abort
        self.ctx = zmq.Context.instance()
        self.sock, self.endpoint = request_socket(self.ctx, host, port)
        self.chunks = ChunkSender(self.ctx, worker_id)
        self._decode_socks: dict[str, zmq.Socket] = {}
        self.reserve_timeout, self.ack_timeout = reserve_timeout, ack_timeout
        self.metrics = Counter()
        self._pending: dict[str, _Pending] = {}  # admitted here, first token not out yet (or colocated)
        self._reserving: dict[str, _Pending] = {}  # waiting for the decode worker's Reserved
        self._shipping: list[SendTransfer] = []  # waiting for D's Ack
        self._s_per_token = 0.01  # prefill seconds per prompt token, measured (EWMA of its steps)
        self._first_index: dict = {}
        self._stop = False
        self.heartbeat = Heartbeat(None, worker_id)  # `cluster worker --registry` sets the registry

    def start(self) -> None:
        self.client.start()

    def stop(self) -> None:
        self._stop = True

    def close(self) -> None:
        for p in list(self._reserving.values()) + list(self._pending.values()):
            if p.transfer is not None:
                p.transfer.abort("prefill worker closing")
        for st in self._shipping:
            st.abort("prefill worker closing")
        self.client.stop()
        self.shipper.close()
        self.chunks.close()
        for s in self._decode_socks.values():
            s.close(0)
        self.sock.close(0)
        self.engine.shutdown()

    def run(self, until=None) -> None:
        while not self._stop and not (until and until()):
            if getattr(self.engine.executor, "broken", False):
                raise RuntimeError("a rank of this worker died; the worker goes down with it")
            busy = self.engine.has_unfinished_requests()
            self.poll(0 if busy else (1 if self._reserving else 5 if self._shipping else 20))
            self._poll_reservations()
            self._drop_orphans()
            if self.engine.has_unfinished_requests():
                t0 = time.monotonic()
                self._step()
                dt = time.monotonic() - t0
                self.heartbeat.step_done(dt, *self.engine.last_step)
                if self.engine.last_step[0]:
                    self._s_per_token += 0.2 * (dt / self.engine.last_step[0] - self._s_per_token)
            still = []
            for st in self._shipping:
                if not st.poll():
                    still.append(st)
                elif st.state == TransferState.DONE:
                    self.heartbeat.kv_sent_bytes += (len(st.dst_block_ids) - st.held) * self.layout.block_bytes()
            self._shipping = still
            self._drop_refused()
            self.heartbeat.maybe_beat(self.engine, len(self._shipping))

    # ---- requests ------------------------------------------------------------------------------
    def poll(self, timeout_ms: int) -> None:
        drain_requests(self.sock, timeout_ms, self._handle, self.metrics, chunks=self.chunks)

    def _handle(self, msg) -> None:
        if isinstance(msg, PrefillRequest):
            self._accept(msg)
        elif isinstance(msg, Abort):
            self._abort(msg.request_id)
        else:
            self.metrics["messages_unexpected"] += 1

    def _accept(self, req: PrefillRequest) -> None:
        rid = req.request_id
        try:
            params = SamplingParams(**msgspec.structs.asdict(req.params))
            if req.decode is not None and params.n != 1:
                raise TandemError("n > 1 is served colocated (send the request without a decode target)")
        except (TandemError, TypeError) as e:
            self.chunks.error(req.reply_to, rid, req.attempt, str(e))
            return
        transfer = None
        if req.decode is not None:
            try:
                if not req.decode.kv_endpoints:
                    raise ValueError("no KV endpoints")
                dst = KVLayout.from_spec(req.decode.layout)
                bm = self.engine.block_manager  # (the decode worker links what its cache holds of these)
                transfer = SendTransfer(self.client, rid, req.attempt, len(req.prompt_token_ids), self.layout, dst,
                                        req.decode.kv_endpoints, release=lambda: None,
                                        reserve_timeout=self.reserve_timeout, ack_timeout=self.ack_timeout,
                                        block_hashes=chain_hashes(bm.root_hash, req.prompt_token_ids, bm.block_size),
                                        hash_root=bm.root_hash, wait_s=self._pages_due(len(req.prompt_token_ids)))
            except (IncompatibleLayouts, ValueError, TypeError) as e:
                self.chunks.error(req.reply_to, rid, req.attempt, f"decode worker {req.decode.worker_id}: {e}",
                                  blame=req.decode.worker_id)
                return
            # the reservation is asynchronous: an unreachable decode worker must not stall this loop
            transfer.start_reserve()
            self._reserving[rid] = _Pending(req, params, transfer, arrived=time.monotonic())
            return
        self._admit(req, params, None, time.monotonic())

    def _pages_due(self, num_tokens: int) -> float:
        """How long a decode worker reserving for a new prompt should wait for its pages: the prompts
        ahead of it here and its own, at twice the measured time per token, and the Ack's timeout.
        Without it a queue longer than the decode side's timeout failed every reservation behind it
        ("timed out waiting for KV frames", then a migration that computes the prompt again)."""
        ahead = self.engine.num_queued_tokens() + sum(len(p.req.prompt_token_ids) for p in self._reserving.values())
        return self.ack_timeout + 2.0 * self._s_per_token * (ahead + num_tokens)

    def _poll_reservations(self) -> None:
        for rid, p in list(self._reserving.items()):
            ok = p.transfer.poll_reserve()
            if ok is None:
                continue
            del self._reserving[rid]
            if ok:
                self._admit(p.req, p.params, p.transfer, p.arrived)
                continue
            self.metrics["reserve_failed"] += 1
            reason = p.transfer.reason
            self.chunks.error(p.req.reply_to, rid, p.req.attempt, f"decode worker {p.req.decode.worker_id}: {reason}",
                              code="capacity" if reason == "no room" else "unavailable", blame=p.req.decode.worker_id)

    def _admit(self, req: PrefillRequest, params: SamplingParams, transfer: SendTransfer | None,
               arrived: float) -> None:
        rid = req.request_id
        run_params = dataclasses.replace(params, max_tokens=1, n=1) if transfer else params
        try:
            self.engine.add_request(rid, req.prompt_token_ids, run_params, held_tokens=req.held_tokens,
                                    held_text=req.held_text)
        except TandemError as e:
            if transfer:
                transfer.abort(str(e))
            self.chunks.error(req.reply_to, rid, req.attempt, str(e))
            return
        self._pending[rid] = _Pending(req, params, transfer, arrived=arrived)

    def _drop_orphans(self) -> None:
        """Requests of a gateway that died (its etcd lease is gone) have nobody to stream to."""
        reg = self.heartbeat.registry
        for reply_to in (reg.gone_requesters() if reg is not None else []):
            for rid in [r for r, p in {**self._reserving, **self._pending}.items() if p.req.reply_to == reply_to]:
                self._abort(rid)
                self.metrics["aborted_orphans"] += 1
            self.chunks.forget(reply_to)

    def _drop_refused(self) -> None:
        """A decode worker that gave up on a request before its prompt was done (the requester aborted
        there, its reservation timed out) sent Ack(not ok): stop computing it here."""
        for rid, p in list(self._pending.items()):
            reason = p.transfer.refused() if p.transfer is not None else None
            if reason is not None:
                self.chunks.error(p.req.reply_to, rid, p.req.attempt, f"decode worker: {reason}",
                                  code="unavailable", blame=p.req.decode.worker_id)
                self._abort(rid)
                self.metrics["dropped_refused"] += 1

    def _abort(self, request_id: str) -> None:
        r = self._reserving.pop(request_id, None)
        if r is not None:
            r.transfer.abort("aborted by the requester")
        p = self._pending.pop(request_id, None)
        self.engine.abort_request(request_id)
        if p is not None and p.transfer is not None:
            p.transfer.abort("aborted by the requester")  # frees the pinned pages, tells D

    # ---- the step ------------------------------------------------------------------------------
    def _pin_and_stream(self, out) -> bytes:
        """The connector's scheduler side, before the step runs: for each prompt it completes, pin its
        pages (they must outlive the sequence until D acks) and name them in the step's ShipPlan for
        every rank's connector, which ships each layer as soon as it is computed."""
        ships = []
        bm = self.engine.block_manager
        for s in out.scheduled:
            p = self._pending.get(s.seq.request_id)
            if p is None or p.transfer is None or not s.sample or p.holder is not None:
                continue
            p.holder = holder = bm.hold(s.seq)
            p.transfer.release_with(lambda h=holder: bm.free(h))
            t = p.transfer
            ships.append(ShipItem(s.seq.seq_id, t.request_id, t.attempt, p.req.decode.layout, t.endpoints,
                                  holder.block_ids[t.held:len(t.dst_block_ids)], t.dst_block_ids[t.held:]))
        return encode_plan(ShipPlan(self.kv_path, ships)) if ships else b""

    def _step(self) -> None:
        outputs = self.engine.step(plan_kv=self._pin_and_stream)
        for ro in outputs:
            p = self._pending.get(ro.request_id)
            if p is None:
                continue
            if p.transfer is None:  # colocated: stream everything from here
                now = time.monotonic()
                if not p.first_at:
                    p.first_at = now
                    self.heartbeat.slo.record("ttft", now - p.arrived, p.req.slo_ttft_ms, now)
                for chunk in output_chunks(ro, p.req.attempt, self._first_index, self.worker_id):
                    self.chunks.send(p.req.reply_to, chunk)
                if ro.finished:
                    self._pending.pop(ro.request_id)
                    n = self._first_index.pop((ro.request_id, 0), 0)
                    if n > 1:
                        self.heartbeat.slo.record("tpot", (now - p.first_at) / (n - 1), p.req.slo_tpot_ms, now)
                continue
            self._first_token(p, ro)

    def _first_token(self, p: _Pending, ro) -> None:
        rid = ro.request_id
        self._pending.pop(rid)
        co = ro.outputs[0]
        first = co.token_ids[0]
        # finished at the first token by the request's own terms (not P's max_tokens = 1)?
        done_here = co.finish_reason == "stop" or (p.params.max_tokens is not None and p.params.max_tokens <= 1)
        reason = co.finish_reason if done_here else None
        lps = wire_logprobs(co.logprobs)
        # P's run ends at the first token, the request does not: hold back what a stop string could
        # still start with, as a continuing sequence would; D emits it (or cuts it at the stop)
        hold = 0 if done_here or not p.params.stop else min(len(co.text), max(map(len, p.params.stop)) - 1)
        text, held_text = co.text[:len(co.text) - hold], co.text[len(co.text) - hold:]
        t = p.transfer
        shipped = len(p.req.prompt_token_ids) - min(t.held * self.layout.block_size, len(p.req.prompt_token_ids)) \
            if t.dst_block_ids else -1  # not reserved yet: not known
        self.chunks.send(p.req.reply_to, TokenChunk(VERSION, rid, p.req.attempt, 0, co.token_ids, text, lps,
                                                    reason, "", self.worker_id, cached_tokens=ro.num_cached_tokens,
                                                    kv_tokens=shipped,
                                                    prompt_logprobs=wire_logprobs(ro.prompt_logprobs)))
        now = time.monotonic()
        self.heartbeat.slo.record("ttft", now - p.arrived, p.req.slo_ttft_ms, now)
        if done_here:  # D holds the prompt's KV (landed, or landing): tell it to free it now
            p.transfer.abort("finished at the first token")
            self._send_decode(p.req.decode.endpoint, Abort(VERSION, rid, p.req.attempt))
            return
        self._send_decode(p.req.decode.endpoint, Handoff(
            VERSION, rid, p.req.attempt, p.req.prompt_token_ids, first, p.req.params, p.req.reply_to,
            held_tokens=p.req.held_tokens, slo_tpot_ms=p.req.slo_tpot_ms, held_text=held_text))
        self._shipping.append(p.transfer)
        self.metrics["handed_off"] += 1

    def _send_decode(self, endpoint: str, msg) -> None:
        s = self._decode_socks.get(endpoint)
        try:
            if s is None:
                s = security.client(self.ctx.socket(zmq.PUSH))
                s.setsockopt(zmq.LINGER, 0)
                s.setsockopt(zmq.SNDHWM, 10000)
                self._decode_socks[endpoint] = s
                s.connect(endpoint)
            s.send(encode(msg), zmq.NOBLOCK)
        except zmq.ZMQError as e:  # a malformed endpoint or a full queue: the requester's timeout moves it
            log.warning("decode worker %s: %s not sent (%s)", endpoint, type(msg).__name__, e)
