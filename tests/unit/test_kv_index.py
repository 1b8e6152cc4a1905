"""The coordinator's cluster-wide KV index (coordinator/kv_index.py), against a brute-force model,
and the engine's event log that feeds it (engine/block_manager.py)."""

import random

import pytest

from common.coordinator_protocol import VERSION, KVEvents, MessageError, decode_beat, encode
from coordinator.kv_index import KVIndex
from engine.block_manager import BlockManager, KVEventLog, hash_block_tokens
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence


def ev(wid, seq, stored=(), removed=(), inc=1, snapshot=False, part=0, parts=1):
    return KVEvents(VERSION, wid, inc, seq, list(stored), list(removed), snapshot, part, parts)


def brute_match(held: dict[str, set], hashes: list[int]) -> dict[str, int]:
    out = {}
    for w, s in held.items():
        k = 0
        while k < len(hashes) and hashes[k] in s:
            k += 1
        if k:
            out[w] = k
    return out


def test_match_equals_a_brute_force_scan_under_random_events():
    rng = random.Random(7)
    idx, model = KVIndex(), {}
    seqs = {}
    chains = [[rng.getrandbits(64) for _ in range(12)] for _ in range(5)]  # five prompts' block hashes
    for _ in range(400):
        w = f"w{rng.randrange(4)}"
        chain = rng.choice(chains)
        k = rng.randrange(1, len(chain) + 1)
        stored = chain[:k] if rng.random() < 0.6 else []
        removed = rng.sample(chain, rng.randrange(0, 4)) if rng.random() < 0.5 else []
        removed = [h for h in removed if h not in stored]
        seqs[w] = seqs.get(w, 0) + 1
        assert idx.apply(ev(w, seqs[w], stored, removed))
        s = model.setdefault(w, set())
        s -= set(removed)
        s |= set(stored)
        for c in chains:
            for n in (1, 5, 12):
                assert idx.match(c[:n]) == brute_match(model, c[:n])
    assert len(idx) == sum(len(s) for s in model.values())
    assert idx.match(chains[0], workers=["w0"]) == {k: v for k, v in brute_match(model, chains[0]).items()
                                                     if k == "w0"}


def test_reordered_duplicated_and_restarted_streams_only_cost_hits():
    idx = KVIndex()
    assert idx.apply(ev("a", 1, stored=[1, 2, 3]))
    assert idx.apply(ev("a", 3, removed=[3]))  # seq 2 lost: applied, counted as a gap
    assert idx.metrics["kv_events_gaps"] == 1
    assert not idx.apply(ev("a", 2, stored=[3]))  # the late one must not bring 3 back
    assert not idx.apply(ev("a", 3, removed=[1]))  # a duplicate
    assert idx.match([1, 2, 3]) == {"a": 2}
    assert not idx.apply(ev("a", 9, stored=[7], inc=0))  # an older incarnation's straggler
    assert idx.apply(ev("a", 1, stored=[1], inc=2))  # restarted: what it held before is gone
    assert idx.match([1, 2]) == {"a": 1} and idx.held_by("a") == 1
    # a snapshot (split in two parts) replaces everything known of the worker
    assert idx.apply(ev("a", 2, stored=[5], inc=2, snapshot=True, part=0, parts=2))
    assert idx.apply(ev("a", 3, stored=[6], inc=2, snapshot=True, part=1, parts=2))
    assert idx.match([1]) == {} and idx.match([5, 6]) == {"a": 2}
    idx.forget("a")
    assert len(idx) == 0 and idx.match([5]) == {}


def test_memory_is_bounded_per_worker_oldest_first():
    idx = KVIndex(max_per_worker=3)
    idx.apply(ev("a", 1, stored=[1, 2, 3, 4, 5]))
    assert idx.held_by("a") == 3 and idx.match([3, 4, 5]) == {"a": 3} and idx.match([1]) == {}
    assert idx.metrics["kv_entries_dropped"] == 2


def test_malformed_kv_events_are_message_errors():
    for bad in (ev("a", 1, stored=[1], parts=2),  # split but not a snapshot
                ev("a", 1, stored=[1], snapshot=True, part=2, parts=2)):
        try:
            decode_beat(encode(bad))
        except MessageError:
            continue
        raise AssertionError(f"accepted {bad}")
    raw = encode(ev("a", 1, stored=[1]))
    try:
        decode_beat(raw.replace(b"stored", b"stoned"))
    except MessageError:
        pass
    assert decode_beat(encode(ev("a", 1, stored=[2**64 - 1]))).stored == [2**64 - 1]


