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


def test_a_message_of_several_layers_lands_each_layer_and_a_short_one_fails(server):
    recv, caches, done, sock = server
    now = time.monotonic()
    recv.expect("multi", 0, [2, 3], LAYOUT, now + 10)
    recv.expect("short", 0, [4, 5], LAYOUT, now + 10)
    kv = [[torch.randn(2, 2, 2, 4) for _ in range(2)] for _ in range(2)]  # [layer][k, v]
    header = Pages(VERSION, "multi", 0, 0, 0, (0, 2), [2, 3], "float32", [2, 2, 2, 2, 4], 2 * 2 * 2 * PER_BLOCK,
                   runs=[2], num_layers=2)
    sock.send_multipart([encode(header), *[t.numpy().tobytes() for layer in kv for t in layer]])
    assert _wait(done, 1) == [("multi", 0, 0, True, "")]
    for layer in (0, 1):
        assert torch.equal(caches.caches[layer][0, 2:4], kv[layer][0])
        assert torch.equal(caches.caches[layer][1, 2:4], kv[layer][1])
    assert recv.metrics["frames_in_place"] == 2 and recv.metrics["messages_ok"] == 1
    short = Pages(VERSION, "short", 0, 0, 0, (0, 2), [4, 5], "float32", [2, 2, 2, 2, 4], 2 * 2 * 2 * PER_BLOCK,
                  runs=[2], num_layers=2)
    ok = b"\x00" * (2 * PER_BLOCK)
    sock.send_multipart([encode(short), ok, ok, ok])  # layer 1's V never came
    assert _wait(done, 2)[1][0] == "short" and _wait(done, 2)[1][3] is False
    assert recv.metrics["frames_bad"] == 1


@pytest.mark.parametrize("src_blocks", [[1, 2, 3], [1, 3, 6]])  # runs of whole blocks, or a gather
@pytest.mark.parametrize("mode", ["cache", "strided", "staged"])
@pytest.mark.parametrize("stream", [False, True], ids=["zmq", "tcp"])
def test_layers_ready_together_go_as_few_messages_and_land_bit_for_bit(monkeypatch, mode, src_blocks, stream):
    """OutgoingTransfer.send_layers over real sockets: layers coalesce into messages of about
    MESSAGE_BYTES; frames of a contiguous cache go through libzmq directly (`CacheFrames`), a strided
    cache's copies through pyzmq; staged (a GPU cache's path: through a host buffer on both sides,
    forced here for CPU caches) too; all land bit for bit. The same over the "tcp" transport's page
    stream (kvtransfer/stream.py), which lands whole-block runs with recv_into as well."""
    from kvtransfer import outgoing
    from kvtransfer.outgoing import OutgoingTransfer
    from kvtransfer.plan import plan_transfer
    from kvtransfer.zmq_transport import KVClient

    layout = KVLayout(5, 2, 4, 2, "float32")
    per_layer = 2 * 3 * PER_BLOCK  # K and V of 3 blocks
    monkeypatch.setattr(outgoing, "MESSAGE_BYTES", 2 * per_layer)  # two layers a message
    full = [torch.randn(2, 8, 3, 2, 4) for _ in range(5)]
    strided, staged = mode == "strided", mode == "staged"
    src = RankCaches([c[:, :, 1:] for c in full] if strided else [c[:, :, :2].clone() for c in full], 0, 0)
    dst = RankCaches([torch.zeros(2, 8, 2, 2, 4) for _ in range(5)], 0, 0)
    done = []
    recv = RankReceiver(0, layout, dst, lambda *a: done.append(a), stage_frames=staged)
    srv = KVServer("tcp://127.0.0.1:0", recv, None, stream=stream)
    client = KVClient(0, stage_frames=staged, stream=stream)
    srv.start()
    client.start()
    try:
        recv.expect("r", 0, [5, 6, 7], layout, time.monotonic() + 10)
        out = OutgoingTransfer(client, src, plan_transfer(layout, layout), 0, "r", 0, [srv.endpoint], src_blocks,
                               [5, 6, 7])
        assert out.send_layers([0, 1, 2]) == 2  # layers 0-1, then 2
        assert out.send_all() == 1  # 3-4
        assert _wait(done, 1) == [("r", 0, 0, True, "")]
        assert recv.metrics["messages_ok"] == 3 and recv.metrics["frames_ok"] == 5
        for layer in range(5):
            assert torch.equal(dst.caches[layer][:, 5:8], src.caches[layer][:, src_blocks])
        runs = src_blocks == [1, 2, 3]
        cache_frames = mode == "cache" and runs and not stream
        assert client.metrics["messages_cache_frames"] == (3 if cache_frames else 0)
        assert client.metrics["messages_streamed"] == (3 if stream else 0)
        kept = client.frames._cache_frames.kept if client.frames._cache_frames is not None else {}
        assert len(kept) == (5 if cache_frames else 0)  # the five layers' cache arrays
        assert client.metrics["messages_staged"] == (3 if staged else 0)
        if staged:
            assert recv.metrics["frames_staged"] == 5
        else:  # a gather lands through ZeroMQ's buffers, whole-block runs straight in the cache
            assert recv.metrics["frames_in_place"] == (5 if runs else 0)
    finally:
        client.stop()
        srv.stop()
    assert not kept  # the client's context is gone: libzmq holds no frame, the arrays are let go


