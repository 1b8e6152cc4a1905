"""The tcp transport's page stream (kvtransfer/stream.py) on real loopback sockets, one process: pages
land in place bit for bit; a payload cut off mid-way fails its transfer at once; `cancel` revokes a
write in progress within one read and the connection goes on; scatter-gather writes resume after
partial sends; with CURVE on, no stream is offered and pages go as (encrypted) ZeroMQ frames."""

import random
import socket
import threading
import time

import numpy as np
import pytest
import torch

from kvtransfer.pages import RankCaches
from kvtransfer.plan import KVLayout
from kvtransfer.protocol import VERSION, Pages, encode
from kvtransfer.receiver import RankReceiver
from kvtransfer.stream import MAGIC, POLL_S, PREFIX, StreamServer, _send_all, connect_address

LAYOUT = KVLayout(2, 2, 4, 2, "float32")  # 2 layers, 2 KV heads, head_dim 4, block size 2
PER_BLOCK = 2 * 2 * 4 * 4  # one block's K (or V) of one layer


def _wait(cond, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.005)
    return cond()


@pytest.fixture
def stream():
    caches = RankCaches([torch.zeros(2, 8, 2, 2, 4) for _ in range(2)], 0, 0)
    done = []
    recv = RankReceiver(0, LAYOUT, caches, lambda *a: done.append(a))
    srv = StreamServer("tcp://127.0.0.1:0", recv, recv.metrics, timeout=5.0)
    family, addr = connect_address(srv.address, "tcp://127.0.0.1:1")
    conns = []

    def connect():
        c = socket.socket(family, socket.SOCK_STREAM)
        c.settimeout(10)
        c.connect(addr)
        c.sendall(srv.token)
        conns.append(c)
        return c
    yield recv, caches, done, connect
    for c in conns:
        c.close()
    srv.stop()


def _message(rid, layer, blocks, k, v):
    """One layer's pages of whole blocks (one run): the prefixed header, then K and V."""
    head = encode(Pages(VERSION, rid, 0, 0, layer, (0, 2), blocks, "float32", [2, len(blocks), 2, 2, 4],
                        2 * len(blocks) * PER_BLOCK, runs=[len(blocks)]))
    return PREFIX.pack(MAGIC, len(head)) + head, k.numpy().tobytes() + v.numpy().tobytes()


def test_pages_land_in_place_and_a_cut_off_payload_fails_its_transfer_at_once(stream):
    recv, caches, done, connect = stream
    now = time.monotonic()
    recv.expect("good", 0, [2, 3], LAYOUT, now + 30)
    recv.expect("cut", 0, [4, 5], LAYOUT, now + 30)
    k = [torch.randn(2, 2, 2, 4) for _ in range(2)]
    v = [torch.randn(2, 2, 2, 4) for _ in range(2)]
    c = connect()
    for layer in (0, 1):
        head, payload = _message("good", layer, [2, 3], k[layer], v[layer])
        c.sendall(head + payload)
    assert _wait(lambda: len(done) == 1) and done[0] == ("good", 0, 0, True, "")
    for layer in (0, 1):
        assert torch.equal(caches.caches[layer][0, 2:4], k[layer]) and torch.equal(caches.caches[layer][1, 2:4], v[layer])
    assert recv.metrics["frames_in_place"] == 2
    head, payload = _message("cut", 0, [4, 5], k[0], v[0])
    c.sendall(head + payload[:PER_BLOCK + 7])  # the sender dies mid-payload
    c.close()
    t0 = time.monotonic()
    assert _wait(lambda: len(done) == 2)
    assert done[1][:4] == ("cut", 0, 0, False) and time.monotonic() - t0 < 2  # not at its deadline (30 s)
    assert recv.num_pending == 0 and not recv._writing and recv.metrics["stream_broken"] == 1


