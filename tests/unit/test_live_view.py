from common.kv_layout import KVLayoutSpec
from common.registry import Load, WorkerInfo
from coordinator.live_view import LiveView
from coordinator.policy import PlacementRequest, make_policy


def info(wid, role):
    return WorkerInfo(wid, role, "m", 1, 1, 16, 4096, "tcp://x", [], KVLayoutSpec(30, 3, 64, 16, "float32"), 1, 0.1)


def load(wid, running=0, free=256, queued=0):
    return Load(wid, 0.0, 0, running, free, 256, 10.0, 5, 0, queued)


def test_suspect_after_silence_and_dead_after_deregistration():
    v = LiveView(suspect_after=1.0)
    v.registered(info("p0", "prefill"), now=0.0)
    v.registered(info("d0", "decode"), now=0.0)
    v.heartbeat(load("p0"), now=0.5)
    v.heartbeat(load("d0"), now=0.5)
    assert v.suspects(now=1.2) == []
    v.heartbeat(load("p0"), now=1.4)
    assert v.suspects(now=1.6) == ["d0"]  # silent > 1 s: no new work
    assert [d.healthy for d in v.decode_states(now=1.6)] == [False]
    assert [p.healthy for p in v.prefill_states(now=1.6)] == [True]
    v.heartbeat(load("p0", queued=300), now=1.7)
    assert [p.queued_tokens for p in v.prefill_states(now=1.7)] == [300]
    assert v.deregistered("d0") is not None and v.decode_states(now=2.0) == []
    v.heartbeat(load("d0"), now=2.1)  # a late heartbeat of a dead worker is ignored
    assert "d0" not in v.workers


def test_placements_count_until_a_later_heartbeat_confirms_them():
    v = LiveView()
    for w, r in (("p0", "prefill"), ("p1", "prefill"), ("d0", "decode"), ("d1", "decode")):
        v.registered(info(w, r), now=0.0)
        v.heartbeat(load(w), now=0.0)
    pol = make_policy("least-loaded")
    req = PlacementRequest(100, 20)
    first = pol.place(req, v.prefill_states(0.1), v.decode_states(0.1))
    v.placed(first, req, now=0.1)
    second = pol.place(req, v.prefill_states(0.2), v.decode_states(0.2))
    assert (second.prefill, second.decode) != (first.prefill, first.decode)  # the burst spreads out
    # a heartbeat sampled before the placement does not confirm it; one sampled after does
    v.heartbeat(load(first.decode), now=0.3, sampled_at=0.05)
    assert len(next(d for d in v.decode_states(0.3) if d.worker_id == first.decode).running) == 1
    v.heartbeat(load(first.decode, running=1), now=0.4, sampled_at=0.35)
    d = next(d for d in v.decode_states(0.4) if d.worker_id == first.decode)
    assert len(d.running) == 1 and d.free_tokens == 256 * 16  # now from the worker's own numbers


def test_drained_workers_get_no_new_work():
    v = LiveView()
    v.registered(info("d0", "decode"), now=0.0)
    v.heartbeat(load("d0"), now=0.0)
    assert v.drain("d0") and not v.drain("nope")
    assert [d.healthy for d in v.decode_states(0.1)] == [False]


def test_workers_of_one_shape_share_the_stored_profile_and_colocated_placements_count_once():
    from coordinator.policy import Placement
    v = LiveView()
    fast = {"prefill": {"a": 0.001, "b": 1e-5, "c": 0.0}, "decode": {"base": 0.01, "per_seq": 1e-4, "per_token": 1e-7}}
    slow = {"prefill": {"a": 0.1, "b": 1e-3, "c": 0.0}, "decode": {"base": 0.5, "per_seq": 1e-2, "per_token": 1e-6}}
    for wid, prof in (("d0", fast), ("d1", slow)):
        v.registered(WorkerInfo(wid, "decode", "m", 1, 1, 16, 4096, "tcp://x", [], KVLayoutSpec(30, 3, 64, 16, "float32"), 1, 0.1, prof), now=0.0)
    assert v.decode_costs["d0"] != v.decode_costs["d1"]  # each its own noisy start-up measurement...
    v.shape_profile("m", "decode-tp1-pp1", slow, now=0.0)
    assert v.decode_costs["d0"] == v.decode_costs["d1"]  # ...until the shape's stored one arrives
    v.registered(info("c0", "colocated"), now=0.0)
    v.heartbeat(load("c0"), now=0.0)
    v.placed(Placement("c0", "c0", 0.1, 0.1), PlacementRequest(100, 20), now=0.1)
    assert len(v.workers["c0"].pending) == 1
    assert [d.free_tokens for d in v.decode_states(0.1, ("colocated",))] == [256 * 16 - 100]


def test_a_placement_stops_counting_once_its_prediction_says_it_is_over():
    """Heartbeats are 0.2 s apart; a prompt prefilled in milliseconds must not stay in P's queue (and
    in every later prediction) until the next one, nor a finished request in D's batch."""
    from coordinator.policy import Placement
    v = LiveView()
    for w, r in (("p0", "prefill"), ("d0", "decode")):
        v.registered(info(w, r), now=0.0)
        v.heartbeat(load(w), now=0.0)
    # predicted: first token 0.05 s after placement, then 9 more tokens 0.01 s apart
    v.placed(Placement("p0", "d0", 0.05, 0.01), PlacementRequest(100, 10), now=1.0)
    v.placed(Placement("p0", "d0", 0.08, 0.01), PlacementRequest(50, 10), now=1.0)
    queued = lambda t: [(p.queued_tokens, p.queued_prompts) for p in v.prefill_states(t)]  # noqa: E731
    running = lambda t: [(len(d.running), d.free_tokens) for d in v.decode_states(t)]  # noqa: E731
    assert queued(1.04) == [(150, 2)] and running(1.04) == [(2, 256 * 16 - 150)]
    assert queued(1.055) == [(50, 1)] and queued(1.085) == [(0, 0)]
    assert running(1.12) == [(2, 256 * 16 - 150)] and running(1.145) == [(1, 256 * 16 - 50)]
    assert running(1.175) == [(0, 256 * 16)] and v.workers["p0"].pending == []
    # the indexed records agree with the states
    assert v.workers["p0"].prefill.queued_tokens == 0 and v.workers["d0"].decode.num_running == 0
    # a heartbeat still confirms a placement before its predicted end
    v.placed(Placement("p0", "d0", 0.05, 0.01), PlacementRequest(100, 10), now=2.0)
    v.heartbeat(load("p0", queued=100), now=2.01, sampled_at=2.005)
    assert queued(2.02) == [(100, 1)]  # from the worker's own numbers now
    # which count until the cost model (default: 0.005 s a step + 2e-4 s a token) has them worked
    # through, from when the sample was taken: 2.005 + 0.025
    assert queued(2.029) == [(100, 1)] and queued(2.031) == [(0, 0)]