def test_block_manager_logs_what_enters_and_leaves_its_prefix_cache():
    bm = BlockManager(4, 2)
    bm.events = KVEventLog()
    seq = Sequence("r", 0, [1, 2, 3, 4, 5], 5, SamplingParams())
    assert bm.allocate_slots(seq, 5)
    seq.num_computed_tokens = 5
    bm.cache_full_blocks(seq)
    h0 = hash_block_tokens(bm.root_hash, [1, 2])
    h1 = hash_block_tokens(h0, [3, 4])
    assert bm.events.drain() == ([h0, h1], [], False) and sorted(bm.cached_hashes()) == sorted([h0, h1])
    bm.free(seq)
    other = Sequence("s", 0, [9] * 8, 8, SamplingParams())
    assert bm.allocate_slots(other, 8)  # takes every block: the cached ones are evicted
    stored, removed, overflowed = bm.events.drain()
    assert stored == [] and sorted(removed) == sorted([h0, h1]) and not overflowed
    assert bm.cached_hashes() == []


def test_event_log_keeps_each_hash_last_change_and_overflows_to_a_snapshot():
    log = KVEventLog(max_events=3)
    log.stored(1)
    log.removed(1)
    log.stored(2)
    assert log.drain() == ([2], [1], False)
    for h in range(5):
        log.stored(h)
    assert log.drain() == ([], [], True) and log.drain() == ([], [], False)


def test_heartbeat_publishes_a_snapshot_first_then_deltas_and_a_snapshot_when_asked(monkeypatch):
    from types import SimpleNamespace

    from common.heartbeat import Heartbeat
    from common.registry import Registry

    class Recorder(Registry):
        def __init__(self):
            self.sent, self.want = [], False

        def kv_events(self, stored, removed, snapshot):
            self.sent.append((sorted(stored), sorted(removed), snapshot))

        def kv_snapshot_wanted(self):
            return self.want

    bm = BlockManager(8, 2)
    stats = {"num_waiting": 0, "num_running": 0, "num_free_blocks": 8, "num_blocks": 8, "num_queued_tokens": 0}
    engine = SimpleNamespace(block_manager=bm, stats=lambda: stats)
    class Lock:  # records that the block manager is read under the worker's lock
        held = entered = 0

        def __enter__(self):
            self.held, self.entered = 1, self.entered + 1

        def __exit__(self, *exc):
            self.held = 0

    lock = Lock()
    reg = Recorder()
    hb = Heartbeat(reg, "w", interval=0.0, kv_lock=lock)
    drain = KVEventLog.drain
    monkeypatch.setattr(KVEventLog, "drain",
                        lambda log: drain(log) if lock.held else pytest.fail("drained without the lock"))

    def compute(rid, tokens):
        seq = Sequence(rid, 0, tokens, len(tokens), SamplingParams())
        assert bm.allocate_slots(seq, len(tokens))
        seq.num_computed_tokens = len(tokens)
        bm.cache_full_blocks(seq)
        return seq

    compute("a", [1, 2, 3, 4])
    hb.maybe_beat(engine, now=1.0)
    h0 = hash_block_tokens(bm.root_hash, [1, 2])
    h1 = hash_block_tokens(h0, [3, 4])
    assert reg.sent == [(sorted([h0, h1]), [], True)]  # the first publication is a snapshot
    compute("b", [1, 2, 5, 6])
    hb.maybe_beat(engine, now=2.0)
    assert reg.sent[-1] == ([hash_block_tokens(h0, [5, 6])], [], False)
    hb.maybe_beat(engine, now=3.0)
    assert len(reg.sent) == 2  # nothing changed: nothing sent
    reg.want = True
    hb.maybe_beat(engine, now=4.0)
    assert reg.sent[-1][2] and len(reg.sent[-1][0]) == 3
    assert lock.entered == 4


def test_a_delta_always_fits_one_kv_events_message():
    from common.coordinator_protocol import MAX_KV_EVENTS
    assert KVEventLog().max_events <= MAX_KV_EVENTS


def test_a_cache_blind_coordinator_ignores_the_index():
    """kv_aware = false (the cache-blind baseline): the coordinator keeps the index, for status, but
    places as if no worker held anything; otherwise only workers whose hashes chain the same way count."""
    from common.coordinator_protocol import Place
    from common.kv_layout import KVLayoutSpec
    from common.registry import WorkerInfo
    from coordinator.server import Coordinator, CoordinatorConfig

    for aware in (True, False):
        coord = Coordinator(CoordinatorConfig(["http://e:2379"], kv_aware=aware))
        for wid, root in (("p0", 5), ("p1", 6)):
            coord.view.registered(WorkerInfo(wid, "prefill", "m", 1, 1, 16, 4096, "tcp://x", [],
                                             KVLayoutSpec(30, 3, 64, 16, "float32"), 1, 0.1, kv_hash_root=root), 0.0)
            assert coord.kv_index.apply(ev(wid, 1, stored=[11, 12, 13], snapshot=True))
        got = coord._cached(Place(VERSION, "r", "m", 60, 1, block_hashes=[11, 12, 14], hash_root=5, block_size=16))
        assert got == ({"p0": 32} if aware else {})
        assert coord.policy.local_prefill_tokens == (None if aware else 0)
