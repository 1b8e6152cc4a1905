"""How a sender rank's pages travel: one data path per KVClient, picked from the worker's transport.

    FramesPath  pages as ZeroMQ frames on the control connection (the default; zero-copy views of a
                CPU cache, a staged host copy of anything else)
    StreamPath  pages on each receiver's raw TCP page stream ("tcp"), frames for a receiver with none
    DistPath    one gathered tensor per message through a torch.distributed pair group ("gloo" |
                "nccl"), frames for a receiver on another transport

Every path hands its sends to the client's I/O thread or its own writer threads: `send` never waits
on the network. A path that cannot serve a receiver says so (`send` returns False) and the client
falls back to frames, which every receiver takes.
"""

from __future__ import annotations

import logging
import time
import uuid

import msgspec
import numpy as np
import torch
import zmq

from kvtransfer.frames import CacheFrames, host_frames
from kvtransfer.pages import to_bytes_view
from kvtransfer.protocol import VERSION, Pages, PairHello, encode
from kvtransfer.stream import StreamPeers

log = logging.getLogger(__name__)

PAIR_HANDSHAKE_S = 5.0  # a sender's wait for PairInfo (a live receiver's I/O thread answers at once)
PAIR_RETRY_S = 5.0  # after a failed pairing, sends to that receiver fail at once for this long


def _needs_staging(stage_frames: bool, payload: list) -> bool:
    return stage_frames or any(isinstance(t, torch.Tensor) and t.device.type != "cpu" for t in payload)


class FramesPath:
    """Pages as ZeroMQ frames, queued to the client's I/O thread."""

    gathers = False  # takes runs of blocks as views; no gather per message

    def __init__(self, client, stage_frames: bool = False):
        """`stage_frames`: copy CPU payloads into a host buffer too, as GPU ones always are (tests)."""
        self.client, self.stage_frames = client, stage_frames
        self._cache_frames = CacheFrames.make()

    def connect(self, endpoint: str, timeout: float = PAIR_HANDSHAKE_S) -> None:
        pass

    def send(self, endpoint: str, header: Pages, payload: torch.Tensor | list, cache: list[np.ndarray] | None) -> bool:
        c, head = self.client, encode(header)
        payload = payload if isinstance(payload, list) else [payload]
        if cache is not None and self._cache_frames is not None and not self.stage_frames:
            self._cache_frames.keep(cache)
            views = [to_bytes_view(t) for t in payload]
            c.submit(lambda: self._send_cache_pages(endpoint, head, views, header.nbytes))
            return True
        staged = _needs_staging(self.stage_frames, payload)
        frames, ready = host_frames(payload, staged)
        c.metrics["messages_staged"] += staged
        c.submit(lambda: self._send_pages(endpoint, head, frames, header.nbytes, ready))
        return True

    def flush(self, timeout: float) -> None:
        pass

    def close(self) -> None:
        """After the client's context has terminated (libzmq holds no frame of ours any more)."""
        if self._cache_frames is not None:
            self._cache_frames.kept.clear()

    # -- I/O thread ------------------------------------------------------------------------------
    def _send_pages(self, endpoint, head, data: list, nbytes, ready=None):
        if ready is not None:
            ready.synchronize()
        self.client._sock(endpoint).send_multipart([head, *data], copy=False)
        self.client.metrics["frames_sent"] += 1
        self.client.metrics["bytes_sent"] += nbytes

    def _send_cache_pages(self, endpoint, head, data: list, nbytes):
        c = self.client
        sock = c._sock(endpoint)
        try:
            self._cache_frames.send(sock, head, data)
        except zmq.ZMQError:  # a message left half sent would swallow the next one: a fresh socket
            c.drop_sock(endpoint)
            raise
        c.metrics["frames_sent"] += 1
        c.metrics["messages_cache_frames"] += 1
        c.metrics["bytes_sent"] += nbytes


