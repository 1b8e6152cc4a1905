"""The `cluster` command. Today: `cluster generate` (one process) and `cluster model pull`.

Exit codes: 0 ok, 1 runtime failure, 2 bad input (flags, model directory, request parameters).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="checkpoint directory, or SmolLM2-135M-Instruct (the default; fetched on first use)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--kv-cache-memory", default=None, help="KV cache size, e.g. 512MiB or 2GiB")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--quantization", default="none", choices=["none", "int8"],
                   help="weight quantization of linear layers (int8: weight-only, per channel)")


def build_engine_config(args):
    from engine.config import CacheConfig, DeviceConfig, EngineConfig, SchedulerConfig, parse_size
    from engine.model_store import resolve_model

    model_dir = resolve_model(args.model)
    return EngineConfig(
        model=str(model_dir),
        cache=CacheConfig(block_size=args.block_size, kv_cache_memory=parse_size(args.kv_cache_memory),
                          enable_prefix_caching=not args.no_prefix_caching),
        scheduler=SchedulerConfig(max_num_seqs=args.max_num_seqs,
                                  max_num_batched_tokens=args.max_num_batched_tokens,
                                  max_model_len=args.max_model_len),
        device=DeviceConfig(device=args.device, dtype=args.dtype, num_threads=args.threads),
        quantization=args.quantization,
    )


def _generate_remote(args) -> int:
    """`cluster generate --url URL`: the same prompt through a running cluster's gateway (SSE)."""
    import json
    import urllib.error
    import urllib.request

    url = args.url.rstrip("/")
    with urllib.request.urlopen(url + "/v1/models", timeout=10) as r:
        model = args.served_model or json.loads(r.read())["data"][0]["id"]
    body = {"model": model, "max_tokens": args.max_tokens, "temperature": args.temperature, "top_p": args.top_p,
            "stream": True, "stream_options": {"include_usage": True}}
    if args.top_k:
        body["top_k"] = args.top_k
    if args.seed is not None:
        body["seed"] = args.seed
    if args.stop:
        body["stop"] = args.stop
    if args.chat:
        body["messages"] = ([{"role": "system", "content": args.system}] if args.system else []) + \
                           [{"role": "user", "content": args.prompt}]
        path = "/v1/chat/completions"
    else:
        body["prompt"] = args.prompt
        path = "/v1/completions"
    headers = {"Content-Type": "application/json"}
    if os.environ.get("TANDEM_API_KEY"):
        headers["Authorization"] = f"Bearer {os.environ['TANDEM_API_KEY']}"
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(), headers=headers, method="POST")
    t0, ttft, usage, reason = time.perf_counter(), None, None, None
    try:
        with urllib.request.urlopen(req, timeout=600) as r:
            for line in r:
                if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                    continue
                ev = json.loads(line[6:])
                if "error" in ev:
                    print(f"\nerror: {ev['error']['message']}", file=sys.stderr)
                    return 1
                usage = ev.get("usage") or usage
                for ch in ev.get("choices", []):
                    text = ch["delta"].get("content") or "" if args.chat else ch.get("text") or ""
                    if text and ttft is None:
                        ttft = time.perf_counter() - t0
                    sys.stdout.write(text)
                    sys.stdout.flush()
                    reason = ch.get("finish_reason") or reason
    except urllib.error.HTTPError as e:
        print(f"error: HTTP {e.code}: {json.loads(e.read())['error']['message']}", file=sys.stderr)
        return 2 if e.code < 500 else 1
    dt = time.perf_counter() - t0
    sys.stdout.write("\n")
    if not args.quiet and usage:
        n = usage["completion_tokens"]
        print(f"[{n} tokens via {url}, finish={reason}, TTFT {1e3 * (ttft or 0):.0f} ms, {n / dt:.1f} tok/s]",
              file=sys.stderr)
    return 0


