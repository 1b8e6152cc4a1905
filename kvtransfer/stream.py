"""The "tcp" transport's data path: page bytes over a plain stream socket, straight into the cache.

ZeroMQ still carries every control message (reserve, acks, aborts, the handshake below); only `Pages`
messages (header and payload) take one TCP connection per (sender rank, receiver rank), or a Unix
socket when the receiver's endpoint is ipc://. The receiver reads each header, asks its
`RankReceiver` where the payload lands (`landing`: the cache blocks reserved for it, or a staging
buffer), and receives it there, 32 KiB a read (`_recv_exact`): the kernel's copy out of the socket
is the only pass over the bytes on this side. ZeroMQ receives
every message into buffers of its own (allocated per message) and then needs the copy into the blocks
too; on 2 cores that competes with both ends' I/O threads (docs/benchmarks.md: over loopback the tcp
transfer, protocol included, runs at 0.80-1.00 of raw pyzmq's look-only sink at 16 MiB and ~1.2 at
256 MiB, ZeroMQ frames at ~0.6 and ~0.8).

Handshake (over ZeroMQ): the sender rank sends `StreamHello`; the receiver answers `StreamInfo` with
its stream's address and a random 16-byte token, or an empty address (no stream: send ZeroMQ frames).
A connection starts with that token, so only a peer that spoke to the ZeroMQ endpoint can write into
caches. The bytes themselves are not encrypted: with CURVE on (common/security.py) the receiver
offers no stream and pages stay on ZeroMQ.

On a connection: the token once, then messages, each `PREFIX` (magic, header length), the msgspec
`Pages` header, and exactly `header.nbytes` payload bytes: the frames `frame_sizes` names, back to
back. A header that cannot be read, a bad token, or a stall mid-message (`timeout`) closes the
connection; a transfer cut off that way fails at once (its request's blocks are freed and the sender
hears Ack(not ok)), and the sender opens a new connection for its next message.
"""

from __future__ import annotations

import hmac
import logging
import math
import os
import queue
import secrets
import socket
import struct
import threading
import time
from collections import Counter

import numpy as np

from kvtransfer.frames import Staged
from kvtransfer.protocol import MAX_HEADER_BYTES, MessageError, Pages, decode
from kvtransfer.receiver import Landed, RankReceiver, frame_sizes

log = logging.getLogger(__name__)

MAGIC = b"TKVS"
PREFIX = struct.Struct("<4sI")  # magic, header length
TOKEN_BYTES = 16
# how often a reader or the acceptor, waiting for bytes, looks whether the server stops (and a reader
# mid-payload whether its write was revoked: `RankReceiver.cancel` waits that long at most)
POLL_S = 0.2
RECV_CHUNK = 32 << 10  # bytes asked of the kernel per read: small reads pipeline with the sender (below)
SOCKET_BUFFER = 4 << 20  # kernel buffers of a connection: fewer wake-ups per MiB on both ends
IOV_MAX = 512  # buffers per sendmsg call
HANDSHAKE_S = 1.0  # a sender's wait for StreamInfo, and for its connection to be accepted
MAX_CONNECTIONS = 256  # per receiver rank (one per sender rank in use)
RETRY_S = 10.0  # after a broken stream: ZeroMQ frames to that receiver this long
MAX_RETRY_S = 300.0  # no StreamInfo, or no connection: asked again after 10, 20, 40 ... s, then every 5 min


class StreamClosed(ConnectionError):
    """The peer closed the connection (between messages: the usual end)."""


class Revoked(Exception):
    """The receiver revoked a write in progress (`RankReceiver.may_write`); `got`: bytes read so far."""

    def __init__(self, got: int):
        super().__init__(f"revoked after {got} bytes")
        self.got = got