class StreamPath:
    """Pages on each receiver's page stream (kvtransfer/stream.py), asked for on first use."""

    gathers = False

    def __init__(self, client, timeout: float, stage_frames: bool = False):
        self.client, self.stage_frames = client, stage_frames
        self.streams = StreamPeers(client.ask_stream, client.metrics, timeout)

    def connect(self, endpoint: str, timeout: float = PAIR_HANDSHAKE_S) -> None:
        pass

    def send(self, endpoint: str, header: Pages, payload: torch.Tensor | list, cache) -> bool:
        stream = self.streams.get(endpoint)
        if stream is None:
            return False
        payload = payload if isinstance(payload, list) else [payload]
        staged = _needs_staging(self.stage_frames, payload)
        frames, ready = host_frames(payload, staged)
        self.client.metrics["messages_staged"] += staged
        stream.send(encode(header), frames, header.nbytes, ready)
        return True

    def flush(self, timeout: float) -> None:
        self.streams.flush(timeout)

    def close(self) -> None:
        """What is queued on the streams is written first, within a bound."""
        self.streams.close()


class DistPath:
    """One tensor per message through a torch.distributed pair group with the receiver (joined on first
    use, by a PairHello/PairInfo round trip on the control connection); the header goes as a frame."""

    gathers = True  # one gathered tensor per message (and layer)

    def __init__(self, client, pairs):
        """`pairs`: the rank's kvtransfer.dist_transport.PairClient."""
        self.client, self.pairs = client, pairs
        self._pair_ids: dict[str, str] = {}
        self._pair_failed: dict[str, float] = {}  # endpoint -> when pairing with it last failed
        self._frames_only: set[str] = set()  # receivers on another transport: ZeroMQ frames for them

    def connect(self, endpoint: str, timeout: float = PAIR_HANDSHAKE_S) -> None:
        """Joins the pair group with `endpoint` (once; blocking). A receiver without this backend gets
        frames. Raises when pairing fails, and at once for PAIR_RETRY_S after (a dead receiver must not
        stall every prefill that ships to it)."""
        if self.pairs.has(endpoint) or endpoint in self._frames_only:
            return
        failed = self._pair_failed.get(endpoint)
        if failed is not None and time.monotonic() - failed < PAIR_RETRY_S:
            raise ConnectionError(f"pairing with {endpoint} failed {time.monotonic() - failed:.1f} s ago")
        c, pair = self.client, f"{uuid.uuid4().hex[:12]}-{self.client.rank}"
        wait = min(timeout, self.pairs.timeout)
        try:
            info = c.round_trip(endpoint, encode(PairHello(VERSION, pair)), "pair", pair, wait)
            if info is None:
                raise TimeoutError(f"no PairInfo from {endpoint} within {wait} s")
            if info.backend == self.pairs.backend:
                self.pairs.join(endpoint, pair, info.host, info.port)
        except Exception:
            self._pair_failed[endpoint] = time.monotonic()
            raise
        if info.backend != self.pairs.backend:
            log.warning("KV receiver %s uses %s, not %s: sending it ZeroMQ frames", endpoint,
                        info.backend or "ZeroMQ frames", self.pairs.backend)
            self._frames_only.add(endpoint)
            return
        self._pair_failed.pop(endpoint, None)
        self._pair_ids[endpoint] = pair

    def send(self, endpoint: str, header: Pages, payload: torch.Tensor | list, cache) -> bool:
        if isinstance(payload, list):
            return False
        self.connect(endpoint)
        if endpoint in self._frames_only:
            return False
        tag, pair = self.pairs.next_tag(endpoint), self._pair_ids[endpoint]
        head = encode(msgspec.structs.replace(header, pair=pair, tag=tag))
        self.client.submit(lambda: self._send(endpoint, pair, head, payload, tag, header.nbytes))
        return True

    def flush(self, timeout: float) -> None:
        pass

    def close(self) -> None:
        pass

    def _send(self, endpoint, pair, head, payload, tag, nbytes):  # I/O thread
        c = self.client
        if not self.pairs.has(endpoint) or self._pair_ids.get(endpoint) != pair:  # its group failed since
            c.metrics["dist_send_dropped"] += 1  # (no header: the receiver would wait for the payload)
            return
        c._sock(endpoint).send(head)
        try:
            self.pairs.send(endpoint, payload, tag)
        except Exception:  # a dead or broken peer: its group is of no more use; pair anew on next use
            self.pairs.drop(endpoint)
            c.metrics["dist_send_failed"] += 1
            raise
        c.metrics["frames_sent"] += 1
        c.metrics["bytes_sent"] += nbytes
