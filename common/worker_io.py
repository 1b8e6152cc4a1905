"""Plumbing shared by prefill, decode and colocated workers (torch-free): sockets, chunk streaming."""

from __future__ import annotations

import logging

import msgspec
import zmq

from common import security
from common.messages import VERSION, MessageError, TokenChunk, decode_worker_message, encode

log = logging.getLogger(__name__)


MAX_REQUEST_BYTES = 64 << 20


def request_socket(ctx: zmq.Context, host: str, port: int = 0) -> tuple[zmq.Socket, str]:
    """A worker's PULL socket for requests (port 0: any free one), with a message size limit."""
    sock = security.server(ctx.socket(zmq.PULL))
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_REQUEST_BYTES)
    if port:
        sock.bind(f"tcp://{host}:{port}")
    else:
        port = sock.bind_to_random_port(f"tcp://{host}")
    return sock, f"tcp://{host}:{port}"


class ChunkSender:
    """PUSH sockets to requesters' reply endpoints, opened on first use (bounded queue, no linger)."""

    def __init__(self, ctx: zmq.Context, worker_id: str, sndhwm: int = 10000):
        self.ctx, self.worker_id, self.sndhwm = ctx, worker_id, sndhwm
        self._socks: dict[str, zmq.Socket] = {}

    def send(self, reply_to: str, chunk: TokenChunk) -> None:
        s = self._socks.get(reply_to)
        try:
            if s is None:
                s = security.client(self.ctx.socket(zmq.PUSH))
                s.setsockopt(zmq.LINGER, 0)
                s.setsockopt(zmq.SNDHWM, self.sndhwm)
                self._socks[reply_to] = s
                s.connect(reply_to)  # raises on a malformed address: that request's chunks go nowhere
            s.send(encode(chunk), zmq.NOBLOCK)
        except zmq.Again:  # the requester is not reading: it will time out and retry elsewhere
            log.warning("reply queue to %s is full; dropped a chunk of %s", reply_to, chunk.request_id)
        except zmq.ZMQError as e:
            log.warning("reply address %r of %s: %s", reply_to, chunk.request_id, e)

    def forget(self, reply_to: str) -> None:
        """Closes the socket to a requester that is gone (its queued chunks with it)."""
        s = self._socks.pop(reply_to, None)
        if s is not None:
            s.close(0)

    def error(self, reply_to: str, request_id: str, attempt: int, message: str, index: int = 0,
              code: str = "invalid", blame: str = "") -> None:
        self.send(reply_to, TokenChunk(VERSION, request_id, attempt, index, [], "", None, "error", message,
                                       self.worker_id, code, blame))

    def close(self) -> None:
        for s in self._socks.values():
            s.close(0)


def wire_logprobs(lps) -> list[tuple[float, list[tuple[int, float]]] | None] | None:
    """An engine output's TokenLogprobs (None entries kept) as TokenChunk carries them."""
    return None if lps is None else [None if lp is None else (lp.logprob, lp.top) for lp in lps]


def output_chunks(ro, attempt: int, first_index: dict, worker_id: str) -> list[TokenChunk]:
    """TokenChunks for an engine RequestOutput (one per sample index; the index dedupes). The prompt's
    logprobs go on sample 0's first chunk (index 0), where the engine reports them."""
    chunks = []
    for co in ro.outputs:
        key = (ro.request_id, co.index)
        idx = first_index.get(key, 0)
        lps = wire_logprobs(co.logprobs)
        first = {"cached_tokens": ro.num_cached_tokens, "kv_tokens": 0} if idx == 0 else {}
        if idx == 0 and co.index == 0 and ro.prompt_logprobs is not None:
            first["prompt_logprobs"] = wire_logprobs(ro.prompt_logprobs)
        chunks.append(TokenChunk(VERSION, ro.request_id, attempt, idx, co.token_ids, co.text, lps,
                                 co.finish_reason, "", worker_id, **first))
        first_index[key] = idx + len(co.token_ids)
    return chunks


def drain_requests(sock: zmq.Socket, timeout_ms: int, handle, metrics, burst: int = 256,
                   chunks: ChunkSender | None = None) -> None:
    """Waits up to `timeout_ms` for worker messages, then hands each decoded one to `handle`
    (a burst at most); malformed ones are counted in metrics["messages_bad"] and dropped, and when
    they still say who is waiting (`chunks`: answer them), that requester gets an error chunk at once
    instead of waiting out its timeout (another protocol version after an upgrade, a bug)."""
    if not sock.poll(timeout_ms):
        return
    for _ in range(burst):
        try:
            data = sock.recv(zmq.NOBLOCK)
        except zmq.Again:
            return
        try:
            msg = decode_worker_message(data)
        except MessageError as e:
            metrics["messages_bad"] += 1
            log.debug("dropped: %s", e)
            if chunks is not None:
                _answer_malformed(chunks, data, e)
            continue
        handle(msg)


def _answer_malformed(chunks: ChunkSender, data: bytes, err: MessageError) -> None:
    try:
        d = msgspec.msgpack.decode(data)
    except msgspec.DecodeError:
        return  # not even MessagePack: nobody to answer
    if not isinstance(d, dict):
        return
    rid, attempt, reply_to = d.get("request_id"), d.get("attempt"), d.get("reply_to")
    if isinstance(rid, str) and isinstance(attempt, int) and isinstance(reply_to, str) and \
            reply_to.startswith("tcp://"):
        # "unavailable", blamed on this worker: the requester places the request elsewhere
        chunks.error(reply_to, rid, attempt, f"worker {chunks.worker_id} cannot read the request: {err}",
                     index=1 if d.get("type") == "handoff" else 0, code="unavailable", blame=chunks.worker_id)