def test_cancel_waits_for_a_write_in_progress_and_a_failed_write_fails_only_its_transfer(monkeypatch):
    """Blocks are freed after `cancel` returns (Reservations frees them then), so a cancel from another
    thread waits while the I/O thread still writes that request's pages."""
    import threading

    caches = RankCaches([torch.zeros(2, 8, 2, 2, 4) for _ in range(2)], 0, 0)
    done = []
    recv = RankReceiver(0, LAYOUT, caches, lambda *a: done.append(a))
    recv.expect("r", 0, [2, 3], LAYOUT, time.monotonic() + 10)
    header = Pages(VERSION, "r", 0, 0, 0, (0, 2), [2, 3], "float32", [2, 2, 2, 2, 4], 2 * 2 * PER_BLOCK, runs=[2])
    views = recv.landing(header)  # the I/O thread is about to receive into the blocks
    assert views is not None
    cancelled = threading.Event()
    t = threading.Thread(target=lambda: (recv.cancel("r", 0), cancelled.set()))
    t.start()
    assert not cancelled.wait(0.3), "cancel returned while the pages were being written"
    from kvtransfer.receiver import Landed
    recv.on_pages(header, Landed([v.nbytes for v in views]))
    assert cancelled.wait(5)
    t.join()
    assert recv.num_pending == 0
    # a write that raises fails that transfer (on_done not ok) and leaves the receiver working
    recv.expect("w", 0, [4, 5], LAYOUT, time.monotonic() + 10)
    monkeypatch.setattr(caches, "insert_runs", lambda *a: (_ for _ in ()).throw(RuntimeError("device lost")))
    bad = Pages(VERSION, "w", 0, 0, 0, (0, 2), [4, 5], "float32", [2, 2, 2, 2, 4], 2 * 2 * PER_BLOCK, runs=[2])
    recv.on_pages(bad, [memoryview(b"\0" * 2 * PER_BLOCK)] * 2)
    assert done[-1][0] == "w" and done[-1][3] is False and "device lost" in done[-1][4]
    assert recv.num_pending == 0 and not recv._writing


def test_runs_must_cover_consecutive_blocks_and_a_device_cache_must_stage():
    from kvtransfer.protocol import MessageError, decode

    bad = Pages(VERSION, "r", 0, 0, 0, (0, 2), [2, 5], "float32", [2, 2, 2, 2, 4], 2 * 2 * PER_BLOCK, runs=[2])
    with pytest.raises(MessageError, match="not consecutive"):  # would write block 3, not 5
        decode(encode(bad))
    meta = RankCaches([torch.zeros(2, 8, 2, 2, 4, device="meta")], 0, 0)
    assert RankReceiver(0, LAYOUT, meta, lambda *a: None).stage_frames
    with pytest.raises(ValueError, match="staging"):
        RankReceiver(0, LAYOUT, meta, lambda *a: None, stage_frames=False)