def stream_address(endpoint: str) -> tuple[int, object]:
    """(address family, bind address) of the stream next to a ZeroMQ `endpoint` (tcp:// or ipc://)."""
    if endpoint.startswith("tcp://"):
        host = endpoint[6:].rsplit(":", 1)[0].strip("[]")
        host = "" if host in ("*", "0.0.0.0") else host
        return (socket.AF_INET6 if ":" in host else socket.AF_INET), (host, 0)
    if endpoint.startswith("ipc://"):
        return socket.AF_UNIX, endpoint[6:] + ".kvstream"
    raise ValueError(f"no stream next to {endpoint!r} (tcp:// or ipc:// only)")


def connect_address(address: str, endpoint: str) -> tuple[int, object]:
    """Where a sender connects for `address` (from StreamInfo): a wildcard host is the host of the
    ZeroMQ `endpoint` it reached the receiver at."""
    if address.startswith("ipc://"):
        return socket.AF_UNIX, address[6:]
    if not address.startswith("tcp://"):
        raise ValueError(f"unknown stream address {address!r}")
    host, port = address[6:].rsplit(":", 1)
    host = host.strip("[]")
    if host in ("", "*", "0.0.0.0", "::"):
        host = endpoint.split("://", 1)[1].rsplit(":", 1)[0].strip("[]")
    return (socket.AF_INET6 if ":" in host else socket.AF_INET), (host, int(port))


def _tune(sock: socket.socket) -> None:
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
        except OSError:
            pass
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # a peer gone without a word (host down, cable out) is found in ~1 minute, not never
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for opt, value in (("TCP_KEEPIDLE", 30), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 3)):
            if hasattr(socket, opt):
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, opt), value)