def cmd_generate(args) -> int:
    if args.url:
        return _generate_remote(args)
    from engine.llm_engine import LLMEngine
    from engine.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed, stop=args.stop or [])
    engine = LLMEngine(build_engine_config(args))
    prompt = args.prompt
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
                   [{"role": "user", "content": prompt}]
        prompt = engine.tokenizer.encode(engine.tokenizer.apply_chat_template(messages),
                                         add_special_tokens=False)
    t0 = time.perf_counter()
    engine.add_request("cli-0", prompt, params)
    n, ttft, reason = 0, None, None
    while engine.has_unfinished_requests():
        for ro in engine.step():
            for co in ro.outputs:
                if ttft is None:
                    ttft = time.perf_counter() - t0
                n += len(co.token_ids)
                sys.stdout.write(co.text)
                sys.stdout.flush()
                reason = co.finish_reason or reason
    dt = time.perf_counter() - t0
    sys.stdout.write("\n")
    if not args.quiet:
        tpot = (dt - ttft) / max(n - 1, 1) if ttft is not None else 0.0
        print(f"[{n} tokens, finish={reason}, TTFT {1e3 * (ttft or 0):.0f} ms, "
              f"TPOT {1e3 * tpot:.1f} ms, {n / dt:.1f} tok/s]", file=sys.stderr)
    return 0


def cmd_worker(args) -> int:
    """A worker in the foreground: prints one JSON line when ready (after warm-up), serves until
    SIGTERM/SIGINT, then prints its final stats as JSON."""
    import dataclasses
    import json
    import signal

    from engine.config import ParallelConfig
    t0 = time.perf_counter()
    config = build_engine_config(args)
    config = dataclasses.replace(config, parallel=ParallelConfig(tp=args.tp, pp=args.pp))
    if args.role == "decode":
        from decode.worker import DecodeWorker
        worker = DecodeWorker(config, args.worker_id or "decode-0", args.host, args.port, args.kv_port)
    else:
        from prefill.worker import PrefillWorker
        worker = PrefillWorker(config, args.worker_id or f"{args.role}-0", args.host, args.port)
    worker.start()
    from engine.sampling_params import SamplingParams
    worker.engine.generate([[1, 2, 3, 4]], SamplingParams(max_tokens=2, temperature=0))  # warm-up
    signal.signal(signal.SIGTERM, lambda *a: worker.stop())
    signal.signal(signal.SIGINT, lambda *a: worker.stop())
    info = {"ready": True, "role": args.role, "worker_id": worker.worker_id, "endpoint": worker.endpoint,
            "kv_endpoints": getattr(worker, "kv_endpoints", []), "layout": dataclasses.asdict(worker.layout),
            "startup_s": round(time.perf_counter() - t0, 2), "pid": os.getpid()}
    registry = None
    if args.registry or args.etcd:
        from cluster.registry import DirectoryRegistry, WorkerInfo
        profile = {}
        if args.profile:
            from engine.profiler import profile as measure
            profile = measure(worker.engine)
        if args.etcd:
            from cluster.agent import EtcdRegistry
            registry = EtcdRegistry(args.etcd.split(","), args.cluster, ttl=args.lease_ttl,
                                    interval=args.heartbeat_interval)
        else:
            registry = DirectoryRegistry(args.registry)
        model_name = args.served_model_name or os.path.basename(os.path.normpath(config.model))
        info["model"], info["profile"] = model_name, profile
        registry.register(WorkerInfo(worker.worker_id, args.role, model_name, args.tp, args.pp,
                                     worker.layout.block_size, worker.engine.kv_capacity_tokens, worker.endpoint,
                                     info["kv_endpoints"], info["layout"], os.getpid(), info["startup_s"], profile))
        worker.heartbeat.registry = registry
        worker.heartbeat.interval = min(args.heartbeat_interval, 0.2)
        worker.heartbeat.maybe_beat(worker.engine)
    print(f"{worker.worker_id}: ready in {info['startup_s']:.1f} s (model, warm-up)", file=sys.stderr, flush=True)
    print(json.dumps(info), flush=True)
    rc = 0
    try:
        worker.run()
    except RuntimeError as e:  # a rank died: the whole worker exits, and its registration with it
        print(f"{worker.worker_id}: {e}", file=sys.stderr, flush=True)
        rc = 1
    finally:
        if registry is not None:
            registry.deregister(worker.worker_id)
        bm = worker.engine.block_manager
        stats = {"stopped": True, "free_blocks": bm.num_free_blocks, "num_blocks": bm.num_blocks,
                 "metrics": dict(worker.metrics), **worker.engine.stats()}
        try:
            worker.close()
        except RuntimeError:
            pass
        print(json.dumps(stats), flush=True)
    return rc


