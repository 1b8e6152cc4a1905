"""Pages received straight into the cache blocks reserved for them (KVServer + RankReceiver.landing):
right frames land bit for bit; frames of the wrong size or number fail that transfer cleanly and
leave the server serving the next one. Real ZeroMQ sockets, one process."""

import time

import pytest
import torch
import zmq

from kvtransfer.pages import RankCaches
from kvtransfer.plan import KVLayout
from kvtransfer.protocol import VERSION, Pages, encode
from kvtransfer.receiver import RankReceiver
from kvtransfer.zmq_transport import KVServer

LAYOUT = KVLayout(2, 2, 4, 2, "float32")  # 2 layers, 2 KV heads, head_dim 4, block size 2
PER_BLOCK = 2 * 2 * 4 * 4  # one block's K (or V) of one layer: heads x block_size x head_dim x 4 bytes


@pytest.fixture
def server():
    caches = RankCaches([torch.zeros(2, 8, 2, 2, 4) for _ in range(2)], 0, 0)
    done = []
    recv = RankReceiver(0, LAYOUT, caches, lambda *a: done.append(a))
    srv = KVServer("tcp://127.0.0.1:0", recv, None)
    srv.start()
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(srv.endpoint)
    yield recv, caches, done, sock
    sock.close(0)
    srv.stop()


def _wait(done, n, timeout=5.0):
    deadline = time.monotonic() + timeout
    while len(done) < n and time.monotonic() < deadline:
        time.sleep(0.01)
    return done[:n]


def _send(sock, rid, layer, blocks, frames):
    header = Pages(VERSION, rid, 0, 0, layer, (0, 2), blocks, "float32", [2, len(blocks), 2, 2, 4],
                   2 * len(blocks) * PER_BLOCK, runs=[len(blocks)])
    sock.send_multipart([encode(header), *frames])


def test_frames_land_in_place_and_bad_ones_fail_only_their_transfer(server):
    recv, caches, done, sock = server
    now = time.monotonic()
    for rid, blocks in (("good", [2, 3]), ("long", [4, 5]), ("missing", [6, 7]), ("extra", [0, 1])):
        recv.expect(rid, 0, blocks, LAYOUT, now + 10)
    k = [torch.randn(2, 2, 2, 4) for _ in range(2)]
    v = [torch.randn(2, 2, 2, 4) for _ in range(2)]
    for layer in (0, 1):
        _send(sock, "good", layer, [2, 3], [k[layer].numpy().tobytes(), v[layer].numpy().tobytes()])
    assert _wait(done, 1) == [("good", 0, 0, True, "")]
    for layer in (0, 1):
        assert torch.equal(caches.caches[layer][0, 2:4], k[layer]) and torch.equal(caches.caches[layer][1, 2:4], v[layer])
    ok = b"\x00" * (2 * PER_BLOCK)
    _send(sock, "long", 0, [4, 5], [ok + b"\x01" * 8, ok])  # longer than its place
    _send(sock, "missing", 0, [6, 7], [ok])  # V never came
    _send(sock, "extra", 0, [0, 1], [ok, ok, ok])  # one frame too many
    failed = _wait(done, 4)[1:]
    assert sorted((d[0], d[3]) for d in failed) == [("extra", False), ("long", False), ("missing", False)]
    assert recv.metrics["frames_bad"] == 3 and recv.metrics["frames_in_place"] == 2
    # the server reads the next message from its start, not from the leftovers of a bad one
    recv.expect("after", 0, [4, 5], LAYOUT, now + 10)
    for layer in (0, 1):
        _send(sock, "after", layer, [4, 5], [k[layer].numpy().tobytes(), v[layer].numpy().tobytes()])
    assert _wait(done, 5)[4] == ("after", 0, 0, True, "")
    assert torch.equal(caches.caches[1][1, 4:6], v[1])


def test_slabs_are_contiguous_byte_views_of_the_pages_even_of_a_strided_cache():
    full = torch.randn(2, 6, 3, 2, 4)
    contiguous = RankCaches([full.clone()], 0, 0)
    strided = RankCaches([full[:, :, 1:3]], 0, 1)  # a rank's heads as a view of a wider cache
    k, v = contiguous.slabs(0, (0, 3), [2, 3, 4], [3])
    assert k.base is not None and k.flags.c_contiguous  # a view, not a copy
    assert bytes(k) == full[0, 2:5].numpy().tobytes() and bytes(v) == full[1, 2:5].numpy().tobytes()
    k, v = strided.slabs(0, (1, 3), [4], [1])
    assert k.flags.c_contiguous and bytes(k) == full[0, 4:5, 1:3].contiguous().numpy().tobytes()


def test_io_thread_runs_every_task_submitted_from_many_threads(monkeypatch):
    """Wake-ups are coalesced (one pipe write per drain): no task may be left waiting. The poll
    timeout is made a minute long, so a lost wake-up hangs the test instead of costing 50 ms."""
    import threading

    from kvtransfer import io_thread

    monkeypatch.setattr(io_thread, "POLL_MS", 60_000)
    io = io_thread.IOThread("test-io")
    io.start()
    ran = []
    try:
        def submit_many(tag):
            for i in range(5000):
                io.submit(lambda i=i: ran.append((tag, i)))
                if i % 500 == 0:
                    time.sleep(0.001)  # let the I/O thread drain and sleep, so wake-ups matter
        threads = [threading.Thread(target=submit_many, args=(t,)) for t in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        done = threading.Event()
        io.submit(done.set)
        assert done.wait(5), "the last task was never run"
        assert len(ran) == 15000 and [i for tag, i in ran if tag == 0] == list(range(5000))
    finally:
        io.stop()