class StreamServer:
    """A receiver rank's stream: a listening socket, an acceptor thread, a reader thread per connection
    (one per sender rank). Readers call into the rank's `RankReceiver` (thread-safe)."""

    def __init__(self, endpoint: str, receiver: RankReceiver, metrics: Counter, timeout: float = 30.0,
                 max_msg_bytes: int = 1 << 30):
        family, addr = stream_address(endpoint)
        self.receiver, self.metrics = receiver, metrics
        self.timeout, self.max_msg_bytes = timeout, max_msg_bytes
        self.token = secrets.token_bytes(TOKEN_BYTES)
        self._listener = socket.socket(family, socket.SOCK_STREAM)
        if family == socket.AF_UNIX:
            if os.path.exists(addr):
                os.unlink(addr)
            self._path = addr
        else:
            self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._path = None
        _tune(self._listener)  # (accepted sockets inherit the buffer sizes, which must precede the handshake)
        self._listener.bind(addr)
        self._listener.listen(64)
        self._listener.settimeout(POLL_S)
        if family == socket.AF_UNIX:
            self.address = f"ipc://{addr}"
        else:
            host, port = self._listener.getsockname()[:2]
            self.address = f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"
        self._stop = threading.Event()
        self._conns: dict[socket.socket, threading.Thread] = {}
        self._lock = threading.Lock()
        self._acceptor = threading.Thread(target=self._accept, name=f"kv-stream-{receiver.rank}", daemon=True)
        self._acceptor.start()

    def stop(self) -> None:
        self._stop.set()
        self._acceptor.join(5)
        self._listener.close()
        with self._lock:
            conns = list(self._conns.items())
        for c, _ in conns:  # readers blocked in recv wake up with an error and end
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        end = time.monotonic() + 2.0  # (they also look at the stop flag every POLL_S)
        for _, t in conns:
            t.join(max(0.0, end - time.monotonic()))
        if self._path is not None and os.path.exists(self._path):
            os.unlink(self._path)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                if len(self._conns) >= MAX_CONNECTIONS:
                    self.metrics["stream_refused"] += 1
                    conn.close()
                    continue
                t = self._conns[conn] = threading.Thread(target=self._serve, args=(conn,), daemon=True,
                                                         name=f"kv-stream-{self.receiver.rank}-conn")
            t.start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(POLL_S)
        try:
            token = bytearray(TOKEN_BYTES)
            _recv_exact(conn, memoryview(token), self._stop, self.timeout)
            if not hmac.compare_digest(bytes(token), self.token):
                self.metrics["stream_refused"] += 1
                return
            scratch = _Scratch()
            while self._message(conn, scratch):
                pass
        except StreamClosed:
            pass
        except (OSError, TimeoutError) as e:
            if not self._stop.is_set():
                self.metrics["stream_broken"] += 1
                log.warning("KV stream connection failed: %s", e)
        except Exception:  # never let a peer's bytes end the process; the connection goes
            self.metrics["stream_broken"] += 1
            log.exception("KV stream connection failed")
        finally:
            with self._lock:
                self._conns.pop(conn, None)
            conn.close()

    def _message(self, conn: socket.socket, scratch: _Scratch) -> bool:
        """Reads and delivers one message; False: the connection is to be closed (a bad header)."""
        prefix = bytearray(PREFIX.size)
        _recv_exact(conn, memoryview(prefix), self._stop, self.timeout, idle=True)  # waits for the next one
        magic, n = PREFIX.unpack(prefix)
        if magic != MAGIC or n > MAX_HEADER_BYTES:
            return self._bad("not a KV stream message")
        head = bytearray(n)
        _recv_exact(conn, memoryview(head), self._stop, self.timeout)
        try:
            msg = decode(head)
        except MessageError as e:
            return self._bad(str(e))
        if not isinstance(msg, Pages) or msg.pair or msg.nbytes > self.max_msg_bytes:
            return self._bad(f"a {type(msg).__name__} message on a KV stream")
        sizes = frame_sizes(msg)
        views = self.receiver.landing(msg)
        if views is not None and [memoryview(v).nbytes for v in views] != sizes:
            self.receiver.abandon_landing()  # (cannot happen for a header that fits its reservation)
            views = None
        if views is None:  # not landing in place: the payload goes to `on_pages` to judge and write
            payload = scratch.get(msg.nbytes)
            try:
                _recv_exact(conn, payload, self._stop, self.timeout)
            except BaseException:  # cut off: an expected transfer fails now, not at its deadline
                self.receiver.on_pages(msg, [])
                raise
            frames, off = [], 0
            for size in sizes:
                frames.append(payload[off:off + size])
                off += size
            self.receiver.on_pages(msg, frames)
            return True
        got = [0] * len(views)
        staged = isinstance(views, Staged)
        try:
            for i, v in enumerate(views):
                # into a staging buffer (a GPU cache), or the cache blocks themselves: a cancel
                # revokes the write between two reads
                _recv_exact(conn, memoryview(v if staged else v.reshape(-1)).cast("B"), self._stop, self.timeout,
                            may_write=None if staged else self.receiver.may_write)
                got[i] = sizes[i]
        except Revoked as r:  # the request was cancelled mid-payload: its blocks are not ours any more
            self.receiver.abandon_landing()
            self._drain(conn, msg.nbytes - sum(got) - r.got)
            self.receiver.on_pages(msg, Landed(got, False, None))  # (an unknown request by now: counted)
            return True
        except BaseException:  # cut off mid-payload: the transfer fails now, not at its deadline
            self.receiver.on_pages(msg, Landed(got, False, None))
            raise
        self.receiver.on_pages(msg, Landed(got, False, views if staged else None))
        return True

    def _drain(self, conn: socket.socket, n: int) -> None:
        scratch = memoryview(bytearray(min(n, 1 << 20)))
        while n > 0:
            k = min(n, len(scratch))
            _recv_exact(conn, scratch[:k], self._stop, self.timeout)
            n -= k

    def _bad(self, why: str) -> bool:
        self.metrics["messages_bad"] += 1
        log.warning("KV stream: %s; closing the connection", why)
        return False


class _Scratch:
    """A connection's buffer, `get(n)`, for payloads that do not land in place (`on_pages` copies them
    out before the next message is read): grown as needed, kept up to KEEP_BYTES, uninitialised."""

    KEEP_BYTES = 64 << 20

    def __init__(self):
        self.buf = np.empty(0, dtype=np.uint8)

    def get(self, n: int) -> memoryview:
        if n > len(self.buf):
            if n > self.KEEP_BYTES:
                return memoryview(np.empty(n, dtype=np.uint8))
            self.buf = np.empty(n, dtype=np.uint8)
        return memoryview(self.buf[:n])