def _run_async(main) -> None:
    import asyncio
    try:
        import uvloop
        uvloop.run(main)
    except ImportError:
        asyncio.run(main)


def cmd_coordinator(args) -> int:
    """A coordinator replica in the foreground: one JSON line when serving, until SIGTERM/SIGINT."""
    import asyncio
    import json
    import signal

    import msgspec

    from coordinator.server import CoordinatorConfig, serve
    classes = {}
    for spec in args.slo_class or []:
        name, _, rest = spec.partition("=")
        try:
            ttft, tpot = (float(x) if x else None for x in rest.split(":"))
        except ValueError:
            raise ValueError(f"--slo-class {spec!r}: expected NAME=TTFT_MS:TPOT_MS (either may be empty)") from None
        classes[name] = (ttft, tpot)
    config = CoordinatorConfig(args.etcd.split(","), args.cluster, args.id, args.host, args.placement_port,
                               args.heartbeat_port, args.events_port, args.admin_host, args.admin_port,
                               args.policy, args.suspect_after, args.lease_ttl, args.ttft_ms, args.tpot_ms, classes)

    async def main():
        loop = asyncio.get_running_loop()

        def ready(coord):
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, coord.stop)
            print(json.dumps({"ready": True, **msgspec.to_builtins(coord.info)}), flush=True)
        await serve(config, ready)
    _run_async(main())
    return 0


def cmd_gateway(args) -> int:
    """The HTTP gateway in the foreground: one JSON line when serving; SIGTERM/SIGINT drain it."""
    import asyncio
    import json
    import signal

    from cluster.gateway import GatewayConfig, serve
    keys_ = [k for k in (args.api_key or []) if k]
    if os.environ.get("TANDEM_API_KEY"):
        keys_.append(os.environ["TANDEM_API_KEY"])
    config = GatewayConfig(args.etcd.split(","), args.cluster, args.model, args.served_model_name, args.host,
                           args.port, args.internal_host, keys_, max_migrations=args.max_migrations,
                           first_token_timeout=args.first_token_timeout, token_timeout=args.token_timeout,
                           lease_ttl=args.lease_ttl, gateway_id=args.id)

    async def main():
        loop = asyncio.get_running_loop()

        def ready(gw):
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, gw.stop)
            print(json.dumps({"ready": True, "gateway_id": gw.config.gateway_id, "url": gw.url,
                              "model": gw.model_name, "pid": os.getpid()}), flush=True)
        await serve(config, ready)
    _run_async(main())
    return 0


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
        body["budget"] = {"devices": args.devices, "tp": [int(t) for t in args.tp.split(",")]}
    admin = args.admin
    if admin is None:
        from cluster.launcher import _state
        try:
            admin = _state(args)["admin"]
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
        print(f"plan: {got['prefill']['replicas']} prefill x TP{got['prefill']['tp']}, {got['decode']['replicas']} "
              f"decode x TP{got['decode']['tp']} ({got['devices']} devices){'' if got['feasible'] else ' (NOT feasible)'}")
    print(f"predicted: attainment {pr['attainment']:.0%} at {args.rate:g} req/s, goodput {pr['goodput']:.2f} req/s "
          f"({pr['per_device_rate']:.2f} per device)")
    if got.get("reason"):
        print(got["reason"])
    for a in got.get("alternatives", []):
        print(f"  alternative: {a['prefill']['replicas']}P x TP{a['prefill']['tp']} + {a['decode']['replicas']}D x "
              f"TP{a['decode']['tp']} ({a['devices']} devices): attainment {a['predicted']['attainment']:.0%}")
    return 0


