"""The transfer state machine on both sides, over the in-memory transport (no sockets; one test of a
real KVClient's pairing back-off)."""

import socket
import threading
import time

import pytest
import torch

from common.kv_layout import KVLayoutSpec
from engine.block_manager import BlockManager, chain_hashes
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence
from kvtransfer.fake import FakeKVClient, FakeKVNetwork
from kvtransfer.pages import RankCaches
from kvtransfer.plan import KVLayout
from kvtransfer.protocol import VERSION, Reserve
from kvtransfer.receiver import RankReceiver
from kvtransfer.reservations import BlockPoolReserver, Reservations
from kvtransfer.sender import SendTransfer, TransferState

L, H, D, BS = 3, 2, 8, 4


def layout(tp=1, pp=1):
    return KVLayout(L, H, D, BS, "float32", tp, pp)


class Decode:
    def __init__(self, net, tp=1, pp=1, num_blocks=16, timeout=5.0, caching=False):
        self.layout = layout(tp, pp)
        self.bm = BlockManager(num_blocks, BS, enable_prefix_caching=caching)
        self.pool = BlockPoolReserver(self.bm)
        self.ready = {}
        ranks = []
        for r in range(self.layout.num_ranks):
            t, p = self.layout.coords(r)
            (l0, l1), (h0, h1) = self.layout.layers(p), self.layout.heads(t)
            caches = RankCaches([torch.zeros(2, num_blocks, h1 - h0, BS, D) for _ in range(l0, l1)], l0, h0)
            ranks.append(RankReceiver(r, self.layout, caches, lambda *a: self.res.on_rank_done(*a)))
        self.ranks = ranks
        self.res = Reservations(self.layout, ranks, self.pool.reserve, self.pool.release, None,
                                lambda rid, att, blocks: self.ready.__setitem__(rid, blocks), timeout)
        self.endpoints = [f"d{id(self)}/{r}" for r in range(len(ranks))]
        for ep, r in zip(self.endpoints, ranks):
            net.serve(ep, r, self.res if r.rank == 0 else None)


def src_caches(num_blocks=16):
    torch.manual_seed(0)
    return [torch.randn(2, num_blocks, H, BS, D) for _ in range(L)]


def test_done_path_moves_pages_and_releases_once():
    net = FakeKVNetwork()
    d = Decode(net, tp=2, pp=2)
    full = src_caches()
    client = FakeKVClient(net, 0)
    released = []
    st = SendTransfer(client, "r1", 0, 10, layout(), d.layout, d.endpoints, lambda: released.append(1))
    assert st.reserve() and st.state == TransferState.TRANSFERRING
    t = st.outgoing(0, client, RankCaches(full, 0, 0), [5, 6, 7])
    # 2x2 destination ranks (layers split 2|1, one head each): one message each, its layers together
    assert t.send_all() == 4
    assert st.finish() and st.state == TransferState.DONE and released == [1]
    assert st.finish() and released == [1]
    blocks = d.ready["r1"]
    for r in d.ranks:
        for i, c in enumerate(r.caches.caches):
            layer, h0 = r.caches.layer_start + i, r.caches.head_start
            want = full[layer][:, [5, 6, 7], h0:h0 + c.shape[2]]
            assert torch.equal(c[:, blocks], want)


def test_no_room_fails_at_once_and_releases():
    net = FakeKVNetwork()
    d = Decode(net, num_blocks=2)
    released = []
    st = SendTransfer(FakeKVClient(net, 0), "r1", 0, 10, layout(), d.layout, d.endpoints,
                      lambda: released.append(1))
    assert not st.reserve()
    assert st.state == TransferState.FAILED and st.reason == "no room" and released == [1]
    assert d.bm.num_free_blocks == 2


