"""KV transfer over ZeroMQ: a ROUTER server per destination rank, DEALER clients on the sender ranks.

Each socket belongs to one I/O thread; callers hand work over through a queue and a wake-up pipe, so
the model loop never blocks on the network. Payloads go as separate frames, zero-copy on send
(`copy=False`) and read in place on receive. Every wait has a timeout; every server socket has a
maximum message size; a malformed message is counted and dropped.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout

import numpy as np
import torch
import zmq

from common import security
from kvtransfer.frames import Staged
from kvtransfer.io_thread import IOThread
from kvtransfer.paths import PAIR_HANDSHAKE_S, DistPath, FramesPath, StreamPath
from kvtransfer.plan import KVLayout
from kvtransfer.protocol import (
    VERSION,
    Abort,
    Ack,
    Cancel,
    Cancelled,
    Expect,
    ExpectOk,
    MessageError,
    Pages,
    PairHello,
    PairInfo,
    RankDone,
    Reserve,
    Reserved,
    StreamHello,
    StreamInfo,
    decode,
    encode,
)
from kvtransfer.receiver import Landed, RankReceiver
from kvtransfer.reservations import Reservations
from kvtransfer.stream import StreamServer

log = logging.getLogger(__name__)

MAX_MSG_BYTES = 1 << 30


class KVServer(IOThread):
    """The KV endpoint of one destination rank. The driver rank's server also takes reservations."""

    def __init__(self, endpoint: str, receiver: RankReceiver, reservations: Reservations | None = None,
                 max_msg_bytes: int = MAX_MSG_BYTES, metrics: Counter | None = None,
                 dist_backend: str | None = None, device: str = "cpu", dist_timeout: float = 30.0,
                 stream: bool = False):
        """`dist_backend` ("gloo" | "nccl"): payloads come through torch.distributed pair groups.
        `stream`: offer senders a page stream (the "tcp" transport, kvtransfer/stream.py; not with
        CURVE on, whose encryption the stream would bypass); `dist_timeout` bounds a stalled
        message on it too."""
        super().__init__(f"kv-server-{receiver.rank}")
        self.receiver = receiver
        self.reservations = reservations
        self.metrics = metrics if metrics is not None else receiver.metrics
        self.sock = security.server(self.ctx.socket(zmq.ROUTER))
        self.sock.setsockopt(zmq.MAXMSGSIZE, max_msg_bytes)
        self.sock.setsockopt(zmq.LINGER, 0)
        if endpoint.endswith(":0"):
            port = self.sock.bind_to_random_port(endpoint.rsplit(":", 1)[0])
            endpoint = f"{endpoint.rsplit(':', 1)[0]}:{port}"
        else:
            self.sock.bind(endpoint)
        self.endpoint = endpoint
        self.poller.register(self.sock, zmq.POLLIN)
        self.pairs = None
        self.dist_timeout = dist_timeout
        if dist_backend is not None:
            from kvtransfer.dist_transport import PairHost
            host = endpoint.split("://", 1)[1].rsplit(":", 1)[0] if endpoint.startswith("tcp://") else "127.0.0.1"
            self.pairs = PairHost(host, dist_backend, dist_timeout, device)
        self.streams = None
        if stream and security.enabled():
            log.info("CURVE is on: KV pages stay on ZeroMQ (a page stream would not be encrypted)")
        elif stream:
            self.streams = StreamServer(endpoint, receiver, self.metrics, dist_timeout, max_msg_bytes)
            # stream readers finish transfers too: what follows (reservations, acks, reports to the
            # driver, the ZeroMQ sockets they use) runs on this I/O thread, as for ZeroMQ frames
            done = receiver.on_done
            receiver.on_done = lambda *a: done(*a) if self.on_io_thread() else self.submit(lambda: done(*a))
        if reservations is not None:
            reservations.send_ack = self.send_ack

    def send_ack(self, identity: bytes, ack: Ack) -> None:
        if self.on_io_thread():  # the last frame just landed (the usual case): no trip through the queue
            self.sock.send_multipart([identity, encode(ack)])
        else:
            self.submit(lambda: self.sock.send_multipart([identity, encode(ack)]))

    def on_readable(self, sock) -> None:
        for _ in range(64):  # drain a burst, then let the loop tick
            try:
                identity = sock.recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                frames = self._receive(sock, identity)
            finally:  # whatever happened, the next recv starts a new message
                while sock.getsockopt(zmq.RCVMORE):
                    sock.recv(copy=False)
                    self.metrics["frames_dropped"] += 1
            if frames is not None:
                self._handle(frames)

    def _receive(self, sock, identity) -> list | None:
        """The rest of one message (its parts are all here: ZeroMQ delivers messages whole). Pages are
        received where `RankReceiver.landing` says: straight into the cache blocks reserved for them
        (whole blocks, a CPU cache: recv_into, no receive buffer to allocate and fault in, no copy) or
        into a host staging buffer (a GPU cache); returns None then, else the frames for `_handle`."""
        if not sock.getsockopt(zmq.RCVMORE):
            return [identity]
        head = sock.recv(copy=False)
        if not sock.getsockopt(zmq.RCVMORE):
            return [identity, head]
        try:
            msg = decode(head.buffer)
        except MessageError:
            msg = None
        views = self.receiver.landing(msg) if isinstance(msg, Pages) and not msg.pair else None
        if views is None:
            return [identity, head, *sock.recv_multipart(copy=False)]
        try:
            sizes = [sock.recv_into(v) if sock.getsockopt(zmq.RCVMORE) else 0 for v in views]
            landed = Landed(sizes, bool(sock.getsockopt(zmq.RCVMORE)), views if isinstance(views, Staged) else None)
        except BaseException:  # on_pages is not reached: the request is no longer being written
            self.receiver.abandon_landing()
            raise
        self.receiver.on_pages(msg, landed)
        return None

    def _handle(self, frames) -> None:
        if len(frames) < 2:
            self.metrics["messages_bad"] += 1
            return
        identity = frames[0].bytes
        try:
            msg = decode(frames[1].buffer)
        except MessageError as e:
            self.metrics["messages_bad"] += 1
            log.debug("dropped a malformed KV message: %s", e)
            return
        if isinstance(msg, Pages):
            payload = self._recv_dist(msg) if msg.pair else [f.buffer for f in frames[2:]]
            self.receiver.on_pages(msg, payload)
        elif isinstance(msg, PairHello) and self.pairs is None:  # "send me ZeroMQ frames instead"
            self.sock.send_multipart([identity, encode(PairInfo(VERSION, msg.pair, "", 0, ""))])
        elif isinstance(msg, PairHello):
            self.sock.send_multipart([identity, encode(PairInfo(VERSION, msg.pair, self.pairs.host, self.pairs.port,
                                                                self.pairs.backend))])
            self.pairs.accept(msg.pair)
        elif isinstance(msg, StreamHello):
            info = StreamInfo(VERSION, msg.nonce, self.streams.address, self.streams.token) if self.streams \
                else StreamInfo(VERSION, msg.nonce, "")
            self.sock.send_multipart([identity, encode(info)])
        elif isinstance(msg, Reserve) and self.reservations is not None:
            reply = self.reservations.on_reserve(identity, msg)
            self.sock.send_multipart([identity, encode(reply)])
        elif isinstance(msg, Abort) and self.reservations is not None:
            self.reservations.on_abort(msg.request_id, msg.attempt, msg.reason)
        elif isinstance(msg, RankDone) and self.reservations is not None:
            self.reservations.on_rank_done(msg.request_id, msg.attempt, msg.rank, msg.ok, msg.reason)
        elif isinstance(msg, Expect) and self.reservations is None:
            self.receiver.expect(msg.request_id, msg.attempt, msg.block_ids, KVLayout.from_spec(msg.layout),
                                 time.monotonic() + msg.timeout_s)
            self.sock.send_multipart([identity, encode(ExpectOk(VERSION, msg.request_id, msg.attempt))])
        elif isinstance(msg, Cancel) and self.reservations is None:
            self.receiver.cancel(msg.request_id, msg.attempt)  # (a stream's write in progress: revoked)
            self.sock.send_multipart([identity, encode(Cancelled(VERSION, msg.request_id, msg.attempt))])
        else:
            self.metrics["messages_unexpected"] += 1

    def _recv_dist(self, msg: Pages):
        if self.pairs is None:
            return None
        from kvtransfer.pages import TORCH_DTYPES
        try:
            buf = self.pairs.recv(msg.pair, msg.tag, TORCH_DTYPES[msg.dtype], msg.shape, self.dist_timeout)
            self.metrics["frames_via_dist"] += buf is not None
            return buf
        except RuntimeError as e:  # the peer died or the group timed out
            self.metrics["dist_recv_failed"] += 1
            log.warning("KV payload of %s via %s failed: %s", msg.request_id, msg.pair, e)
            return None

    def on_tick(self) -> None:
        now = time.monotonic()
        self.receiver.expire(now)
        if self.reservations is not None:
            self.reservations.expire(now)

    def close_sockets(self) -> None:
        if self.streams is not None:
            self.streams.stop()
        self.sock.close(0)


