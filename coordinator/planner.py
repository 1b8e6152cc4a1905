"""Capacity planning (DESIGN.md §8): how many prefill and decode workers, of which TP, a workload
needs to meet its SLOs, and what rate a given cluster can hold. Pure Python (the simulator does the
work); served as `POST /v1/plan` on the coordinator's admin API and by `cluster plan`.

Request (the smallest accepted; more fields below):
    {"workload": {"rate": 2.0, "prompt_tokens": {"mean": 512}, "output_tokens": {"mean": 128}},
     "slo": {"ttft_ms": 500, "tpot_ms": 50, "attainment": 0.9},
     "budget": {"devices": 8}}
Optional: workload.arrival ("poisson" | "gamma" | "uniform"), workload.burstiness, *.sigma (log-normal),
budget.tp (allowed TP degrees, default [1, 2, 4, 8] up to the budget), budget.pp (allowed pipeline
depths, default [1]), budget.pp_hop_ms (a step's hand-over between stages, default 1),
budget.kv_tokens_per_device, kv_transfer ({"bytes_per_token": n} or the model's shape {"layers",
"kv_heads", "head_dim", "dtype_bytes" (default 2)}, and "bandwidth_gb_s", default 10), model
(profiles of that model), policy; and instead of a budget, "cluster": {"prefill": {"replicas", "tp",
"pp"}, "decode": {...}} to ask what rate it can hold.

Cost models come from the stored profiles (tp1 shapes; etcd profiles/), scaled for TP k as in
DistServe's model: the per-token terms divide by k·e(k), e(k) = 0.9^log2(k) (communication), the
prefill constant stays, and the decode step's base (weight reads) divides by k·e(k) too. PP s: a
prefill step runs through s stages of a + (b·n + c·n²)/s each with a hop between stages, and the next
step enters the first stage as soon as it is free (PrefillCost.stages: throughput up to s times, a
prompt's latency up by (s-1)·(a + hop)); a decode token passes every stage in turn (the step's time
plus (s-1) hops; no micro-batch interleaving is modelled), so PP buys decode only memory: KV room
for s times the batch. KV transfer: bytes per token (2 · layers · kv_heads · head_dim · dtype bytes)
over the bandwidth, per prompt token, before the first token (TTFT) and decoding start.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from coordinator.policy import DecodeCost, PrefillCost
from coordinator.simulator import SimCluster, Workload, attainment, generate, goodput, simulate


class PlanError(ValueError):
    """The request cannot be planned (bad field or an impossible budget): HTTP 422."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Shape:
    replicas: int
    tp: int
    pp: int = 1


def _num(d: dict, key: str, where: str, lo: float = 0.0, required: bool = True, integer: bool = False, default=None):
    v = d.get(key) if isinstance(d, dict) else None
    if v is None:
        if required:
            raise PlanError(f"{where}.{key} is required", f"{where}.{key}")
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= lo or \
            (integer and not float(v).is_integer()):
        kind = "an integer" if integer else "a number"
        raise PlanError(f"{where}.{key} = {v!r}: must be {kind} > {lo:g}", f"{where}.{key}")
    return int(v) if integer else float(v)


def scaled(p: PrefillCost, d: DecodeCost, tp: int, pp: int = 1, stage_hop: float = 0.0) -> tuple[PrefillCost, DecodeCost]:
    k = tp * 0.9 ** math.log2(tp) if tp > 1 else 1.0
    return (PrefillCost(p.a, p.b / k, p.c / k, p.hop, pp, stage_hop),
            DecodeCost(d.base / k + (pp - 1) * stage_hop, d.per_seq / k, d.per_token / k))


def kv_transfer_s_per_token(spec) -> float:
    """Seconds on the wire per prompt token of KV (0 without a spec)."""
    if spec is None:
        return 0.0
    if not isinstance(spec, dict):
        raise PlanError("kv_transfer must be an object", "kv_transfer")
    if "bytes_per_token" in spec:
        per_token = _num(spec, "bytes_per_token", "kv_transfer")
    else:
        per_token = 2.0 * _num(spec, "layers", "kv_transfer", integer=True) \
            * _num(spec, "kv_heads", "kv_transfer", integer=True) * _num(spec, "head_dim", "kv_transfer", integer=True) \
            * _num(spec, "dtype_bytes", "kv_transfer", required=False, default=2.0)
    return per_token / (_num(spec, "bandwidth_gb_s", "kv_transfer", required=False, default=10.0) * 1e9)