def test_cancel_revokes_a_write_in_progress_and_the_connection_goes_on(stream):
    recv, caches, done, connect = stream
    recv.expect("r", 0, [2, 3], LAYOUT, time.monotonic() + 30)
    k, v = torch.randn(2, 2, 2, 4), torch.randn(2, 2, 2, 4)
    head, payload = _message("r", 0, [2, 3], k, v)
    c = connect()
    c.sendall(head + payload[:PER_BLOCK])  # half of K, then the sender stalls
    assert _wait(lambda: bool(recv._writing))  # the reader is receiving into the blocks
    t0 = time.monotonic()
    recv.cancel("r", 0)  # (what the reservations do before they free the blocks)
    assert time.monotonic() - t0 < POLL_S + 0.5 and not recv._writing
    before = caches.caches[0].clone()
    c.sendall(payload[PER_BLOCK:])  # the rest comes after all: read and dropped, not written
    recv.expect("next", 0, [6, 7], LAYOUT, time.monotonic() + 30)
    for layer in (0, 1):
        c.sendall(b"".join(_message("next", layer, [6, 7], k, v)))
    assert _wait(lambda: len(done) == 1) and done[0] == ("next", 0, 0, True, "")
    assert torch.equal(caches.caches[0][:, 2:4], before[:, 2:4])  # nothing more landed in r's blocks
    assert torch.equal(caches.caches[1][0, 6:8], k) and recv.metrics["frames_unknown_request"] == 1


def test_a_revoke_in_the_second_frame_stops_writing_mid_frame_and_the_stream_stays_in_step():
    """Frames of 512 KiB land in the cache 32 KiB a read: a cancel while V (the second frame) is coming
    in stops the writes between two reads (what was sent before it has landed, nothing after it
    does); the rest of the message is skipped exactly, so the next message is read from its start."""
    layout = KVLayout(1, 2, 64, 512, "float32")  # a block's K (or V): 2 x 512 x 64 x 4 = 256 KiB
    caches = RankCaches([torch.zeros(2, 4, 2, 512, 64)], 0, 0)
    done = []
    recv = RankReceiver(0, layout, caches, lambda *a: done.append(a))
    srv = StreamServer("tcp://127.0.0.1:0", recv, recv.metrics, timeout=5.0)
    family, addr = connect_address(srv.address, "tcp://127.0.0.1:1")
    c = socket.socket(family, socket.SOCK_STREAM)
    c.settimeout(10)
    try:
        c.connect(addr)
        c.sendall(srv.token)

        def message(rid, blocks, k, v):
            head = encode(Pages(VERSION, rid, 0, 0, 0, (0, 2), blocks, "float32", [2, len(blocks), 2, 512, 64],
                                k.nbytes + v.nbytes, runs=[len(blocks)]))
            return PREFIX.pack(MAGIC, len(head)) + head, k.numpy().tobytes() + v.numpy().tobytes()
        recv.expect("r", 0, [0, 1], layout, time.monotonic() + 30)
        k, v = torch.randn(2, 2, 512, 64), torch.randn(2, 2, 512, 64)  # 512 KiB each
        head, payload = message("r", [0, 1], k, v)
        cut = k.nbytes + 200 * 1024  # all of K, then V partway (not at a read boundary)
        c.sendall(head + payload[:cut])
        assert _wait(lambda: recv.metrics.get("bytes_received", 0) == 0 and bool(recv._writing))
        time.sleep(0.3)  # (the reader has taken what was sent and waits for more)
        recv.cancel("r", 0)
        assert not recv._writing
        written = caches.caches[0][1, 0:2].clone()  # V as far as it got
        c.sendall(payload[cut:])
        recv.expect("next", 0, [2, 3], layout, time.monotonic() + 30)
        c.sendall(b"".join(message("next", [2, 3], v, k)))
        assert _wait(lambda: len(done) == 1) and done[0] == ("next", 0, 0, True, "")
        assert torch.equal(caches.caches[0][0, 2:4], v) and torch.equal(caches.caches[0][1, 2:4], k)
        assert torch.equal(caches.caches[0][0, 0:2], k)  # K had landed whole before the cancel
        assert torch.equal(caches.caches[0][1, 0:2], written)  # nothing of V after the cancel
        got = written.flatten().view(torch.uint8)
        assert torch.equal(got[:200 * 1024], v.flatten().view(torch.uint8)[:200 * 1024])  # V as far as sent
        assert not got[200 * 1024:].any()  # and not a byte of what came after the cancel
        assert recv.metrics["frames_unknown_request"] == 1
    finally:
        c.close()
        srv.stop()