def test_receiver_times_out_frees_and_nacks():
    net = FakeKVNetwork()
    d = Decode(net, timeout=0.05)
    client = FakeKVClient(net, 0)
    st = SendTransfer(client, "r1", 0, 10, layout(), d.layout, d.endpoints, lambda: None, ack_timeout=1.0)
    assert st.reserve()
    assert d.bm.num_free_blocks == 16 - 3
    st.outgoing(0, client, RankCaches(src_caches(), 0, 0), [1, 2, 3]).send_layer(0)  # then nothing more
    time.sleep(0.06)
    d.res.expire(time.monotonic())
    for r in d.ranks:
        r.expire(time.monotonic())
    assert d.bm.num_free_blocks == 16 and d.res.num_pending == 0
    assert not st.finish() and "timed out" in st.reason


def test_a_sender_with_a_queue_asks_the_receiver_to_wait_longer_within_a_cap():
    """Reserve.wait_s: a prefill worker whose queue will take a while before this prompt is computed asks
    the decode worker to hold the reservation that long; past it (or past MAX_WAIT_S, whatever it asks)
    the reservation times out as before, on the driver and on every rank."""
    from kvtransfer import reservations

    for asked, alive_at, dead_at in ((0.3, 0.1, 0.35), (10**6, 0.1, 0.35)):
        net = FakeKVNetwork()
        d = Decode(net, tp=2, timeout=0.05)
        client = FakeKVClient(net, 0)
        st = SendTransfer(client, "r1", 0, 10, layout(), d.layout, d.endpoints, lambda: None, ack_timeout=1.0,
                          wait_s=asked)
        old_cap = reservations.MAX_WAIT_S
        reservations.MAX_WAIT_S = 0.3  # the cap, made short for the test
        try:
            t0 = time.monotonic()
            assert st.reserve()
        finally:
            reservations.MAX_WAIT_S = old_cap
        for at, pending in ((alive_at, 1), (dead_at, 0)):
            d.res.expire(t0 + at)
            for r in d.ranks:
                r.expire(t0 + at)
            assert d.res.num_pending == pending, (asked, at)
        assert d.bm.num_free_blocks == 16 and not st.finish() and "timed out" in st.reason


def test_sender_abort_frees_the_receiver_and_late_frames_are_ignored():
    net = FakeKVNetwork()
    d = Decode(net)
    client = FakeKVClient(net, 0)
    st = SendTransfer(client, "r1", 0, 10, layout(), d.layout, d.endpoints, lambda: None)
    assert st.reserve()
    out = st.outgoing(0, client, RankCaches(src_caches(), 0, 0), [1, 2, 3])
    st.abort("client went away")
    assert st.state == TransferState.FAILED and d.bm.num_free_blocks == 16
    out.send_all()  # late frames of the aborted attempt
    assert d.ranks[0].metrics["frames_unknown_request"] == L
    # a new attempt of the same request goes through
    st2 = SendTransfer(client, "r1", 1, 10, layout(), d.layout, d.endpoints, lambda: None)
    assert st2.reserve()
    st2.outgoing(0, client, RankCaches(src_caches(), 0, 0), [1, 2, 3]).send_all()
    assert st2.finish() and "r1" in d.ready


