"""`cluster plan`: capacity planning from the command line (the coordinator's POST /v1/plan, or the
planner in this process when no cluster runs)."""

from __future__ import annotations

import sys


def add_parser(sub) -> None:
    pl = sub.add_parser("plan", help="capacity planning: how many prefill/decode workers a workload needs")
    pl.add_argument("--rate", type=float, required=True, help="requests per second (with --turns: conversations "
                    "per second)")
    pl.add_argument("--prompt-tokens", type=float, default=None, help="mean prompt length (default 512)")
    pl.add_argument("--output-tokens", type=float, default=None, help="mean output length (default 128; with "
                    "--turns, of each reply: default 100)")
    conv = pl.add_argument_group("multi-turn conversations (prefix reuse; --turns switches the workload to them)")
    conv.add_argument("--turns", type=int, default=None, help="turns per conversation")
    conv.add_argument("--system-tokens", type=int, default=None, help="the shared system prompt (default 1300)")
    conv.add_argument("--system-prompts", type=int, default=None, help="distinct system prompts (default 1)")
    conv.add_argument("--user-tokens", type=float, default=None, help="mean user message (default 60)")
    conv.add_argument("--think-s", type=float, default=None, help="pause before the next turn (default 1)")
    conv.add_argument("--no-prefix-cache", action="store_true", help="model workers without prefix caching")
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

    conv = {"turns": args.turns, "system_tokens": args.system_tokens, "system_prompts": args.system_prompts,
            "user_tokens": None if args.user_tokens is None else {"mean": args.user_tokens},
            "output_tokens": None if args.output_tokens is None else {"mean": args.output_tokens},
            "think_s": args.think_s}
    if args.turns is not None:
        if args.prompt_tokens is not None:
            print("error: --prompt-tokens does not go with --turns (a turn's prompt is the conversation so far)",
                  file=sys.stderr)
            return 2
        workload = {"conversations": {"rate": args.rate, **{k: v for k, v in conv.items() if v is not None}}}
    elif any(v is not None for k, v in conv.items() if k not in ("turns", "output_tokens")):
        print("error: --system-tokens, --system-prompts, --user-tokens and --think-s need --turns", file=sys.stderr)
        return 2
    else:
        workload = {"rate": args.rate, "prompt_tokens": {"mean": 512 if args.prompt_tokens is None else args.prompt_tokens},
                    "output_tokens": {"mean": 128 if args.output_tokens is None else args.output_tokens}}
    body = {"workload": workload,
            "slo": {"ttft_ms": args.ttft_ms, "tpot_ms": args.tpot_ms, "attainment": args.attainment}}
    if args.no_prefix_cache:
        body["prefix_caching"] = False
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
    unit = pr.get("unit", "req/s")
    print(f"predicted: attainment {pr['attainment']:.0%} at {args.rate:g} {unit}, goodput {pr['goodput']:.2f} {unit} "
          f"({pr['per_device_rate']:.2f} per device)")
    if "prefix" in pr:
        x = pr["prefix"]
        print(f"prefix reuse: later turns hit {x['hit_rate_later_turns']:.0%} of their prompt tokens, ship "
              f"{x['shipped_per_prompt_token_later_turns']:.2f} KV per prompt token (first turns "
              f"{x['shipped_per_prompt_token_first_turns']:.2f}); {x['local_prefill_share']:.0%} prefilled on "
              "their decode worker")
    if got.get("reason"):
        print(got["reason"])
    for a in got.get("alternatives", []):
        print(f"  alternative: {a['prefill']['replicas']}P x {_shape(a['prefill'])} + {a['decode']['replicas']}D x "
              f"{_shape(a['decode'])} ({a['devices']} devices): attainment {a['predicted']['attainment']:.0%}")
    return 0


def _shape(d: dict) -> str:
    return f"TP{d['tp']}" + (f"xPP{d['pp']}" if d.get("pp", 1) > 1 else "")