def test_the_driver_frees_a_follower_ranks_blocks_only_after_it_stopped_writing_them():
    """RemoteRank.cancel (the decode driver, for another rank's blocks) waits for the rank's Cancelled,
    which the rank sends once a stream write into those blocks in progress has been revoked."""
    from kvtransfer.zmq_transport import KVServer, RemoteRank

    caches = RankCaches([torch.zeros(2, 8, 2, 2, 4) for _ in range(2)], 0, 0)
    recv = RankReceiver(0, LAYOUT, caches, lambda *a: None)  # (rank 0 of its own layout: it expects frames)
    srv = KVServer("tcp://127.0.0.1:0", recv, None, stream=True)  # a follower rank: no reservations
    srv.start()
    remote = RemoteRank(1, srv.endpoint)
    try:
        remote.expect("r", 0, [2, 3], LAYOUT, time.monotonic() + 30)
        family, addr = connect_address(srv.streams.address, srv.endpoint)
        c = socket.create_connection(addr, timeout=10)
        c.sendall(srv.streams.token)
        head, payload = _message("r", 0, [2, 3], torch.randn(2, 2, 2, 4), torch.randn(2, 2, 2, 4))
        c.sendall(head + payload[:PER_BLOCK])
        assert _wait(lambda: bool(recv._writing))
        t0 = time.monotonic()
        remote.cancel("r", 0)  # returns once the rank confirmed (not at its 5 s timeout)
        assert time.monotonic() - t0 < 2 and not recv._writing and recv.num_pending == 0
        c.close()
    finally:
        remote.close()
        srv.stop()


def test_scatter_gather_writes_resume_after_partial_sends():
    rng = random.Random(0)
    bufs = [np.frombuffer(rng.randbytes(rng.randint(1, 40_000)), dtype=np.uint8) for _ in range(1500)]
    a, b = socket.socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 << 10)  # partial sends all the way
    a.settimeout(10)
    got = bytearray()
    total = sum(len(x) for x in bufs)

    def read():
        while len(got) < total:
            chunk = b.recv(1 << 16)
            if not chunk:
                return
            got.extend(chunk)
    t = threading.Thread(target=read)
    t.start()
    _send_all(a, [*bufs[:3], b"", *bufs[3:]])  # (an empty buffer too)
    t.join(10)
    a.close()
    b.close()
    assert bytes(got) == b"".join(x.tobytes() for x in bufs)


def test_with_curve_on_no_stream_is_offered_and_pages_go_as_zeromq_frames(tmp_path, monkeypatch):
    from common import security
    from kvtransfer.outgoing import OutgoingTransfer
    from kvtransfer.plan import plan_transfer
    from kvtransfer.zmq_transport import KVClient, KVServer

    monkeypatch.setenv(security.ENV, "")
    monkeypatch.delenv(security.ENV)
    security.configure(security.make_keys(tmp_path / "keys"))
    try:
        src = RankCaches([torch.randn(2, 8, 2, 2, 4) for _ in range(2)], 0, 0)
        dst = RankCaches([torch.zeros(2, 8, 2, 2, 4) for _ in range(2)], 0, 0)
        done = []
        recv = RankReceiver(0, LAYOUT, dst, lambda *a: done.append(a))
        srv = KVServer("tcp://127.0.0.1:0", recv, None, stream=True)
        client = KVClient(0, stream=True)
        assert srv.streams is None
        srv.start()
        client.start()
        try:
            recv.expect("r", 0, [5, 6], LAYOUT, time.monotonic() + 10)
            OutgoingTransfer(client, src, plan_transfer(LAYOUT, LAYOUT), 0, "r", 0, [srv.endpoint], [1, 2],
                             [5, 6]).send_all()
            assert _wait(lambda: len(done) == 1) and done[0] == ("r", 0, 0, True, "")
            assert client.metrics["messages_streamed"] == 0 and client.metrics["frames_sent"] == 1
            assert torch.equal(dst.caches[1][:, 5:7], src.caches[1][:, 1:3])
        finally:
            client.stop()
            srv.stop()
    finally:
        security.configure(None)
