"""The coordinator's view for `GET /v1/cluster` and `cluster status`: workers with their state, load
and SLO attainment (from heartbeats), the leader, the policy and SLOs, the gateways, recent events.
Torch-free."""

from __future__ import annotations

import time
from collections import Counter
from typing import TYPE_CHECKING

import msgspec
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from common.metrics import Collector

if TYPE_CHECKING:
    from coordinator.server import Coordinator


ROLES = ("prefill", "decode", "colocated")
STATES = ("live", "suspect", "draining", "starting")


def worker_state(coord: Coordinator, wid: str, v) -> str:
    if v.draining:
        return "draining"
    if wid in coord.state.suspect:
        return "suspect"
    return "starting" if v.load is None else "live"


def cluster_status(coord: Coordinator) -> dict:
    """Workers (role, shape, state, load, SLO attainment), leader, policy, SLOs, gateways, recent events."""
    now = time.monotonic()
    workers = []
    for wid, v in sorted(coord.view.workers.items()):
        state = worker_state(coord, wid, v)
        i = v.info
        workers.append({
            "worker_id": wid, "role": i.role, "model": i.model, "tp": i.tp, "pp": i.pp, "state": state,
            "endpoint": i.endpoint, "pid": i.pid, "kv_capacity_tokens": i.kv_capacity_tokens,
            "last_heartbeat_s": round(now - v.heard_at, 3),
            "load": msgspec.to_builtins(v.load) if v.load is not None else None,
            "pending_placements": len(v.pending),
            "kv_blocks": coord.kv_index.held_by(wid),  # prefix-cache blocks the KV index has of it
            "kv_hash_root": i.kv_hash_root, "block_size": i.block_size,
            "kv_bytes_per_token": i.layout.token_bytes(),  # every layer, K and V
            "dtype": i.layout.dtype,  # what `--dtype auto` resolved to on the worker's host
            "slo_attainment": _attainment(v.load),
            "prefix_cache_hit_rate": _hit_rate(v.load),
            "spec_acceptance_rate": _acceptance(v.load),
        })
    c = coord.config
    return {
        "cluster": c.cluster, "coordinator_id": c.coordinator_id, "is_leader": coord.is_leader,
        "leader": msgspec.to_builtins(coord.leader_info) if coord.leader_info else None,
        "policy": coord.policy.name, "slo": {"ttft_ms": c.ttft_ms, "tpot_ms": c.tpot_ms,
                                            "classes": {k: {"ttft_ms": v[0], "tpot_ms": v[1]}
                                                        for k, v in c.slo_classes.items()}},
        "suspect_after_s": c.suspect_after, "kv_aware": c.kv_aware, "local_prefill_tokens": c.local_prefill_tokens,
        "kv_bandwidth_gb_s": c.kv_bandwidth_gb_s, "workers": workers, "gateways": _gateways(coord),
        "events": [msgspec.to_builtins(e) for e in list(coord.state.events)[-20:]],
    }


def _slo_counts(load, kind: str) -> tuple[int, int]:
    """(met, total) of the worker's requests over the last minute with a `kind` ("ttft" | "tpot") SLO."""
    return (getattr(load, f"{kind}_met"), getattr(load, f"{kind}_total")) if load else (0, 0)


def _acceptance(load) -> float | None:
    """Speculative decoding: the share of a worker's guesses that held; None before it made any."""
    if load is None or not load.spec_proposed_tokens_total:
        return None
    return round(load.spec_accepted_tokens_total / load.spec_proposed_tokens_total, 4)


def _hit_rate(load) -> float | None:
    """Of the prompt tokens the worker was asked for since it started, the share its cache held."""
    if load is None or not load.prompt_tokens_total:
        return None
    return round(load.prefix_hit_tokens_total / load.prompt_tokens_total, 4)


def _attainment(load) -> dict:
    """{ttft, ttft_requests, tpot, tpot_requests}: the worker's own view over the last minute
    (attainment None when none of its requests had that SLO)."""
    out = {}
    for kind in ("ttft", "tpot"):
        met, total = _slo_counts(load, kind)
        out[kind] = round(met / total, 4) if total else None
        out[f"{kind}_requests"] = total
    return out


def _gateways(coord: Coordinator) -> list[dict]:
    out = []
    for _key, value in sorted(coord.gateway_mirror.items.items()):
        try:
            g = msgspec.json.decode(value)
            out.append({k: g.get(k) for k in ("gateway_id", "url", "model", "pid")})
        except (msgspec.DecodeError, AttributeError):
            continue
    return out


class WorkerCollector(Collector):
    """The coordinator's per-worker series, read from its live view at each scrape: a worker that leaves
    the view leaves /metrics with it (a gauge set once would keep its last value forever)."""

    def __init__(self, coord: Coordinator):
        self.coord = coord

    def collect(self):
        coord = self.coord
        counts = Counter((v.info.role, worker_state(coord, wid, v)) for wid, v in coord.view.workers.items())
        workers = GaugeMetricFamily("tandem_workers", "workers in the live view", labels=["role", "state"])
        for role in ROLES:
            for state in STATES:
                workers.add_metric([role, state], counts.get((role, state), 0))
        slo = GaugeMetricFamily("tandem_worker_slo_attainment", "share of a worker's requests of the last "
                                "minute that met their TTFT (prefill) or TPOT (decode) SLO", labels=["worker", "slo"])
        for wid, v in sorted(coord.view.workers.items()):
            for kind in ("ttft", "tpot"):
                met, total = _slo_counts(v.load, kind)
                if total:
                    slo.add_metric([wid, kind], met / total)
        yield workers
        yield slo
        loads = [(wid, v.load) for wid, v in sorted(coord.view.workers.items()) if v.load is not None]
        for name, field, text in _WORKER_COUNTERS:
            family = CounterMetricFamily(f"tandem_worker_{name}", text, labels=["worker"])
            for wid, load in loads:
                family.add_metric([wid], getattr(load, field))
            yield family


# per-worker counters carried in heartbeats: (series name, Load field, help)
_WORKER_COUNTERS = (
    ("prompt_tokens", "prompt_tokens_total", "prompt tokens a worker was asked to prefill, or to receive or hold "
     "for decode"),
    ("prefix_cache_hit_tokens", "prefix_hit_tokens_total", "of those, tokens whose KV the worker's prefix cache "
     "already held"),
    ("kv_received_bytes", "kv_received_bytes_total", "KV page bytes a worker received over the network"),
    ("kv_sent_bytes", "kv_sent_bytes_total", "KV page bytes a worker sent over the network"),
    ("spec_proposed_tokens", "spec_proposed_tokens_total", "speculative decoding: guessed tokens a worker verified"),
    ("spec_accepted_tokens", "spec_accepted_tokens_total", "of those, guesses that held (the acceptance rate is "
     "their ratio)"))