def _recv_exact(conn: socket.socket, view: memoryview, stop: threading.Event, timeout: float, idle: bool = False,
                may_write=None) -> None:
    """Fills `view` from `conn` (whose own timeout is POLL_S), failing (TimeoutError) when nothing
    comes for `timeout` (a stall: a slow link that makes progress is fine); `idle`: the first byte may
    take as long as it takes (an idle connection between messages), and a close before it is the
    peer's usual goodbye (StreamClosed). Ends early (StreamClosed) when `stop` is set, or (Revoked,
    with the bytes read so far) when `may_write()` turns False between reads.

    Reads are at most RECV_CHUNK: over loopback on 2 cores, 16 MiB read 32 KiB at a time ran at 6.9-7.3
    GB/s into memory in the CPU's caches and 4.8-5.7 into cold memory, against 3.3-3.5 and 2.8-2.9 in
    reads of all that is asked (the kernel then copies in long runs while the sender waits for window
    updates), and 3.9-6.0 / 3.7-4.8 read through a 128 KiB buffer and copied from there (the way of an
    earlier version)."""
    got, n = 0, len(view)
    last = time.monotonic()
    while got < n:
        if may_write is not None and not may_write():
            raise Revoked(got)
        try:
            k = conn.recv_into(view[got:got + RECV_CHUNK])
        except TimeoutError:
            if stop.is_set():
                raise StreamClosed("server stopping") from None
            if not (idle and got == 0) and time.monotonic() - last > timeout:
                raise TimeoutError(f"nothing for {timeout:.0f} s after {got} of {n} bytes") from None
            continue
        if k == 0:
            if got == 0 and idle:
                raise StreamClosed("peer closed")
            raise ConnectionError(f"peer closed after {got} of {n} bytes")
        got += k
        last = time.monotonic()


class StreamClient:
    """A sender rank's connection to one receiver's stream, with a thread that writes the queued
    messages (the model thread never blocks on the network). After a failed write the connection is
    `broken`: the messages still queued are dropped (their transfers fail on the receiver's side),
    and the owner opens a new one later."""

    def __init__(self, address: str, endpoint: str, token: bytes, metrics: Counter, timeout: float = 30.0):
        family, addr = connect_address(address, endpoint)
        self.metrics, self.timeout = metrics, timeout
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            _tune(self.sock)
            self.sock.settimeout(HANDSHAKE_S)  # (the model thread waits for this: the peer just answered)
            self.sock.connect(addr)
            self.sock.sendall(token)
            self.sock.settimeout(timeout)  # each write: the writer thread's
        except BaseException:
            self.sock.close()
            raise
        self.broken = False
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="kv-stream-send", daemon=True)
        self._thread.start()

    def send(self, head: bytes, frames: list, nbytes: int, ready=None) -> None:
        """Queues one message: `head` (an encoded Pages), its payload `frames` (CPU buffers, kept
        referenced until written), `ready`: a CUDA event to wait for first (staged GPU pages)."""
        self._queue.put((PREFIX.pack(MAGIC, len(head)) + head, frames, nbytes, ready))

    def flush(self, timeout: float = 5.0) -> None:
        done = threading.Event()
        self._queue.put(done)
        done.wait(timeout)

    def end(self) -> None:
        """No more messages: the writer ends after what is queued."""
        self._queue.put(None)

    def close(self, timeout: float = 5.0) -> None:
        """Writes what is queued (within `timeout`), then closes."""
        self.end()
        self._thread.join(timeout)
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # (a writer still blocked wakes up with an error)
        except OSError:
            pass
        self.sock.close()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if isinstance(item, threading.Event):
                item.set()
                continue
            if self.broken:
                self.metrics["stream_dropped"] += 1
                continue
            head, frames, nbytes, ready = item
            try:
                if ready is not None:
                    ready.synchronize()
                _send_all(self.sock, [head, *frames])
            except Exception as e:  # (a device error waiting for `ready` too: the thread must go on)
                self.broken = True
                self.metrics["stream_send_failed"] += 1
                log.warning("KV stream write failed: %s", e)
                try:
                    self.sock.close()
                except OSError:
                    pass
                continue
            self.metrics["frames_sent"] += 1
            self.metrics["messages_streamed"] += 1
            self.metrics["bytes_sent"] += nbytes