def cmd_model_pull(args) -> int:
    from engine.model_store import pull_default
    print(pull_default(progress=True, force=args.force))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cluster", description="tandem: disaggregated LLM inference")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="cmd", required=True)

    g = sub.add_parser("generate", help="run one prompt in this process and stream the answer")
    _engine_args(g)
    g.add_argument("--prompt", required=True)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--system", default=None, help="system message (with --chat)")
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("-q", "--quiet", action="store_true", help="no statistics line on stderr")
    g.add_argument("--url", default=None, help="a running cluster's gateway (e.g. http://127.0.0.1:8000): "
                   "generate there instead of in this process")
    g.add_argument("--served-model", default=None, help="with --url: the model name (default: the first served)")
    g.set_defaults(fn=cmd_generate)

    w = sub.add_parser("worker", help="run a prefill, decode or colocated worker in the foreground")
    _engine_args(w)
    w.add_argument("--role", required=True, choices=["prefill", "decode", "colocated"])
    w.add_argument("--tp", type=int, default=1)
    w.add_argument("--pp", type=int, default=1)
    w.add_argument("--host", default="127.0.0.1", help="interface the worker's sockets bind to")
    w.add_argument("--port", type=int, default=0, help="request socket port (0: any free port)")
    w.add_argument("--kv-port", type=int, default=0, help="decode: KV transfer port (0: any free port)")
    w.add_argument("--worker-id", default=None)
    w.add_argument("--registry", default=None,
                   help="directory registry (JSON files) to announce this worker and its load in")
    w.add_argument("--heartbeat-interval", type=float, default=0.2, help="seconds between load heartbeats")
    w.add_argument("--etcd", default=None, help="etcd endpoints (comma-separated): register there and "
                   "heartbeat to the coordinators")
    w.add_argument("--cluster", default="default", help="cluster name (etcd key prefix /tandem/NAME/)")
    w.add_argument("--lease-ttl", type=int, default=3, help="etcd lease TTL in seconds")
    w.add_argument("--served-model-name", default=None,
                   help="model name requests use (default: the model directory's name)")
    w.add_argument("--no-profile", dest="profile", action="store_false",
                   help="skip the start-up cost-model profile (the coordinator then uses defaults)")
    w.set_defaults(fn=cmd_worker)

    c = sub.add_parser("coordinator", help="run a coordinator replica (leader-elected through etcd)")
    c.add_argument("--etcd", required=True, help="etcd endpoints, comma-separated")
    c.add_argument("--cluster", default="default")
    c.add_argument("--id", default="", help="coordinator id (default: random)")
    c.add_argument("--host", default="127.0.0.1", help="interface of the placement/heartbeat/event sockets")
    c.add_argument("--placement-port", type=int, default=0)
    c.add_argument("--heartbeat-port", type=int, default=0)
    c.add_argument("--events-port", type=int, default=0)
    c.add_argument("--admin-host", default="127.0.0.1")
    c.add_argument("--admin-port", type=int, default=8001, help="admin HTTP API port (0: any free port)")
    c.add_argument("--policy", default="slo", choices=["slo", "least-loaded", "round-robin"])
    c.add_argument("--suspect-after", type=float, default=1.0, help="seconds without heartbeats -> suspect")
    c.add_argument("--lease-ttl", type=int, default=2)
    c.add_argument("--ttft-ms", type=float, default=None, help="default TTFT SLO")
    c.add_argument("--tpot-ms", type=float, default=None, help="default TPOT SLO")
    c.add_argument("--slo-class", action="append", help="a named SLO class requests can ask for: "
                   "NAME=TTFT_MS:TPOT_MS (repeatable; 'batch' = no SLOs is built in)")
    c.set_defaults(fn=cmd_coordinator)

    gw = sub.add_parser("gateway", help="run the OpenAI-compatible HTTP gateway")
    gw.add_argument("--etcd", required=True, help="etcd endpoints, comma-separated")
    gw.add_argument("--cluster", default="default")
    gw.add_argument("--model", default=None, help="checkpoint directory (tokenizer, context length); "
                    "default: SmolLM2-135M-Instruct")
    gw.add_argument("--served-model-name", default=None)
    gw.add_argument("--host", default="127.0.0.1")
    gw.add_argument("--port", type=int, default=8000, help="HTTP port (0: any free port)")
    gw.add_argument("--internal-host", default="127.0.0.1", help="interface workers reach the token socket on")
    gw.add_argument("--api-key", action="append", help="require this Bearer key on /v1/* (repeatable; "
                    "also $TANDEM_API_KEY)")
    gw.add_argument("--max-migrations", type=int, default=3)
    gw.add_argument("--first-token-timeout", type=float, default=60.0)
    gw.add_argument("--token-timeout", type=float, default=30.0)
    gw.add_argument("--lease-ttl", type=int, default=2)
    gw.add_argument("--id", default="", help="gateway id (default: random)")
    gw.set_defaults(fn=cmd_gateway)

    up = sub.add_parser("up", help="start a cluster (etcd, coordinator, workers, gateway) and supervise it")
    up.add_argument("-f", "--file", default=None, help="cluster TOML file (default: one host, 1 prefill + 1 decode)")
    up.add_argument("--host", dest="node", default=None,
                    help="this host's name in the cluster file: start only what is assigned to it (default: local)")
    up.add_argument("--cluster", default=None, help="cluster name (default: the file's, or 'default')")
    up.add_argument("--state-dir", default=None, help="logs, etcd data and state.json (default "
                    "$TANDEM_STATE_DIR/NAME or ~/.local/state/tandem/NAME)")
    up.add_argument("--etcd", default=None, help="use this etcd (comma-separated endpoints) instead of an embedded one")
    up.add_argument("--model", default=None, help="checkpoint directory (default: SmolLM2-135M-Instruct)")
    up.add_argument("--prefill", type=int, default=None, help="prefill workers (default 1)")
    up.add_argument("--decode", type=int, default=None, help="decode workers (default 1)")
    up.add_argument("--threads", type=int, default=None, help="torch threads per worker process (default 1)")
    up.add_argument("--kv-cache-memory", default=None, help="KV cache per worker, e.g. 256MiB")
    up.add_argument("--gateway-host", dest="host_ip", default=None, help="gateway interface (default 127.0.0.1)")
    up.add_argument("--port", type=int, default=None, help="gateway port (default 8000; 0: any free port)")
    up.add_argument("--admin-port", type=int, default=None, help="coordinator admin API port (default 8001)")
    up.add_argument("--policy", default=None, choices=["slo", "least-loaded", "round-robin"])
    up.add_argument("--api-key", action="append", help="require this Bearer key at the gateway")
    up.add_argument("--detach", action="store_true", help="return once serving; the supervisor stays in the background")
    up.add_argument("--ready-file", default=None, help=argparse.SUPPRESS)
    up.set_defaults(fn=lambda a: __import__("cluster.launcher").launcher.up(a))

    for name, helptext in (("down", "stop a cluster started with `cluster up`"),
                           ("status", "workers by role, shape, state and load; the leader"),
                           ("logs", "print a process's log (all when none is named)"),
                           ("drain", "give a worker no new work")):
        sp = sub.add_parser(name, help=helptext)
        sp.add_argument("--cluster", default="default")
        sp.add_argument("--state-dir", default=None)
        if name == "status":
            sp.add_argument("--json", action="store_true")
        if name == "logs":
            sp.add_argument("process", nargs="?", default=None)
            sp.add_argument("--bytes", type=int, default=4000)
        if name == "drain":
            sp.add_argument("worker")
        sp.set_defaults(fn=lambda a, n=name: getattr(__import__("cluster.launcher").launcher, n)(a))

    dr = sub.add_parser("drill", help="inject a failure under load into a running cluster and report")
    dr.add_argument("scenario", help="kill-prefill | kill-decode | kill-coordinator | restart-gateway | drain-decode")
    dr.add_argument("--cluster", default="default")
    dr.add_argument("--state-dir", default=None)
    dr.add_argument("--requests", type=int, default=32)
    dr.add_argument("--concurrency", type=int, default=8)
    dr.add_argument("--max-tokens", type=int, default=64)
    dr.add_argument("--whole-timeout", type=float, default=120.0, help="seconds to wait for the cluster to heal")
    dr.add_argument("--json", default=None, help="write the report here too")
    dr.add_argument("--cut", default=None, help="partition-host: shell command that cuts the host's network")
    dr.add_argument("--heal", default=None, help="partition-host: shell command that restores it")
    dr.add_argument("--partition-s", type=float, default=5.0, help="partition-host: seconds the cut lasts")
    dr.add_argument("--victim", default=None, help="partition-host: a worker on the cut host (whole = it is live again)")
    dr.set_defaults(fn=lambda a: __import__("cluster.drill").drill.drill(a))

    be = sub.add_parser("bench", help="serving benchmark against a gateway: latency percentiles, SLO attainment, goodput")
    __import__("cluster.bench").bench.add_arguments(be)
    be.set_defaults(fn=lambda a: __import__("cluster.bench").bench.bench(a))

    pl = sub.add_parser("plan", help="capacity planning: how many prefill/decode workers a workload needs")
    pl.add_argument("--rate", type=float, required=True, help="requests per second")
    pl.add_argument("--prompt-tokens", type=float, default=512)
    pl.add_argument("--output-tokens", type=float, default=128)
    pl.add_argument("--ttft-ms", type=float, required=True)
    pl.add_argument("--tpot-ms", type=float, required=True)
    pl.add_argument("--attainment", type=float, default=0.9)
    pl.add_argument("--devices", type=int, default=None, help="device budget (plan the cheapest layout in it)")
    pl.add_argument("--tp", default="1,2,4,8", help="allowed TP degrees")
    pl.add_argument("--prefill", type=int, default=None, help="instead of a budget: this many prefill workers...")
    pl.add_argument("--decode", type=int, default=None, help="...and decode workers: what rate do they hold?")
    pl.add_argument("--admin", default=None, help="coordinator admin URL (default: the running `cluster up`'s; "
                    "without one, plan locally with default cost models)")
    pl.add_argument("--cluster", default="default")
    pl.add_argument("--state-dir", default=None)
    pl.add_argument("--json", action="store_true", help="print the raw answer")
    pl.set_defaults(fn=cmd_plan)

    pr = sub.add_parser("profile", help="measure the cost model of the running cluster's worker shapes and store it")
    pr.add_argument("--url", default=None, help="gateway URL (default: the running `cluster up`'s)")
    pr.add_argument("--admin", default=None, help="coordinator admin URL (default: the running `cluster up`'s)")
    pr.add_argument("--cluster", default="default")
    pr.add_argument("--state-dir", default=None)
    pr.add_argument("--reps", type=int, default=3, help="requests per prompt length")
    pr.set_defaults(fn=lambda a: __import__("cluster.bench").bench.profile(a))

    m = sub.add_parser("model", help="manage models")
    msub = m.add_subparsers(dest="model_cmd", required=True)
    pull = msub.add_parser("pull", help="fetch and convert the default model (SmolLM2-135M-Instruct)")
    pull.add_argument("--force", action="store_true", help="convert again even if cached")
    pull.set_defaults(fn=cmd_model_pull)

    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from engine.errors import CapacityError, InvalidRequestError, ModelConfigError, ModelFetchError
    try:
        return args.fn(args)
    except (InvalidRequestError, ModelConfigError, CapacityError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (ModelFetchError, ConnectionError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