def _costs(profiles: dict, model: str | None) -> tuple[PrefillCost, DecodeCost, str]:
    """The tp1/pp1 cost models of the model (or of any model when none is named)."""
    pre = dec = None
    for key, prof in sorted(profiles.items()):
        m, _, shape = key.rpartition("/")
        if model and m != model:
            continue
        if shape == "prefill-tp1-pp1" and pre is None and isinstance(prof.get("prefill"), dict):
            pre = PrefillCost(**{k: float(v) for k, v in prof["prefill"].items() if k in ("a", "b", "c", "hop")})
        if shape == "decode-tp1-pp1" and dec is None and isinstance(prof.get("decode"), dict):
            dec = DecodeCost(**{k: float(v) for k, v in prof["decode"].items() if k in ("base", "per_seq", "per_token")})
    source = "stored profiles" if pre and dec else "default cost models (no stored profile)"
    return pre or PrefillCost(), dec or DecodeCost(), source


def _parse(body) -> tuple[Workload, float, float, float]:
    if not isinstance(body, dict):
        raise PlanError("the body must be a JSON object")
    w, slo = body.get("workload"), body.get("slo")
    if not isinstance(w, dict):
        raise PlanError("workload is required (an object)", "workload")
    if not isinstance(slo, dict):
        raise PlanError("slo is required (an object)", "slo")
    pt, ot = w.get("prompt_tokens"), w.get("output_tokens")
    if not isinstance(pt, dict) or not isinstance(ot, dict):
        raise PlanError("workload.prompt_tokens and workload.output_tokens are required ({\"mean\": n})",
                        "workload.prompt_tokens")
    arrival = w.get("arrival", "poisson")
    if arrival not in ("poisson", "gamma", "uniform"):
        raise PlanError(f"workload.arrival = {arrival!r}: one of poisson, gamma, uniform", "workload.arrival")
    rate = _num(w, "rate", "workload", required="cluster" not in body, default=1.0)
    wl = Workload(rate, _num(pt, "mean", "workload.prompt_tokens"), _num(ot, "mean", "workload.output_tokens"),
                  _num(pt, "sigma", "workload.prompt_tokens", lo=-1e-12, required=False, default=0.0),
                  _num(ot, "sigma", "workload.output_tokens", lo=-1e-12, required=False, default=0.0), arrival,
                  _num(w, "burstiness", "workload", required=False, default=1.0))
    target = _num(slo, "attainment", "slo", required=False, default=0.9)
    if target > 1:
        raise PlanError(f"slo.attainment = {target}: a share in (0, 1]", "slo.attainment")
    return wl, _num(slo, "ttft_ms", "slo") / 1e3, _num(slo, "tpot_ms", "slo") / 1e3, target