class FollowerLink:
    """A non-driver decode rank's line to its driver: RankDone reports go out from the rank's own KV
    server thread (RankReceiver calls `report` on that thread, or on a stream's reader thread, whose
    report is handed over to it)."""

    def __init__(self, server: KVServer, driver_endpoint: str):
        self.server = server
        self.sock = security.client(server.ctx.socket(zmq.DEALER))
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(driver_endpoint)

    def report(self, request_id: str, attempt: int, rank: int, ok: bool, reason: str) -> None:
        msg = encode(RankDone(VERSION, request_id, attempt, rank, ok, reason))
        if self.server.on_io_thread():
            self.sock.send(msg)
        else:
            self.server.submit(lambda: self.sock.send(msg))


class RemoteRank:
    """The decode driver's stand-in for another rank's RankReceiver (used by Reservations, from the
    driver's KV server thread or the engine loop's aborts: one lock for the socket). `expect` waits
    (bounded) for the rank's confirmation, so no frame can reach the rank before it knows the request;
    `cancel` waits (bounded) until the rank writes nothing of the request any more, so its blocks may
    be freed."""

    def __init__(self, rank: int, endpoint: str, ctx: zmq.Context | None = None, timeout: float = 5.0):
        """`timeout` bounds `expect`; `cancel` waits twice that, longer than the rank itself waits for a
        write in progress (RankReceiver.cancel's 5 s), so the driver never gives up first."""
        self.rank = rank
        self.timeout = timeout
        self.sock = security.client((ctx or zmq.Context.instance()).socket(zmq.DEALER))
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self._lock = threading.Lock()

    def expect(self, request_id, attempt, block_ids, src_layout, deadline) -> None:
        msg = Expect(VERSION, request_id, attempt, list(block_ids), src_layout,
                     max(0.0, deadline - time.monotonic()))
        if not self._round_trip(msg, ExpectOk, self.timeout):
            raise TimeoutError(f"decode rank {self.rank} did not confirm {request_id} within {self.timeout} s")

    def cancel(self, request_id, attempt) -> None:
        if not self._round_trip(Cancel(VERSION, request_id, attempt), Cancelled, 2 * self.timeout):
            log.error("decode rank %d did not confirm the cancel of %s within %.0f s (is it alive?); its blocks "
                      "are freed anyway", self.rank, request_id, 2 * self.timeout)

    def _round_trip(self, msg, reply_type, timeout: float) -> bool:
        """Sends `msg`, waits for the `reply_type` of the same (request, attempt); other replies (late
        ones of earlier round trips) are skipped."""
        with self._lock:
            self.sock.send(encode(msg))
            end = time.monotonic() + timeout
            while time.monotonic() < end:
                if not self.sock.poll(max(1, int((end - time.monotonic()) * 1000))):
                    break
                try:
                    reply = decode(self.sock.recv())
                except MessageError:
                    continue
                if isinstance(reply, reply_type) and reply.request_id == msg.request_id and \
                        reply.attempt == msg.attempt:
                    return True
            return False

    def close(self) -> None:
        self.sock.close(0)


