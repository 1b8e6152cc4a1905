"""The coordinator as a real process against a real etcd, with real workers (tiny model): failure
detection and events, leader election and fencing, etcd restarts and member loss, malformed input."""

import os
import signal
import threading
import time

import pytest
import zmq
from live_cluster import LiveCluster, get_json

from cluster.etcd_server import start_cluster
from common.coordinator_protocol import VERSION, Place, Placed, Rejected, decode_event, decode_reply, encode

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
def live(tmp_path, tiny_llama):
    c = LiveCluster(tmp_path, tiny_llama)
    yield c
    c.close()


class Events:
    """Collects WorkerEvents from coordinators' PUB sockets on a thread."""

    def __init__(self, *endpoints):
        self.sock = zmq.Context.instance().socket(zmq.SUB)
        self.sock.setsockopt(zmq.SUBSCRIBE, b"")
        self.sock.setsockopt(zmq.LINGER, 0)
        for ep in endpoints:
            self.sock.connect(ep)
        self.got = []
        self._stop = False
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        while not self._stop:
            if self.sock.poll(50):
                self.got.append((time.monotonic(), decode_event(self.sock.recv())))

    def wait(self, worker_id, state, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for t, ev in self.got:
                if ev.worker_id == worker_id and ev.state == state:
                    return t
            time.sleep(0.01)
        raise AssertionError(f"no {state} event for {worker_id} within {timeout} s; got {self.got}")

    def close(self):
        self._stop = True
        self._t.join(2)
        self.sock.close(0)


class Placer:
    def __init__(self, endpoint):
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.n = 0

    def place(self, timeout=1.0, **kw):
        self.n += 1
        req = dict(prompt_tokens=10, max_tokens=5) | kw
        model = req.pop("model", "")
        self.sock.send(encode(Place(VERSION, f"t-{self.n}", model, **req)))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.sock.poll(50):
                reply = decode_reply(self.sock.recv())
                if reply.request_id == f"t-{self.n}":
                    return reply
        return None

    def close(self):
        self.sock.close(0)


def wait_for(pred, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def workers_of(coord):
    return {w["worker_id"]: w for w in get_json(coord.info["admin"] + "/v1/cluster")["workers"]}


def all_live(coord, n):
    ws = workers_of(coord)
    return len(ws) == n and all(w["state"] == "live" for w in ws.values())


def test_killed_worker_is_suspect_within_1_5_s_then_dead_and_gets_no_work(live):
    coord = live.coordinator()
    events = Events(coord.info["events"])
    p = live.worker("prefill", "p0")
    d0 = live.worker("decode", "d0")
    d1 = live.worker("decode", "d1")
    try:
        wait_for(lambda: all_live(coord, 3), 10, "three live workers")
        placer = Placer(coord.info["placement"])
        assert isinstance(placer.place(), Placed)
        os.kill(d0.pid, signal.SIGKILL)
        t_kill = time.monotonic()
        t_suspect = events.wait("d0", "suspect", 3.0)
        assert t_suspect - t_kill <= 1.5, f"suspect after {t_suspect - t_kill:.2f} s"
        for _ in range(10):  # a suspect gets no new work
            r = placer.place()
            assert isinstance(r, Placed) and r.decode.worker_id == "d1", r
        t_dead = events.wait("d0", "dead", 6.0)  # lease TTL 2 s
        assert t_dead > t_suspect
        assert set(workers_of(coord)) == {"p0", "d1"}
        placer.close()
    except BaseException:
        print(live.logs())
        raise
    finally:
        events.close()
    assert p.alive() and d1.alive()


def leader_of(coords):
    for c in coords:
        if not c.alive():
            continue
        try:
            if get_json(c.info["admin"] + "/health", timeout=1)["is_leader"]:
                return c
        except OSError:
            continue
    return None


def test_leader_failover_within_3_s_and_a_revived_leader_stays_deposed(live):
    coords = [live.coordinator(f"coord-{i}") for i in range(3)]
    live.worker("prefill", "p0")
    live.worker("decode", "d0")
    placers = {c.name: Placer(c.info["placement"]) for c in coords}
    try:
        first = wait_for(lambda: leader_of(coords), 10, "a leader")
        wait_for(lambda: isinstance(placers[first.name].place(), Placed), 10, "a placement")
        standby = next(c for c in coords if c is not first)
        assert placers[standby.name].place().code == "not_leader"

        # the leader freezes (SIGSTOP): a standby takes over within 3 s (lease TTL 2 s)
        os.kill(first.pid, signal.SIGSTOP)
        t0 = time.monotonic()
        try:
            def serving():
                for c in coords:
                    if c is not first:
                        r = placers[c.name].place(timeout=0.3)
                        if isinstance(r, Placed):
                            return c
                return None
            second = wait_for(serving, 5, "a new leader serving placements")
            assert time.monotonic() - t0 <= 3.0, f"takeover took {time.monotonic() - t0:.2f} s"
        finally:
            os.kill(first.pid, signal.SIGCONT)
        # revived, the old leader finds its lease gone and does not act as leader
        time.sleep(1.0)
        assert get_json(first.info["admin"] + "/health")["is_leader"] is False
        r = placers[first.name].place()
        assert isinstance(r, Rejected) and r.code == "not_leader", r
        assert leader_of(coords) is second

        # kill -9 of the new leader: the last replica takes over
        os.kill(second.pid, signal.SIGKILL)
        t0 = time.monotonic()
        third = wait_for(lambda: next((c for c in coords if c.alive() and isinstance(
            placers[c.name].place(timeout=0.3), Placed)), None), 5, "a third leader")
        assert time.monotonic() - t0 <= 3.0
        assert third is not second
    except BaseException:
        print(live.logs())
        raise
    finally:
        for p in placers.values():
            p.close()


def test_etcd_restart_sessions_recover_without_duplicate_or_lost_registrations(live):
    coord = live.coordinator()
    events = Events(coord.info["events"])
    live.worker("prefill", "p0")
    live.worker("decode", "d0")
    try:
        wait_for(lambda: all_live(coord, 2), 10, "two live workers")
        live.etcds[0].restart()
        time.sleep(4.0)  # longer than the lease TTL: sessions must have re-established
        ws = workers_of(coord)
        assert sorted(ws) == ["d0", "p0"] and all(w["state"] == "live" for w in ws.values()), ws
        # the registrations came back through a new list/watch, without a dead event in between...
        assert not [ev for _, ev in events.got if ev.state == "dead"], events.got
        # ...and the watch works again: a worker that joins now is seen, one that leaves is gone
        live.worker("decode", "d1")
        wait_for(lambda: "d1" in workers_of(coord), 10, "d1 registered after the restart")
        live.procs[-1].stop()
        wait_for(lambda: "d1" not in workers_of(coord), 10, "d1 deregistered")
        placer = Placer(coord.info["placement"])
        assert isinstance(placer.place(), Placed)
        placer.close()
    except BaseException:
        print(live.logs())
        raise
    finally:
        events.close()


def test_a_3_member_etcd_losing_one_member_is_invisible_to_placement(tmp_path, tiny_llama):
    members = start_cluster(3, tmp_path / "etcd")
    live = LiveCluster(tmp_path, tiny_llama, etcd=members)
    try:
        coord = live.coordinator()
        events = Events(coord.info["events"])
        live.worker("prefill", "p0")
        live.worker("decode", "d0")
        wait_for(lambda: all_live(coord, 2), 10, "two live workers")
        placer = Placer(coord.info["placement"])
        members[0].kill()  # the member every session connected to first
        t_end = time.monotonic() + 4.0
        n = 0
        while time.monotonic() < t_end:
            r = placer.place()
            assert isinstance(r, Placed), r
            n += 1
            time.sleep(0.05)
        assert n > 20
        assert not [ev for _, ev in events.got if ev.state in ("suspect", "dead")], events.got
        assert get_json(coord.info["admin"] + "/health")["is_leader"]
        placer.close()
        events.close()
    except BaseException:
        print(live.logs())
        raise
    finally:
        live.close()
        for m in members:
            m.kill()


def test_malformed_messages_are_dropped_and_counted(live):
    coord = live.coordinator()
    ctx = zmq.Context.instance()
    dealer = ctx.socket(zmq.DEALER)
    dealer.connect(coord.info["placement"])
    push = ctx.socket(zmq.PUSH)
    push.connect(coord.info["heartbeats"])
    try:
        for junk in (b"", b"\x00garbage", encode({"v": 1, "type": "place"}), b"\xc1" * 100):
            dealer.send(junk)
            push.send(junk)
        dealer.send_multipart([b"two", b"frames"])
        push.send(encode(Place(99, "x", "", 1, 1)))  # a valid message of the wrong kind and version

        def counted():
            text = __import__("urllib.request").request.urlopen(coord.info["admin"] + "/metrics").read().decode()
            got = {}
            for line in text.splitlines():
                if line.startswith("tandem_messages_dropped_total{"):
                    got[line.split('"')[1]] = float(line.split()[-1])
            return got if got.get("placement", 0) >= 5 and got.get("heartbeats", 0) >= 5 else None
        wait_for(counted, 5, "dropped messages counted")
        wait_for(lambda: get_json(coord.info["admin"] + "/health")["is_leader"], 10, "the lead")
        placer = Placer(coord.info["placement"])
        r = placer.place()  # still serving: no workers yet, a clean rejection
        assert isinstance(r, Rejected) and r.code == "no_workers", r
        placer.close()
        assert coord.alive()
    finally:
        dealer.close(0)
        push.close(0)


def test_drain_stops_new_work_on_every_replica_and_admin_api_errors_are_openai_shaped(live):
    from live_cluster import post_json
    classes = ("--slo-class", "interactive=0.001:1000", "--slo-class", "chat=60000:")
    coords = [live.coordinator("coord-a", *classes), live.coordinator("coord-b", *classes)]
    live.worker("prefill", "p0")
    live.worker("decode", "d0")
    live.worker("decode", "d1")
    try:
        wait_for(lambda: all_live(coords[0], 3) and all_live(coords[1], 3), 10, "workers")
        leader = wait_for(lambda: leader_of(coords), 10, "a leader")
        standby = next(c for c in coords if c is not leader)
        status, body, _ = post_json(standby.info["admin"] + "/v1/workers/d0/drain")  # through the standby
        assert status == 200 and body == {"worker_id": "d0", "state": "draining"}
        wait_for(lambda: workers_of(leader)["d0"]["state"] == "draining", 5, "the leader honours the drain")
        placer = Placer(leader.info["placement"])
        assert {placer.place().decode.worker_id for _ in range(8)} == {"d1"}
        # named SLO classes: an impossible TTFT is rejected early, batch and a loose class are placed
        r = placer.place(slo_class="interactive")
        assert isinstance(r, Rejected) and r.code == "overloaded" and "TTFT" in r.reason, r
        assert isinstance(placer.place(slo_class="batch"), Placed)
        assert isinstance(placer.place(slo_class="chat"), Placed)
        r = placer.place(slo_class="nope")
        assert isinstance(r, Rejected) and r.code == "bad_request" and "interactive" in r.reason, r
        placer.close()
        status, body, _ = post_json(leader.info["admin"] + "/v1/workers/nope/drain")
        assert status == 404 and body["error"]["code"] == "worker_not_found" and body["error"]["type"]
        assert get_json(leader.info["admin"] + "/openapi.json")["paths"]["/v1/cluster"]
        profiles = get_json(leader.info["admin"] + "/v1/profiles")
        shapes = {k.split("/", 1)[1]: v for k, v in profiles.items()}  # <model>/<role>-tp<T>-pp<P>
        assert shapes["decode-tp1-pp1"]["decode"]["base"] > 0  # measured at start-up, stored in etcd
        assert shapes["prefill-tp1-pp1"]["prefill"]["b"] > 0
        # capacity planning on those profiles: the smallest request the API accepts
        smallest = {"workload": {"rate": 2.0, "prompt_tokens": {"mean": 512}, "output_tokens": {"mean": 128}},
                    "slo": {"ttft_ms": 500, "tpot_ms": 50, "attainment": 0.9}, "budget": {"devices": 8}}
        status, got, _ = post_json(leader.info["admin"] + "/v1/plan", smallest, timeout=120)
        assert status == 200, got
        assert all(got[r]["replicas"] >= 1 and {"tp", "pp"} <= set(got[r]) for r in ("prefill", "decode"))
        assert {"goodput", "attainment"} <= set(got["predicted"]) and "stored profiles" in got["assumptions"][0]
        status, err, _ = post_json(leader.info["admin"] + "/v1/plan", {**smallest, "budget": {"devices": 1}})
        assert status == 422 and err["error"]["param"] == "budget.devices"
        status, err, _ = post_json(leader.info["admin"] + "/v1/plan", b"{nope")
        assert status == 400 and err["error"]["code"] == "invalid_json"
    except BaseException:
        print(live.logs())
        raise


def test_step_times_in_heartbeats_refine_the_stored_cost_model(live):
    """A worker (the real agent; its load samples synthetic) whose steps run 3x slower than its
    profile predicts: the leader stores the rescaled profile, and placements predict with it."""
    from common.agent import EtcdRegistry
    from common.kv_layout import KVLayoutSpec
    from common.registry import Load, WorkerInfo
    coord = live.coordinator()
    prof = {"prefill": {"a": 0.01, "b": 1e-4, "c": 0.0}, "decode": {"base": 0.02, "per_seq": 0.001, "per_token": 1e-7}}
    regs = []
    try:
        for wid, role in (("p0", "prefill"), ("d0", "decode")):
            r = EtcdRegistry([live.etcd_endpoints], live.cluster, ttl=2, interval=0.05)
            r.register(WorkerInfo(wid, role, "m", 1, 1, 16, 65536, f"tcp://127.0.0.1:{9 + len(regs)}", [], KVLayoutSpec(30, 3, 64, 16, "float32"), 1, 0.1,
                                  prof))
            regs.append(r)
        wait_for(lambda: get_json(coord.info["admin"] + "/v1/profiles").get("m/decode-tp1-pp1"), 10, "stored profile")
        deadline = time.monotonic() + 20
        refined = None
        while time.monotonic() < deadline and refined is None:
            # decode: 8 sequences per step, 3x the predicted 28 ms; prefill: as predicted
            regs[1].heartbeat(Load("d0", time.time(), 0, 8, 4000, 4096, 3e3 * (0.02 + 0.001 * 8), 10, 0, 0, 80, 80))
            regs[0].heartbeat(Load("p0", time.time(), 0, 0, 4096, 4096, 1e3 * (0.01 + 1e-4 * 128), 4, 0, 0, 512, 4))
            time.sleep(0.05)
            got = get_json(coord.info["admin"] + "/v1/profiles")["m/decode-tp1-pp1"]
            if got.get("source") == "online refinement":
                refined = got
        assert refined is not None, get_json(coord.info["admin"] + "/v1/profiles")
        assert refined["ratios"]["decode"] == pytest.approx(3.0, rel=0.05)
        assert refined["decode"]["base"] == pytest.approx(0.06, rel=0.05)
        prefill = get_json(coord.info["admin"] + "/v1/profiles")["m/prefill-tp1-pp1"]
        assert prefill.get("source") != "online refinement"  # it agreed with its profile
        placer = Placer(coord.info["placement"])
        r = wait_for(lambda: placer.place(model="m"), 5, "a placement")
        assert isinstance(r, Placed) and r.predicted_tpot_ms == pytest.approx(3e3 * (0.02 + 0.001 * 9), rel=0.1)
        placer.close()
    except BaseException:
        print(live.logs())
        raise
    finally:
        for r in regs:
            r.deregister("x")


def test_placement_follows_the_prefix_a_prefill_worker_cached(live):
    """Workers publish their prefix caches (KVEvents); the coordinator's KV index sends a prompt to the
    prefill worker that holds it, not to the one the queues alone pick; a coordinator started later
    gets the worker's snapshot."""
    from common.sampling import SamplingSpec
    from common.worker_client import WorkerClient
    from engine.block_manager import hash_block_tokens

    coord = live.coordinator()
    procs = {wid: live.worker(role, wid) for role, wid in (("prefill", "p0"), ("prefill", "p1"), ("decode", "d0"))}
    client = WorkerClient()
    try:
        wait_for(lambda: all_live(coord, 3), 20, "three live workers")
        placer = Placer(coord.info["placement"])
        blind = placer.place(prompt_tokens=40, max_tokens=2)  # the queues alone (idle: the tie-break)
        assert isinstance(blind, Placed), blind
        holder = "p1" if blind.prefill.worker_id == "p0" else "p0"
        prompt = list(range(5, 45))  # 10 blocks of 4 tokens
        time.sleep(0.5)  # (the start-up warm-up's blocks, if any, are in by now)
        before = workers_of(coord)[holder]["kv_blocks"]
        client.submit(procs[holder].info, "warm", prompt, SamplingSpec(max_tokens=2, temperature=0.0),
                      procs["d0"].info)
        client.collect(timeout=60)
        assert client.streams["warm"].finish_reason, client.streams["warm"].error
        ws = wait_for(lambda: (lambda w: w if w[holder]["kv_blocks"] >= before + 10 else None)(workers_of(coord)), 5,
                      "the holder's blocks in the KV index")
        root, bs = ws[holder]["kv_hash_root"], ws[holder]["block_size"]
        assert root and bs == 4
        hashes, h = [], root
        for i in range(len(prompt) // bs):
            h = hash_block_tokens(h, prompt[i * bs:(i + 1) * bs])
            hashes.append(h)
        time.sleep(0.6)  # heartbeats since: the blind placement no longer counts in a queue
        cached = placer.place(prompt_tokens=40, max_tokens=2, block_hashes=hashes, hash_root=root, block_size=bs)
        assert isinstance(cached, Placed) and cached.prefill.worker_id == holder, cached
        assert cached.predicted_ttft_ms < blind.predicted_ttft_ms
        time.sleep(0.6)
        other_model = placer.place(prompt_tokens=40, max_tokens=2, block_hashes=hashes, hash_root=root ^ 1,
                                   block_size=bs)  # chained from another root: matches nothing
        assert other_model.prefill.worker_id == blind.prefill.worker_id
        late = live.coordinator("coord-1")  # a new replica learns the caches from the workers' snapshots
        wait_for(lambda: workers_of(late).get(holder, {}).get("kv_blocks", 0) >= before + 10, 10,
                 "a snapshot at coord-1")
        placer.close()
    except BaseException:
        print(live.logs())
        raise
    finally:
        client.close()
