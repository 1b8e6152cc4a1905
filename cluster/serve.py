"""The three long-running processes in the foreground: `cluster worker`, `cluster coordinator`,
`cluster gateway` (their flags and their entry points)."""

from __future__ import annotations

import os
import sys
import time

from cluster.cli_common import build_engine_config, engine_args, security_args


def add_parsers(sub) -> None:
    w = sub.add_parser("worker", help="run a prefill, decode or colocated worker in the foreground")
    engine_args(w, worker=True)
    w.add_argument("--role", required=True, choices=["prefill", "decode", "colocated"])
    w.add_argument("--host", default="127.0.0.1", help="interface the worker's sockets bind to (its KV endpoints too)")
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
    security_args(w)
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
    c.add_argument("--no-kv-aware", dest="kv_aware", action="store_false",
                   help="the slo policy ignores the cluster's KV index (cache-blind placement, no local prefill)")
    c.add_argument("--local-prefill-tokens", type=int, default=None,
                   help="a decode worker prefills a request itself iff at most this many tokens are left to "
                   "compute there (default: the cost model decides; 0: never)")
    c.add_argument("--kv-bandwidth-gb-s", type=float, default=2.0,
                   help="what KV pages move at between workers, for placement's transfer time (default 2)")
    c.add_argument("--lease-ttl", type=int, default=2)
    c.add_argument("--ttft-ms", type=float, default=None, help="default TTFT SLO")
    c.add_argument("--tpot-ms", type=float, default=None, help="default TPOT SLO")
    c.add_argument("--slo-class", action="append", help="a named SLO class requests can ask for: "
                   "NAME=TTFT_MS:TPOT_MS (repeatable; 'batch' = no SLOs is built in)")
    security_args(c)
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
    gw.add_argument("--migration-wait", type=float, default=30.0,
                    help="seconds a moved request waits for a worker that can take it (SSE keep-alives meanwhile)")
    gw.add_argument("--lease-ttl", type=int, default=2)
    gw.add_argument("--id", default="", help="gateway id (default: random)")
    security_args(gw)
    gw.set_defaults(fn=cmd_gateway)


def cmd_worker(args) -> int:
    """A worker in the foreground: prints one JSON line when ready (after warm-up), serves until
    SIGTERM/SIGINT, then prints its final stats as JSON."""
    import dataclasses
    import json
    import signal

    t0 = time.perf_counter()
    config = build_engine_config(args)
    config = dataclasses.replace(config, kv_transfer=dataclasses.replace(config.kv_transfer, host=args.host))
    config.kv_transfer.backend(config.device.device)  # nccl without CUDA: a clear error before loading
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
    import msgspec

    info = {"ready": True, "role": args.role, "worker_id": worker.worker_id, "endpoint": worker.endpoint,
            "kv_endpoints": getattr(worker, "kv_endpoints", []), "layout": msgspec.to_builtins(worker.layout),
            "startup_s": round(time.perf_counter() - t0, 2), "pid": os.getpid()}
    registry = None
    if args.registry or args.etcd:
        from common.registry import DirectoryRegistry, WorkerInfo
        profile = {}
        if args.profile:
            from engine.profiler import profile as measure
            profile = measure(worker.engine)
        if args.etcd:
            from common.agent import EtcdRegistry
            registry = EtcdRegistry(args.etcd.split(","), args.cluster, ttl=args.lease_ttl,
                                    interval=args.heartbeat_interval)
        else:
            registry = DirectoryRegistry(args.registry)
        model_name = args.served_model_name or os.path.basename(os.path.normpath(config.model))
        info["model"], info["profile"] = model_name, profile
        bm = worker.engine.block_manager
        registry.register(WorkerInfo(worker.worker_id, args.role, model_name, config.parallel.tp, config.parallel.pp,
                                     worker.layout.block_size, worker.engine.kv_capacity_tokens, worker.endpoint,
                                     info["kv_endpoints"], worker.layout, os.getpid(), info["startup_s"], profile,
                                     bm.root_hash if bm.enable_prefix_caching else 0))
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


def coordinator_config(args):
    """The CoordinatorConfig `cluster coordinator`'s arguments ask for."""
    from coordinator.server import CoordinatorConfig
    classes = {}
    for spec in args.slo_class or []:
        name, _, rest = spec.partition("=")
        try:
            ttft, tpot = (float(x) if x else None for x in rest.split(":"))
        except ValueError:
            raise ValueError(f"--slo-class {spec!r}: expected NAME=TTFT_MS:TPOT_MS (either may be empty)") from None
        classes[name] = (ttft, tpot)
    return CoordinatorConfig(args.etcd.split(","), args.cluster, args.id, args.host, args.placement_port,
                             args.heartbeat_port, args.events_port, args.admin_host, args.admin_port,
                             args.policy, args.suspect_after, args.lease_ttl, args.ttft_ms, args.tpot_ms, classes,
                             kv_aware=args.kv_aware, local_prefill_tokens=args.local_prefill_tokens,
                             kv_bandwidth_gb_s=args.kv_bandwidth_gb_s)


def cmd_coordinator(args) -> int:
    """A coordinator replica in the foreground: one JSON line when serving, until SIGTERM/SIGINT."""
    import asyncio
    import json
    import signal

    import msgspec

    from coordinator.server import serve
    config = coordinator_config(args)

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

    from gateway.server import GatewayConfig, serve
    keys_ = [k for k in (args.api_key or []) if k]
    if os.environ.get("TANDEM_API_KEY"):
        keys_.append(os.environ["TANDEM_API_KEY"])
    config = GatewayConfig(args.etcd.split(","), args.cluster, args.model, args.served_model_name, args.host,
                           args.port, args.internal_host, keys_, max_migrations=args.max_migrations,
                           first_token_timeout=args.first_token_timeout, token_timeout=args.token_timeout,
                           lease_ttl=args.lease_ttl, gateway_id=args.id, migration_wait=args.migration_wait)

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
