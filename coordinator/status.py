"""The coordinator's view for `GET /v1/cluster` and `cluster status`: workers with their state, load
and SLO attainment (from heartbeats), the leader, the policy and SLOs, the gateways, recent events.
Torch-free."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import msgspec

if TYPE_CHECKING:
    from coordinator.server import Coordinator


def cluster_status(coord: Coordinator) -> dict:
    """Workers (role, shape, state, load, SLO attainment), leader, policy, SLOs, gateways, recent events;
    sets the coordinator's worker gauges as it goes."""
    now = time.monotonic()
    workers = []
    counts: dict[tuple[str, str], int] = {}
    for wid, v in sorted(coord.view.workers.items()):
        state = "draining" if v.draining else "suspect" if wid in coord.state.suspect else \
            "starting" if v.load is None else "live"
        counts[(v.info.role, state)] = counts.get((v.info.role, state), 0) + 1
        i = v.info
        workers.append({
            "worker_id": wid, "role": i.role, "model": i.model, "tp": i.tp, "pp": i.pp, "state": state,
            "endpoint": i.endpoint, "pid": i.pid, "kv_capacity_tokens": i.kv_capacity_tokens,
            "last_heartbeat_s": round(now - v.heard_at, 3),
            "load": msgspec.to_builtins(v.load) if v.load is not None else None,
            "pending_placements": len(v.pending),
            "slo_attainment": _attainment(coord, wid, v.load),
        })
    coord.m_workers.values.clear()  # a (role, state) with no worker left reads 0, not its last count
    for role in ("prefill", "decode", "colocated"):
        for state in ("live", "suspect", "draining", "starting"):
            coord.m_workers.set(counts.get((role, state), 0), role=role, state=state)
    c = coord.config
    return {
        "cluster": c.cluster, "coordinator_id": c.coordinator_id, "is_leader": coord.is_leader,
        "leader": msgspec.to_builtins(coord.leader_info) if coord.leader_info else None,
        "policy": coord.policy.name, "slo": {"ttft_ms": c.ttft_ms, "tpot_ms": c.tpot_ms,
                                            "classes": {k: {"ttft_ms": v[0], "tpot_ms": v[1]}
                                                        for k, v in c.slo_classes.items()}},
        "suspect_after_s": c.suspect_after, "workers": workers, "gateways": _gateways(coord),
        "events": [msgspec.to_builtins(e) for e in list(coord.state.events)[-20:]],
    }

def _attainment(coord: Coordinator, wid: str, load) -> dict:
    """{ttft, ttft_requests, tpot, tpot_requests}: the worker's own view over the last minute
    (attainment None when none of its requests had that SLO)."""
    out = {}
    for kind in ("ttft", "tpot"):
        met, total = (getattr(load, f"{kind}_met"), getattr(load, f"{kind}_total")) if load else (0, 0)
        out[kind] = round(met / total, 4) if total else None
        out[f"{kind}_requests"] = total
        if total:
            coord.m_worker_slo.set(met / total, worker=wid, slo=kind)
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
