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

Multi-turn conversations with prefix reuse (coordinator/conversations.py) instead of single requests:
    "workload": {"conversations": {"rate": 0.5, "turns": 4, "system_tokens": 1300, "system_prompts": 1,
                                   "user_tokens": {"mean": 60, "sigma": 0.5},
                                   "output_tokens": {"mean": 100, "sigma": 0.5},
                                   "think_s": 1.0, "template_tokens": 6}}
Only "rate" (new conversations per second) is required, the rest default as shown; rates, goodput
and per-device rate are then in conversations per second, and "predicted" adds "prefix" (TTFT p90 of
first and later turns, later turns' hit rate, KV shipped per prompt token, the share prefilled on the
decode worker). Every worker has a prefix cache of 16-token blocks in its KV room (budget.
kv_tokens_per_device for prefill workers too); "prefix_caching": false models workers without.

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

from coordinator.conversations import (
    Conversations,
    conversation_goodput,
    conversation_script,
    conversation_stats,
    simulate_conversations,
)
from coordinator.policy import DecodeCost, PrefillCost
from coordinator.simulator import SimCluster, Workload, attainment, generate, goodput, percentile, simulate


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


_CONVERSATION_FIELDS = ("rate", "turns", "system_tokens", "system_prompts", "user_tokens", "output_tokens", "think_s",
                        "template_tokens")


def _conversations(w: dict, rate_required: bool) -> Conversations:
    """workload.conversations (module docstring): every field but the rate has Conversations' default."""
    where, c = "workload.conversations", w["conversations"]
    if not isinstance(c, dict):
        raise PlanError(f"{where} must be an object", where)
    for key in ("rate", "prompt_tokens", "output_tokens", "arrival", "burstiness"):
        if key in w:
            raise PlanError(f"workload.{key} does not go with {where} (its rate, user_tokens and output_tokens "
                            "are inside it)", f"workload.{key}")
    for key in c:
        if key not in _CONVERSATION_FIELDS:
            raise PlanError(f"{where}.{key}: unknown (known: {', '.join(_CONVERSATION_FIELDS)})", f"{where}.{key}")
    d = Conversations(1.0)
    lengths = []
    for key, mean, sigma in (("user_tokens", d.user_mean, d.user_sigma), ("output_tokens", d.output_mean, d.output_sigma)):
        spec = c.get(key, {})
        if not isinstance(spec, dict):
            raise PlanError(f"{where}.{key} must be an object ({{\"mean\": n, \"sigma\": s}})", f"{where}.{key}")
        lengths += [_num(spec, "mean", f"{where}.{key}", required=False, default=mean),
                    _num(spec, "sigma", f"{where}.{key}", lo=-1e-12, required=False, default=sigma)]
    return Conversations(
        _num(c, "rate", where, required=rate_required, default=1.0),
        _num(c, "turns", where, integer=True, required=False, default=d.turns),
        _num(c, "system_tokens", where, lo=-1e-12, integer=True, required=False, default=d.system_tokens),
        _num(c, "system_prompts", where, integer=True, required=False, default=d.system_prompts),
        *lengths,
        think_s=_num(c, "think_s", where, lo=-1e-12, required=False, default=d.think_s),
        template_tokens=_num(c, "template_tokens", where, lo=-1e-12, integer=True, required=False,
                             default=d.template_tokens))


def _parse(body) -> tuple[Workload | Conversations, float, float, float]:
    if not isinstance(body, dict):
        raise PlanError("the body must be a JSON object")
    w, slo = body.get("workload"), body.get("slo")
    if not isinstance(w, dict):
        raise PlanError("workload is required (an object)", "workload")
    if not isinstance(slo, dict):
        raise PlanError("slo is required (an object)", "slo")
    wl = _conversations(w, "cluster" not in body) if "conversations" in w else _single_turn(w, "cluster" not in body)
    target = _num(slo, "attainment", "slo", required=False, default=0.9)
    if target > 1:
        raise PlanError(f"slo.attainment = {target}: a share in (0, 1]", "slo.attainment")
    return wl, _num(slo, "ttft_ms", "slo") / 1e3, _num(slo, "tpot_ms", "slo") / 1e3, target