class KVClient(IOThread):
    """The sending side of one source rank: reservations (driver), pages, acknowledgements. Pages take
    the client's data path (kvtransfer/paths.py), frames where that path cannot reach a receiver."""

    def __init__(self, rank: int, metrics: Counter | None = None, sndhwm: int = 0,
                 dist_backend: str | None = None, device: str = "cpu", dist_timeout: float = 30.0,
                 stage_frames: bool = False, stream: bool = False):
        """`dist_backend` ("gloo" | "nccl"): payloads go through torch.distributed pair groups.
        `stage_frames`: copy CPU payloads into a host buffer too, as GPU ones always are (tests).
        `stream`: pages go on each receiver's page stream when it offers one (the "tcp" transport,
        kvtransfer/stream.py); `dist_timeout` bounds a stalled pairing or stream write."""
        super().__init__(f"kv-client-{rank}")
        if dist_backend is not None and stream:
            raise ValueError("one data path: torch.distributed pair groups or page streams, not both")
        self.ctx = zmq.Context()  # its own (see close_sockets)
        self.rank = rank
        self.metrics = metrics if metrics is not None else Counter()
        self.sndhwm = sndhwm
        self._socks: dict[str, zmq.Socket] = {}
        self._waiting: dict[tuple[str, str, int], Future] = {}  # (kind, request_id, attempt)
        self._lock = threading.Lock()
        self.frames = FramesPath(self, stage_frames)
        self.path = self.frames
        if dist_backend is not None:
            from kvtransfer.dist_transport import PairClient
            self.path = DistPath(self, PairClient(dist_backend, dist_timeout, device))
        elif stream:
            self.path = StreamPath(self, dist_timeout, stage_frames)

    # -- API (any thread) ------------------------------------------------------------------------
    def reserve(self, endpoint: str, request_id: str, attempt: int, num_tokens: int, layout: KVLayout,
                timeout: float = 5.0, block_hashes: list[int] = (), hash_root: int = 0,
                wait_s: float = 0.0) -> Reserved:
        fut = self.reserve_async(endpoint, request_id, attempt, num_tokens, layout, block_hashes, hash_root, wait_s)
        try:
            return fut.result(timeout)
        except FutureTimeout:
            self.forget_reserve(request_id, attempt)
            return Reserved(VERSION, request_id, attempt, False, [], f"no answer within {timeout} s")

    def reserve_async(self, endpoint: str, request_id: str, attempt: int, num_tokens: int,
                      layout: KVLayout, block_hashes: list[int] = (), hash_root: int = 0,
                      wait_s: float = 0.0) -> Future:
        """Sends a Reserve; the future gets the Reserved reply (the caller keeps the deadline)."""
        fut = self._expect("reserved", request_id, attempt)
        msg = Reserve(VERSION, request_id, attempt, num_tokens, layout, block_hashes=list(block_hashes),
                      hash_root=hash_root, wait_s=wait_s)
        self.submit(lambda: self._sock(endpoint).send(encode(msg)))
        return fut

    def forget_reserve(self, request_id: str, attempt: int) -> None:
        self._forget("reserved", request_id, attempt)

    def expect_ack(self, request_id: str, attempt: int) -> Future:
        """A future for the receiver's Ack (register before the last frame is sent)."""
        return self._expect("ack", request_id, attempt)

    def connect(self, endpoint: str, timeout: float = PAIR_HANDSHAKE_S) -> None:
        """Whatever the data path needs before the first page (a torch.distributed pair group: blocking,
        raises when pairing fails); nothing for the others."""
        self.path.connect(endpoint, timeout)

    def send_pages(self, endpoint: str, header: Pages, payload: torch.Tensor | list,
                   cache: list[np.ndarray] | None = None) -> None:
        """Queues one message of pages: a list payload (runs of blocks, or one gathered tensor per layer
        of a multi-layer message) or one gathered tensor (`path.gathers`). `cache`: the payload is views
        into these cache arrays (kept alive while libzmq may read them: `CacheFrames`)."""
        if not self.path.send(endpoint, header, payload, cache):
            self.frames.send(endpoint, header, payload, cache)

    def round_trip(self, endpoint: str, msg: bytes, kind: str, key: str, timeout: float):
        """Sends an encoded handshake (PairHello, StreamHello) and waits for its `kind` reply keyed by
        `key` (pair, nonce); None when none came in time."""
        fut = self._expect(kind, key, 0)
        self.submit(lambda: self._sock(endpoint).send(msg))
        try:
            return fut.result(timeout)
        except FutureTimeout:
            self._forget(kind, key, 0)
            return None

    def abort(self, endpoint: str, request_id: str, attempt: int, reason: str = "") -> None:
        msg = encode(Abort(VERSION, request_id, attempt, reason))
        self.submit(lambda: self._sock(endpoint).send(msg))

    def flush(self, timeout: float = 5.0) -> None:
        """Returns once every page queued before the call has been handed to ZeroMQ (or written to
        its stream)."""
        done = threading.Event()
        self.submit(done.set)
        done.wait(timeout)
        self.path.flush(timeout)

    def ask_stream(self, endpoint: str, timeout: float) -> StreamInfo | None:
        """The StreamHello round trip to `endpoint` (for StreamPeers); None: no answer in time."""
        nonce = uuid.uuid4().hex
        return self.round_trip(endpoint, encode(StreamHello(VERSION, nonce)), "stream", nonce, timeout)

    # -- I/O thread ------------------------------------------------------------------------------
    def drop_sock(self, endpoint: str) -> None:
        """Closes `endpoint`'s socket (a message left half sent on it would swallow the next one)."""
        sock = self._socks.pop(endpoint)
        self.poller.unregister(sock)
        sock.close(0)

    def _sock(self, endpoint: str) -> zmq.Socket:
        s = self._socks.get(endpoint)
        if s is None:
            s = security.client(self.ctx.socket(zmq.DEALER))
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.SNDHWM, self.sndhwm)
            s.connect(endpoint)
            self.poller.register(s, zmq.POLLIN)
            self._socks[endpoint] = s
        return s

    def on_readable(self, sock) -> None:
        while True:
            try:
                data = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                msg = decode(data)
            except MessageError:
                self.metrics["messages_bad"] += 1
                continue
            if isinstance(msg, PairInfo):
                fut = self._forget("pair", msg.pair, 0)
            elif isinstance(msg, StreamInfo):
                fut = self._forget("stream", msg.nonce, 0)
            else:
                kind = "reserved" if isinstance(msg, Reserved) else "ack" if isinstance(msg, Ack) else None
                fut = self._forget(kind, msg.request_id, msg.attempt) if kind else None
            if fut is None:
                self.metrics["replies_unmatched"] += 1
            elif not fut.done():
                fut.set_result(msg)

    def close_sockets(self) -> None:
        if self.path is not self.frames:
            self.path.close()
        for s in self._socks.values():
            s.close(0)
        self._socks.clear()
        # the context is this client's own: once it has terminated, libzmq holds no frame of ours, and
        # the cache arrays that `CacheFrames` frames point into may go
        self.ctx.term()
        self.frames.close()

    def _expect(self, kind, request_id, attempt) -> Future:
        fut: Future = Future()
        with self._lock:
            self._waiting[(kind, request_id, attempt)] = fut
        return fut

    def _forget(self, kind, request_id, attempt) -> Future | None:
        with self._lock:
            return self._waiting.pop((kind, request_id, attempt), None)