def test_dead_receiver_sender_times_out_and_releases():
    net = FakeKVNetwork()
    d = Decode(net)
    client = FakeKVClient(net, 0)
    released = []
    st = SendTransfer(client, "r1", 0, 10, layout(), d.layout, d.endpoints, lambda: released.append(1),
                      ack_timeout=0.05)
    assert st.reserve()
    for ep in d.endpoints:
        net.kill(ep)
    st.outgoing(0, client, RankCaches(src_caches(), 0, 0), [1, 2, 3]).send_all()
    assert not st.finish() and released == [1] and st.reason == "no ack (timeout)"


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 2)])
def test_a_receiver_links_the_prefix_it_holds_and_receives_only_the_rest(tp, pp):
    """Decode-side reuse: turn 1's prompt lands and stays in D's prefix cache; turn 2 (turn 1 + more)
    reserves with its blocks' hashes, D links the 2 leading blocks it holds, and only the third block
    travels; D's blocks then hold turn 1's pages and turn 2's new one. With another root: nothing held."""
    net = FakeKVNetwork()
    d = Decode(net, tp=tp, pp=pp, caching=True)
    full = src_caches()
    client = FakeKVClient(net, 0)
    turn1, turn2 = list(range(10, 18)), list(range(10, 18)) + [40, 41, 42]  # 2 blocks; 2 blocks + 3 tokens
    root = d.bm.root_hash
    st = SendTransfer(client, "t1", 0, len(turn1), layout(), d.layout, d.endpoints, lambda: None,
                      block_hashes=chain_hashes(root, turn1, BS), hash_root=root)
    assert st.reserve() and st.held == 0
    st.outgoing(0, client, RankCaches(full, 0, 0), [1, 2]).send_all()
    assert st.finish()
    held1 = d.pool.take("t1")  # D decodes turn 1: its full blocks enter the cache, then are freed
    seq = Sequence("t1", 0, turn1, len(turn1), SamplingParams())
    first_blocks = list(held1.block_ids)
    seq.block_ids, seq.num_computed_tokens = list(first_blocks), len(turn1)
    d.bm.cache_full_blocks(seq)
    d.bm.free(held1)
    st2 = SendTransfer(client, "t2", 0, len(turn2), layout(), d.layout, d.endpoints, lambda: None,
                       block_hashes=chain_hashes(root, turn2, BS), hash_root=root)
    assert st2.reserve() and st2.held == 2 and st2.dst_block_ids[:2] == first_blocks
    sent = st2.outgoing(0, client, RankCaches(full, 0, 0), [5, 6, 7]).send_all()
    assert sent and st2.finish()
    assert d.res.metrics["blocks_held"] == 2 and d.res.metrics["blocks_received"] == 2 + 1
    blocks = d.ready["t2"]
    for r in d.ranks:
        for i, c in enumerate(r.caches.caches):
            layer, h0 = r.caches.layer_start + i, r.caches.head_start
            want = full[layer][:, [1, 2, 7], h0:h0 + c.shape[2]]  # turn 1's two blocks, turn 2's third
            assert torch.equal(c[:, blocks], want)
    st3 = SendTransfer(client, "t3", 0, len(turn2), layout(), d.layout, d.endpoints, lambda: None,
                       block_hashes=chain_hashes(root ^ 1, turn2, BS), hash_root=root ^ 1)
    assert st3.reserve() and st3.held == 0  # another model's (or dtype's) hashes: nothing to link


def test_block_runs_are_consecutive_on_both_sides():
    from kvtransfer.pages import block_runs
    assert block_runs([3, 4, 5, 9, 10], [0, 1, 2, 3, 4], True) == [3, 2]
    assert block_runs([3, 4, 5], [7, 2, 3], True) == [1, 2]
    assert block_runs([3, 4, 5], [0, 1, 2], False) == [1, 1, 1]
    assert block_runs([], [], True) == []


def _reserved():
    """A decode worker and a transfer of request r1 (10 tokens) reserved on it."""
    net = FakeKVNetwork()
    d = Decode(net)
    st = SendTransfer(FakeKVClient(net, 0), "r1", 0, 10, layout(), d.layout, d.endpoints, lambda: None)
    assert st.reserve()
    return d, st


def test_runs_that_do_not_fit_fail_the_transfer():
    import pytest

    from kvtransfer.protocol import VERSION, MessageError, Pages, decode, encode
    bad = Pages(VERSION, "r", 0, 0, 0, (0, 2), [1, 2, 3], "float32", [2, 3, 2, 4, 8], 2 * 3 * 2 * 4 * 8 * 4,
                runs=[2, 2])
    with pytest.raises(MessageError, match="runs"):
        decode(encode(bad))
    d, st = _reserved()
    blocks = st.dst_block_ids
    hdr = Pages(VERSION, "r1", 0, 0, 0, (0, H), blocks, "float32", [2, 3, H, BS, D], 2 * 3 * H * BS * D * 4,
                runs=[3])
    d.ranks[0].on_pages(hdr, [memoryview(b"\0" * 10), memoryview(b"\0" * 10)])  # wrong frame sizes
    assert d.ranks[0].metrics["frames_bad"] == 1 and d.bm.num_free_blocks == 16