def plan(body: dict, profiles: dict, requests: int = 400) -> dict:
    wl, ttft, tpot, target = _parse(body)
    pre, dec, source = _costs(profiles, body.get("model"))
    policy = body.get("policy", "slo")
    if policy not in ("slo", "least-loaded", "round-robin"):
        raise PlanError(f"policy = {policy!r}: one of slo, least-loaded, round-robin", "policy")
    n = max(requests, 1)
    budget = body.get("budget") or {}
    kv = _num(budget, "kv_tokens_per_device", "budget", required=False, default=1 << 30, integer=True)
    stage_hop = _num(budget, "pp_hop_ms", "budget", lo=-1e-12, required=False, default=1.0) / 1e3
    transfer = kv_transfer_s_per_token(body.get("kv_transfer"))

    def sim_cluster(p: Shape, d: Shape) -> SimCluster:
        pc, _ = scaled(pre, dec, p.tp, p.pp, stage_hop)
        _, dc = scaled(pre, dec, d.tp, d.pp, stage_hop)
        return SimCluster([pc] * p.replicas, [dc] * d.replicas, kv * d.tp * d.pp, transfer, 256, policy)

    def evaluate(p: Shape, d: Shape, with_goodput: bool) -> dict:
        c = sim_cluster(p, d)
        reqs = simulate(c, generate(wl, n, 0), ttft, tpot)
        done = [r for r in reqs if r.ttft is not None and r.tpot is not None]
        q = lambda xs, f: sorted(xs)[min(len(xs) - 1, int(f * len(xs)))] * 1e3 if xs else None  # noqa: E731
        out = {"prefill": {"replicas": p.replicas, "tp": p.tp, "pp": p.pp},
               "decode": {"replicas": d.replicas, "tp": d.tp, "pp": d.pp},
               "devices": p.replicas * p.tp * p.pp + d.replicas * d.tp * d.pp,
               "predicted": {"attainment": attainment(reqs),
                             "ttft_p90_ms": q([r.ttft for r in done], 0.9),
                             "tpot_p90_ms": q([r.tpot for r in done], 0.9)}}
        if with_goodput:
            g = goodput(c, wl, ttft, tpot, target, n=n, hi=max(wl.rate, 0.5))
            out["predicted"]["goodput"] = g
            out["predicted"]["per_device_rate"] = g / out["devices"]
        return out

    assumptions = [f"cost models: {source}, TP scaled by k·0.9^log2(k); PP: per-stage steps, "
                   f"{stage_hop * 1e3:g} ms a stage hand-over, prefill pipelined",
                   "prefill: batched steps (the step's fixed cost shared); decode: continuous batching, whole KV "
                   "reserved at admission (no preemption)",
                   f"KV transfer: {transfer * 1e6:.3g} µs per prompt token, added to TTFT" if transfer else
                   "KV transfer time not modelled (no kv_transfer given)",
                   f"{n} simulated requests per candidate, {wl.arrival} arrivals"]

    if "cluster" in body:  # what rate can this cluster hold?
        c = body["cluster"]
        if not isinstance(c, dict):
            raise PlanError("cluster must be an object", "cluster")
        shapes = []
        for role in ("prefill", "decode"):
            r = c.get(role)
            if not isinstance(r, dict):
                raise PlanError(f"cluster.{role} is required ({{\"replicas\": n, \"tp\": k}})", f"cluster.{role}")
            shapes.append(Shape(_num(r, "replicas", f"cluster.{role}", integer=True),
                                _num(r, "tp", f"cluster.{role}", required=False, default=1, integer=True),
                                _num(r, "pp", f"cluster.{role}", required=False, default=1, integer=True)))
        res = evaluate(shapes[0], shapes[1], True)
        res["feasible"] = res["predicted"]["goodput"] > 0
        res["assumptions"] = assumptions
        return res

    devices = _num(budget, "devices", "budget", integer=True)
    if devices < 2:
        raise PlanError(f"budget.devices = {devices}: a disaggregated cluster needs at least 2 devices "
                        "(one prefill and one decode worker)", "budget.devices")
    tps = budget.get("tp", [1, 2, 4, 8])
    pps = budget.get("pp", [1])
    if not isinstance(tps, list) or not tps or not all(isinstance(t, int) and t >= 1 and t & (t - 1) == 0
                                                      for t in tps):
        raise PlanError(f"budget.tp = {tps!r}: a non-empty list of powers of two", "budget.tp")
    if not isinstance(pps, list) or not pps or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 1
                                                       for x in pps):
        raise PlanError(f"budget.pp = {pps!r}: a non-empty list of positive integers", "budget.pp")
    tps = sorted({t for t in tps if 2 * t <= devices} | ({1} if 1 in tps else set()))
    if not tps or 2 * min(tps) > devices:
        raise PlanError(f"budget.tp = {budget.get('tp')}: no allowed TP fits a prefill and a decode worker in "
                        f"{devices} devices", "budget.tp")
    layouts = [(t, q) for t in tps for q in sorted(set(pps)) if 2 * t * q <= devices]
    if not layouts:
        raise PlanError(f"budget.pp = {pps!r}: no allowed TP x PP fits a prefill and a decode worker in "
                        f"{devices} devices", "budget.pp")
    candidates = []
    for tp_p, pp_p in layouts:
        for tp_d, pp_d in layouts:
            for n_p in range(1, devices // (tp_p * pp_p) + 1):
                for n_d in range(1, (devices - n_p * tp_p * pp_p) // (tp_d * pp_d) + 1):
                    candidates.append((Shape(n_p, tp_p, pp_p), Shape(n_d, tp_d, pp_d)))
    # cheapest first: the fewest devices that meet the target win; among equals, the best attainment
    candidates.sort(key=lambda c: (c[0].replicas * c[0].tp * c[0].pp + c[1].replicas * c[1].tp * c[1].pp,
                                   c[0].tp * c[0].pp + c[1].tp * c[1].pp, c[0].pp + c[1].pp))
    evaluated, best, extra = [], None, 0
    for p, d in candidates:
        r = evaluate(p, d, False)
        evaluated.append(r)
        if best is None and r["predicted"]["attainment"] >= target:
            best = r  # sorted by devices: nothing cheaper meets it
        elif best is not None:
            extra += 1
            if extra == 5:  # a few dearer ones for the table of alternatives
                break
    ranked = sorted(evaluated, key=lambda r: (-(r["predicted"]["attainment"] >= target), r["devices"],
                                              -r["predicted"]["attainment"]))
    chosen = best or max(evaluated, key=lambda r: r["predicted"]["attainment"])
    final = evaluate(_shape(chosen["prefill"]), _shape(chosen["decode"]), True)
    alternatives = []
    for r in ranked:
        if (r["prefill"], r["decode"]) == (final["prefill"], final["decode"]):
            continue
        alternatives.append(r)
        if len(alternatives) == 5:
            break
    final["feasible"] = best is not None
    if best is None:
        final["reason"] = (f"no configuration within {devices} devices meets {target:.0%} attainment at "
                           f"{wl.rate:g} req/s; the best reaches {final['predicted']['attainment']:.0%}")
    final["alternatives"] = alternatives
    final["assumptions"] = assumptions
    return final


def _shape(d: dict) -> Shape:
    return Shape(d["replicas"], d["tp"], d.get("pp", 1))