class StreamPeers:
    """A sender rank's page streams, one per receiver endpoint, opened on first use: a handshake
    (`ask(endpoint, timeout)` -> StreamInfo or None: the StreamHello round trip over ZeroMQ), then a
    connection. The receiver just answered a Reserve, so it answers in well under HANDSHAKE_S."""

    def __init__(self, ask, metrics: Counter, timeout: float = 30.0):
        self.ask, self.metrics, self.timeout = ask, metrics, timeout
        self._streams: dict[str, StreamClient] = {}
        self._not_before: dict[str, float] = {}  # endpoint -> when to ask again (inf: it offers none)
        self._backoff: dict[str, float] = {}  # endpoint -> the next wait after a failed handshake
        self._lock = threading.Lock()

    def get(self, endpoint: str) -> StreamClient | None:
        """The live stream to `endpoint`, or None (send ZeroMQ frames): the receiver offers none, did
        not answer, or the last stream to it broke (its peer died, most likely: frames for the next
        RETRY_S, then a new handshake; the model thread never waits on a dead peer)."""
        with self._lock:
            s = self._streams.get(endpoint)
            if s is not None and not s.broken:
                return s
            if s is not None:  # a write failed
                del self._streams[endpoint]
                s.close(0)
                return self._later(endpoint)
            if self._not_before.get(endpoint, 0.0) > time.monotonic():
                return None
            info = self.ask(endpoint, HANDSHAKE_S)
            if info is None:  # (a receiver too old to know the question, or a dead one)
                return self._back_off(endpoint, "did not say where its page stream is")
            if not info.address:
                self._not_before[endpoint] = math.inf
                return None
            try:
                s = StreamClient(info.address, endpoint, info.token, self.metrics, self.timeout)
            except (OSError, ValueError) as e:
                return self._back_off(endpoint, f"has a page stream {info.address} that does not take a "
                                                f"connection ({e})")
            self._backoff.pop(endpoint, None)
            self._streams[endpoint] = s
            return s

    def _back_off(self, endpoint: str, why: str) -> None:
        """ZeroMQ frames to `endpoint` for a while: 10, 20, 40 ... s after failures in a row, at most 5 min."""
        wait = self._backoff[endpoint] = min(MAX_RETRY_S, 2 * self._backoff.get(endpoint, RETRY_S / 2))
        log.warning("KV receiver %s %s; ZeroMQ frames to it for the next %.0f s", endpoint, why, wait)
        self._not_before[endpoint] = time.monotonic() + wait
        return None

    def _later(self, endpoint: str) -> None:
        self._not_before[endpoint] = time.monotonic() + RETRY_S
        return None

    def flush(self, timeout: float = 5.0) -> None:
        with self._lock:
            streams = list(self._streams.values())
        for s in streams:
            s.flush(timeout)

    def close(self, timeout: float = 5.0) -> None:
        with self._lock:
            streams = list(self._streams.values())
            self._streams.clear()
        for s in streams:
            s.end()
        end = time.monotonic() + timeout  # one bound for all of them, not one each
        for s in streams:
            s.close(max(0.0, end - time.monotonic()))


def _send_all(sock: socket.socket, buffers: list) -> None:
    """Writes every buffer, in order: scatter-gather writes (sendmsg), resumed after partial ones."""
    views = [memoryview(b).cast("B") for b in buffers]
    i = 0
    while i < len(views):
        sent = sock.sendmsg(views[i:i + IOV_MAX])
        while sent and i < len(views):
            n = len(views[i])
            if sent >= n:
                sent -= n
                i += 1
            else:
                views[i] = views[i][sent:]
                sent = 0
        while i < len(views) and not len(views[i]):
            i += 1
