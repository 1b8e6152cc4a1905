"""`cluster plan`: capacity planning from the command line (the coordinator's POST /v1/plan, or the
planner in this process when no cluster runs)."""

from __future__ import annotations

import sys


def add_parser(sub) -> None:
    pl = sub.add_parser("plan", help="capacity planning: how many prefill/decode workers a workload needs")
    pl.add_argument("--rate", type=float, required=True, help="requests per second")
    pl.add_argument("--prompt-tokens", type=float, default=512)
    pl.add_argument("--output-tokens", type=float, default=128)
    pl.add_argument("--ttft-ms", type=float, required=True)
    pl.add_argument("--tpot-ms", type=float, required=True)
    pl.add_argument("--attainment", type=float, default=0.9)
    pl.add_argument("--devices", type=int, default=None, help="device budget (plan the cheapest layout in it)")
    pl.add_argument("--tp", default="1,2,4,8", help="allowed TP degrees")
    pl.add_argument("--pp", default="1", help="allowed pipeline depths (e.g. 1,2)")
    pl.add_argument("--pp-hop-ms", type=float, default=None, help="a step's hand-over between stages (default 1)")
    pl.add_argument("--kv-bytes-per-token", type=float, default=None,
                    help="KV bytes per prompt token (2·layers·kv_heads·head_dim·dtype bytes): model the transfer")
    pl.add_argument("--kv-bandwidth-gbps", type=float, default=10.0, help="KV transfer bandwidth, GB/s")
    pl.add_argument("--prefill", type=int, default=None, help="instead of a budget: this many prefill workers...")
    pl.add_argument("--decode", type=int, default=None, help="...and decode workers: what rate do they hold?")
    pl.add_argument("--admin", default=None, help="coordinator admin URL (default: the running `cluster up`'s; "
                    "without one, plan locally with default cost models)")
    pl.add_argument("--cluster", default="default")
    pl.add_argument("--state-dir", default=None)
    pl.add_argument("--json", action="store_true", help="print the raw answer")
    pl.set_defaults(fn=cmd_plan)


def cmd_plan(args) -> int:
    import json
    import urllib.error
    import urllib.request

    body = {"workload": {"rate": args.rate, "prompt_tokens": {"mean": args.prompt_tokens},
                         "output_tokens": {"mean": args.output_tokens}},
            "slo": {"ttft_ms": args.ttft_ms, "tpot_ms": args.tpot_ms, "attainment": args.attainment}}
    if args.prefill or args.decode:
        body["cluster"] = {"prefill": {"replicas": args.prefill or 1}, "decode": {"replicas": args.decode or 1}}
    else:
        if args.devices is None:
            print("error: give --devices (a budget) or --prefill/--decode (a cluster)", file=sys.stderr)
            return 2
        body["budget"] = {"devices": args.devices, "tp": [int(t) for t in args.tp.split(",")],
                          "pp": [int(p) for p in args.pp.split(",")]}
        if args.pp_hop_ms is not None:
            body["budget"]["pp_hop_ms"] = args.pp_hop_ms
    if args.kv_bytes_per_token:
        body["kv_transfer"] = {"bytes_per_token": args.kv_bytes_per_token, "bandwidth_gb_s": args.kv_bandwidth_gbps}
    admin = args.admin
    if admin is None:
        from cluster.ops import read_state
        try:
            admin = read_state(args)["admin"]
        except RuntimeError:
            admin = None
    if admin:
        req = urllib.request.Request(admin.rstrip("/") + "/v1/plan", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=300) as r:
                got = json.loads(r.read())
        except urllib.error.HTTPError as e:
            print(f"error: {json.loads(e.read())['error']['message']}", file=sys.stderr)
            return 2
    else:
        from coordinator.planner import PlanError, plan
        try:
            got = plan(body, {})
        except PlanError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        got["assumptions"].insert(0, "planned locally: no running cluster, default cost models")
    if args.json:
        print(json.dumps(got, indent=1))
        return 0
    pr = got["predicted"]
    if "budget" in body:
        print(f"plan: {got['prefill']['replicas']} prefill x {_shape(got['prefill'])}, {got['decode']['replicas']} "
              f"decode x {_shape(got['decode'])} ({got['devices']} devices){'' if got['feasible'] else ' (NOT feasible)'}")
    print(f"predicted: attainment {pr['attainment']:.0%} at {args.rate:g} req/s, goodput {pr['goodput']:.2f} req/s "
          f"({pr['per_device_rate']:.2f} per device)")
    if got.get("reason"):
        print(got["reason"])
    for a in got.get("alternatives", []):
        print(f"  alternative: {a['prefill']['replicas']}P x {_shape(a['prefill'])} + {a['decode']['replicas']}D x "
              f"{_shape(a['decode'])} ({a['devices']} devices): attainment {a['predicted']['attainment']:.0%}")
    return 0


def _shape(d: dict) -> str:
    return f"TP{d['tp']}" + (f"xPP{d['pp']}" if d.get("pp", 1) > 1 else "")
