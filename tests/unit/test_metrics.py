"""Metrics through prometheus_client: names under tandem_, one registry per service, and per-worker
series that leave /metrics with their worker."""

from types import SimpleNamespace

from prometheus_client.parser import text_string_to_metric_families

from common.metrics import Metrics
from coordinator.status import WorkerCollector


def samples(m: Metrics) -> dict:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(m.render().decode()) for s in f.samples}


def test_names_labels_and_escaping():
    m = Metrics()
    c = m.counter("requests", "finished requests", ["endpoint"])
    h = m.histogram("ttft_seconds", "time to first token")
    c.labels(endpoint='chat "x"\n').inc(2)
    h.observe(0.02)
    got = samples(m)
    assert got[("tandem_requests_total", (("endpoint", 'chat "x"\n'),))] == 2
    assert got[("tandem_ttft_seconds_count", ())] == 1
    assert got[("tandem_ttft_seconds_bucket", (("le", "0.025"),))] == 1
    assert not any(name.endswith("_created") for name, _ in got)
    assert samples(Metrics()) == {}  # another service's registry is its own


def worker(role, load=None, draining=False):
    return SimpleNamespace(info=SimpleNamespace(role=role), load=load, draining=draining)


def test_worker_series_follow_the_live_view():
    load = SimpleNamespace(ttft_met=3, ttft_total=4, tpot_met=0, tpot_total=0, prompt_tokens_total=1000,
                           prefix_hit_tokens_total=800, kv_sent_bytes_total=4096, kv_received_bytes_total=0,
                           spec_proposed_tokens_total=40, spec_accepted_tokens_total=25)
    coord = SimpleNamespace(view=SimpleNamespace(workers={"p0": worker("prefill", load), "d0": worker("decode")}),
                            state=SimpleNamespace(suspect=set()))
    m = Metrics()
    m.register(WorkerCollector(coord))
    got = samples(m)
    assert got[("tandem_worker_slo_attainment", (("slo", "ttft"), ("worker", "p0")))] == 0.75
    assert ("tandem_worker_slo_attainment", (("slo", "tpot"), ("worker", "p0"))) not in got  # no such requests
    assert got[("tandem_workers", (("role", "prefill"), ("state", "live")))] == 1
    assert got[("tandem_workers", (("role", "decode"), ("state", "starting")))] == 1
    # the KV-aware cluster's counters, carried in heartbeats, under the names the issue fixes
    assert got[("tandem_worker_prompt_tokens_total", (("worker", "p0"),))] == 1000
    assert got[("tandem_worker_prefix_cache_hit_tokens_total", (("worker", "p0"),))] == 800
    assert got[("tandem_worker_kv_sent_bytes_total", (("worker", "p0"),))] == 4096
    assert got[("tandem_worker_spec_proposed_tokens_total", (("worker", "p0"),))] == 40
    assert got[("tandem_worker_spec_accepted_tokens_total", (("worker", "p0"),))] == 25
    assert got[("tandem_worker_kv_received_bytes_total", (("worker", "p0"),))] == 0
    assert not any(dict(labels).get("worker") == "d0" for _, labels in got)  # no load heard yet: no series

    coord.state.suspect.add("p0")
    assert samples(m)[("tandem_workers", (("role", "prefill"), ("state", "suspect")))] == 1
    del coord.view.workers["p0"]  # it died: its series go with it, its role's counts read 0
    got = samples(m)
    assert not any(name == "tandem_worker_slo_attainment" for name, _ in got)
    assert not any(dict(labels).get("worker") == "p0" for _, labels in got)
    assert got[("tandem_workers", (("role", "prefill"), ("state", "suspect")))] == 0