def _single_turn(w: dict, rate_required: bool) -> Workload:
    pt, ot = w.get("prompt_tokens"), w.get("output_tokens")
    if not isinstance(pt, dict) or not isinstance(ot, dict):
        raise PlanError("workload.prompt_tokens and workload.output_tokens are required ({\"mean\": n}), or "
                        "workload.conversations", "workload.prompt_tokens")
    arrival = w.get("arrival", "poisson")
    if arrival not in ("poisson", "gamma", "uniform"):
        raise PlanError(f"workload.arrival = {arrival!r}: one of poisson, gamma, uniform", "workload.arrival")
    rate = _num(w, "rate", "workload", required=rate_required, default=1.0)
    return Workload(rate, _num(pt, "mean", "workload.prompt_tokens"), _num(ot, "mean", "workload.output_tokens"),
                    _num(pt, "sigma", "workload.prompt_tokens", lo=-1e-12, required=False, default=0.0),
                    _num(ot, "sigma", "workload.output_tokens", lo=-1e-12, required=False, default=0.0), arrival,
                    _num(w, "burstiness", "workload", required=False, default=1.0))


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
    caching = body.get("prefix_caching", True)
    if not isinstance(caching, bool):
        raise PlanError(f"prefix_caching = {caching!r}: true or false", "prefix_caching")
    multi = isinstance(wl, Conversations)
    convs = max(1, -(-n // wl.turns)) if multi else 0  # about `requests` turns in all
    unit = "conversations/s" if multi else "req/s"

    def sim_cluster(p: Shape, d: Shape) -> SimCluster:
        pc, _ = scaled(pre, dec, p.tp, p.pp, stage_hop)
        _, dc = scaled(pre, dec, d.tp, d.pp, stage_hop)
        return SimCluster([pc] * p.replicas, [dc] * d.replicas, kv * d.tp * d.pp, transfer, 256, policy,
                          prefix_caching=caching, prefill_kv_capacity_tokens=kv * p.tp * p.pp)

    def ms(x: float | None) -> float | None:
        return None if x is None else x * 1e3

    def evaluate(p: Shape, d: Shape, with_goodput: bool) -> dict:
        c = sim_cluster(p, d)
        if multi:
            reqs = simulate_conversations(c, conversation_script(wl, convs, 0), ttft, tpot)
        else:
            reqs = simulate(c, generate(wl, n, 0), ttft, tpot)
        done = [r for r in reqs if r.ttft is not None and r.tpot is not None]
        out = {"prefill": {"replicas": p.replicas, "tp": p.tp, "pp": p.pp},
               "decode": {"replicas": d.replicas, "tp": d.tp, "pp": d.pp},
               "devices": p.replicas * p.tp * p.pp + d.replicas * d.tp * d.pp,
               "predicted": {"attainment": attainment(reqs),
                             "ttft_p90_ms": ms(percentile([r.ttft for r in done], 0.9)),
                             "tpot_p90_ms": ms(percentile([r.tpot for r in done], 0.9))}}
        if multi:
            st = conversation_stats(reqs)
            out["predicted"]["prefix"] = {
                "ttft_p90_ms_first_turns": ms(st.ttft_first[1]), "ttft_p90_ms_later_turns": ms(st.ttft_later[1]),
                "hit_rate_later_turns": st.hit_rate_later,
                "shipped_per_prompt_token_first_turns": st.shipped_per_prompt_first,
                "shipped_per_prompt_token_later_turns": st.shipped_per_prompt_later,
                "local_prefill_share": st.local_share}
        if with_goodput:
            if multi:
                g = conversation_goodput(c, wl, ttft, tpot, target, n=convs, hi=max(wl.rate, 0.5))
            else:
                g = goodput(c, wl, ttft, tpot, target, n=n, hi=max(wl.rate, 0.5))
            out["predicted"]["goodput"] = g
            out["predicted"]["per_device_rate"] = g / out["devices"]
            out["predicted"]["unit"] = unit
        return out

    assumptions = [f"cost models: {source}, TP scaled by k·0.9^log2(k); PP: per-stage steps, "
                   f"{stage_hop * 1e3:g} ms a stage hand-over, prefill pipelined",
                   "prefill: batched steps (the step's fixed cost shared); decode: continuous batching, whole KV "
                   "reserved at admission (no preemption)",
                   f"KV transfer: {transfer * 1e6:.3g} µs per prompt token, added to TTFT" if transfer else
                   "KV transfer time not modelled (no kv_transfer given)"]
    if multi:
        assumptions += [
            f"{convs} simulated conversations of {wl.turns} turns per candidate (Poisson starts, closed loop: "
            f"{wl.think_s:g} s between a reply and the next turn; a rejected turn ends its conversation)",
            (f"prefix caches of {SimCluster.block_size}-token blocks on every worker, LRU, in the KV room no request holds; placement "
             f"sees them as the KV index would with perfect events" if caching else "no prefix caching")]
    else:
        assumptions.append(f"{n} simulated requests per candidate, {wl.arrival} arrivals")

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
                           f"{wl.rate:g} {unit}; the best reaches {final['predicted']['attainment']:.0%}")
    final["alternatives"] = alternatives
    final["assumptions"] = assumptions
    return final


def _shape(d: dict) -> Shape:
    return Shape(d["replicas"], d["tp"], d.get("pp", 1))