def test_a_header_of_several_layers_is_checked_whole():
    import msgspec
    import pytest

    from kvtransfer.protocol import MAX_LAYERS, VERSION, MessageError, Pages, decode, encode
    one = 2 * 3 * 2 * 4 * 8 * 4  # one layer's bytes
    good = Pages(VERSION, "r", 0, 0, 0, (0, 2), [1, 2, 3], "float32", [2, 3, 2, 4, 8], 3 * one, runs=[3], num_layers=3)
    assert decode(encode(good)).num_layers == 3
    for bad, why in ((msgspec.structs.replace(good, nbytes=one), "bytes"),
                     (msgspec.structs.replace(good, num_layers=0, nbytes=0), "num_layers"),
                     (msgspec.structs.replace(good, num_layers=MAX_LAYERS + 1, nbytes=(MAX_LAYERS + 1) * one),
                      "num_layers"),
                     (msgspec.structs.replace(good, runs=[], pair="p"), "num_layers")):
        with pytest.raises(MessageError, match=why):
            decode(encode(bad))
    # a message naming a layer the rank does not expect fails the transfer, not the others
    d, st = _reserved()
    hdr = Pages(VERSION, "r1", 0, 0, L - 1, (0, H), st.dst_block_ids, "float32", [2, 3, H, BS, D],
                2 * 2 * 3 * H * BS * D * 4, num_layers=2)  # layers L-1 and L: there is no layer L
    d.ranks[0].on_pages(hdr, [memoryview(b"\0" * (hdr.nbytes // 2))] * 2)
    assert d.ranks[0].metrics["frames_bad"] == 1 and d.bm.num_free_blocks == 16


def test_an_asynchronous_reservation_is_polled_and_an_unreachable_receiver_times_out():
    import time as _t

    from kvtransfer.fake import FakeKVClient, FakeKVNetwork
    from kvtransfer.plan import KVLayout
    from kvtransfer.sender import SendTransfer, TransferState
    lay = KVLayout(2, 2, 4, 4, "float32", 1, 1)
    client = FakeKVClient(FakeKVNetwork(), 0)
    released = []
    st = SendTransfer(client, "r1", 0, 8, lay, lay, ["tcp://nowhere:1"], lambda: released.append(1),
                      reserve_timeout=0.2)
    t0 = _t.monotonic()
    st.start_reserve(now=t0)
    assert st.poll_reserve(now=t0 + 0.1) is None and st.state == TransferState.RESERVING  # not blocking: waiting
    assert st.poll_reserve(now=t0 + 0.3) is False and st.state == TransferState.FAILED
    assert "no answer" in st.reason and released == [1]


def test_an_abort_while_the_ranks_are_told_undoes_the_reservation_on_every_rank():
    """The driver tells its ranks what to expect outside its lock (a follower rank is a round trip
    away); a request aborted meanwhile has had its blocks freed, so the ranks must not go on expecting
    pages into them, and the sender is refused."""
    from kvtransfer.protocol import VERSION, Reserve

    net = FakeKVNetwork()
    d = Decode(net, tp=2)
    told = d.ranks[1].expect

    def expect_then_abort(rid, attempt, *a):  # the requester aborts while rank 1 is being told
        told(rid, attempt, *a)
        d.res.on_abort(rid, attempt, "client went away")
    d.ranks[1].expect = expect_then_abort
    reply = d.res.on_reserve(b"sender", Reserve(VERSION, "r1", 0, 10, layout()))
    assert not reply.ok and reply.reason == "aborted while reserving"
    assert d.res.num_pending == 0 and d.bm.num_free_blocks == 16
    assert all(r.num_pending == 0 for r in d.ranks)
    assert "r1" not in d.ready
    d.ranks[1].expect = told  # a retry is reserved as usual
    assert d.res.on_reserve(b"sender", Reserve(VERSION, "r1", 1, 10, layout())).ok
    assert d.bm.num_free_blocks == 16 - 3 and all(r.num_pending == 1 for r in d.ranks)


def test_an_abort_then_a_rank_that_does_not_answer_leaves_no_rank_expecting():
    """Aborted while rank 0 is told (so the abort cancels the ranks told so far), rank 1 then told
    of the freed blocks, rank 2 answering too late: ranks 1 and 2 must be untold too, not left
    expecting pages into blocks that another request may hold by then."""
    from kvtransfer.protocol import VERSION, Reserve

    net = FakeKVNetwork()
    d = Decode(net, tp=2, pp=2)
    told0, told2 = d.ranks[0].expect, d.ranks[2].expect

    def expect_then_abort(rid, attempt, *a):
        told0(rid, attempt, *a)
        d.res.on_abort(rid, attempt, "client went away")

    def no_answer(*a):  # slow, not dead: it takes the Expect after its driver gave up waiting
        told2(*a)
        raise TimeoutError("rank 2 did not answer")
    d.ranks[0].expect, d.ranks[2].expect = expect_then_abort, no_answer
    reply = d.res.on_reserve(b"sender", Reserve(VERSION, "r1", 0, 10, layout()))
    assert not reply.ok and "not ready" in reply.reason
    assert d.res.num_pending == 0 and d.bm.num_free_blocks == 16
    assert [r.num_pending for r in d.ranks] == [0, 0, 0, 0]


def test_pages_that_cannot_be_handed_over_fail_that_transfer_only():
    """A send that raises (a torch.distributed pairing that timed out, a dead peer's group) runs inside
    the prefill's forward: it must fail its own transfer, not the forward or the batch's other ones."""
    net = FakeKVNetwork()
    d = Decode(net, timeout=0.05)
    client = FakeKVClient(net, 0)
    send = client.send_pages

    def flaky(endpoint, header, payload, cache=None):
        if header.request_id == "r1":
            raise TimeoutError("no PairInfo within 5.0 s")
        send(endpoint, header, payload, cache)
    client.send_pages = flaky
    released = []
    st1 = SendTransfer(client, "r1", 0, 10, layout(), d.layout, d.endpoints, lambda: released.append(1),
                       ack_timeout=0.2)
    st2 = SendTransfer(client, "r2", 0, 10, layout(), d.layout, d.endpoints, lambda: released.append(2))
    assert st1.reserve() and st2.reserve()
    full = RankCaches(src_caches(), 0, 0)
    t1, t2 = st1.outgoing(0, client, full, [1, 2, 3]), st2.outgoing(0, client, full, [4, 5, 6])
    for layer in range(L):  # as the forward calls back after each layer
        t1.send_layer(layer)
        t2.send_layer(layer)
    assert "TimeoutError" in t1.failed and not t2.failed
    assert client.metrics["transfers_send_failed"] == 1  # the first failure; later layers are skipped
    assert st2.finish() and st2.state == TransferState.DONE
    time.sleep(0.06)
    d.res.expire(time.monotonic())
    for r in d.ranks:
        r.expire(time.monotonic())
    assert not st1.finish() and sorted(released) == [1, 2]
    assert d.bm.num_free_blocks == 16 - 3 and d.res.num_pending == 0  # r2's blocks are held for its decode


def test_a_receiver_that_does_not_pair_is_not_asked_again_at_once():
    """torch.distributed pairing with a receiver that does not answer fails within the handshake's
    wait, and sends to it fail at once for a while after (no stall of every prefill that ships there)."""
    from kvtransfer.zmq_transport import KVClient

    with socket.socket() as s:  # a port nobody serves
        s.bind(("127.0.0.1", 0))
        endpoint = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    client = KVClient(0, dist_backend="gloo", dist_timeout=5.0)
    client.start()
    try:
        t0 = time.monotonic()
        with pytest.raises(TimeoutError, match="no PairInfo"):
            client.connect(endpoint, timeout=0.3)
        assert 0.25 < time.monotonic() - t0 < 3
        t0 = time.monotonic()
        with pytest.raises(ConnectionError, match="failed"):
            client.connect(endpoint)
        assert time.monotonic() - t0 < 0.1
    finally:
        client.stop()


def test_a_failed_pair_group_is_dropped_and_what_was_queued_for_it_is_not_sent():
    """A send through a torch.distributed pair group fails (the receiver died): the group is dropped
    (the next send pairs anew), and payloads still queued for it send no header either (the receiver
    would block waiting for a payload that never comes)."""
    from kvtransfer.paths import DistPath
    from kvtransfer.zmq_transport import KVClient

    class Pairs:
        def __init__(self):
            self.groups, self.sent = {"ep"}, []

        def has(self, endpoint):
            return endpoint in self.groups

        def drop(self, endpoint):
            self.groups.discard(endpoint)

        def send(self, endpoint, payload, tag):
            if tag == 2:
                raise RuntimeError("Connection closed by peer")
            self.sent.append(tag)

    client = KVClient(0)  # not started: the path's _send is called here as the I/O thread would
    heads = []
    path = DistPath(client, Pairs())
    path._pair_ids = {"ep": "p1"}
    client._sock = lambda endpoint: type("Sock", (), {"send": staticmethod(heads.append)})
    try:
        path._send("ep", "p1", b"h1", None, 1, 10)
        with pytest.raises(RuntimeError):
            path._send("ep", "p1", b"h2", None, 2, 10)
        path._send("ep", "p1", b"h3", None, 3, 10)  # queued behind the failure: dropped
        assert heads == [b"h1", b"h2"] and path.pairs.sent == [1] and not path.pairs.has("ep")
        assert client.metrics["dist_send_failed"] == 1 and client.metrics["dist_send_dropped"] == 1
        path.pairs.groups.add("ep")
        path._pair_ids["ep"] = "p2"  # paired anew: a message queued for the old pair still goes nowhere
        path._send("ep", "p1", b"h4", None, 4, 10)
        path._send("ep", "p2", b"h5", None, 5, 10)
        assert heads == [b"h1", b"h2", b"h5"] and path.pairs.sent == [1, 5]
    finally:
        client.ctx.term()


class _SlowCancelRank:
    """A follower rank whose cancel blocks until released (a dead follower's bounded wait)."""

    def __init__(self, rank):
        self.rank = rank
        self.cancelling = threading.Event()
        self.release = threading.Event()

    def expect(self, *a):
        pass

    def cancel(self, request_id, attempt):
        self.cancelling.set()
        assert self.release.wait(10)


def _reserve(res, rid, attempt=0):
    spec = KVLayoutSpec(L, H, D, BS, "float32")
    return res.on_reserve(b"s", Reserve(VERSION, rid, attempt, 8, spec))


def test_a_slow_follower_cancel_holds_no_lock_and_a_newer_attempt_waits_for_it():
    bm = BlockManager(16, BS, enable_prefix_caching=False)
    pool = BlockPoolReserver(bm)
    slow = _SlowCancelRank(0)
    acks, reserved_at = [], {}

    def reserve(rid, n, attempt, *prefix):
        reserved_at[(rid, attempt)] = slow.cancelling.is_set() and not slow.release.is_set()
        return pool.reserve(rid, n, attempt, *prefix)
    res = Reservations(layout(), [slow], reserve, pool.release, lambda s, a: acks.append(a))
    assert _reserve(res, "a").ok and _reserve(res, "b").ok
    aborter = threading.Thread(target=res.on_abort, args=("a", 0, "client left", True))
    aborter.start()
    assert slow.cancelling.wait(5)
    # while a's cancel waits on the follower, other requests go on (the lock is free) ...
    t0 = time.monotonic()
    res.on_rank_done("b", 0, 0, True, "")
    assert _reserve(res, "c").ok and time.monotonic() - t0 < 1
    assert [a.request_id for a in acks] == ["b"]
    # ... and a newer attempt of a waits until its old blocks are free
    newer = []
    t = threading.Thread(target=lambda: newer.append(_reserve(res, "a", 1)))
    t.start()
    time.sleep(0.2)
    assert not newer and ("a", 1) not in reserved_at
    slow.release.set()
    aborter.join(5)
    t.join(5)
    assert newer[0].ok and reserved_at[("a", 1)] is False
    assert [(a.request_id, a.ok) for a in acks] == [("b", True), ("a", False)]
