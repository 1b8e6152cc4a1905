"""The `cluster` command: the subcommand table, `generate` and `model pull`. The server processes
(worker, coordinator, gateway) live in cluster/serve.py, `plan` in cluster/plan.py, `up` in
cluster/launcher.py, `down`/`status`/`logs`/`drain` in cluster/ops.py.

Exit codes: 0 ok, 1 runtime failure, 2 bad input (flags, model directory, request parameters).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from cluster.cli_common import apply_security_args, build_engine_config, engine_args, security_args
from cluster.config import add_key_flags


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


def cmd_keys(args) -> int:
    from common.security import make_keys
    path = make_keys(args.out)
    print(f"wrote {path} (secret: copy it to every host, mode 600) and {path.with_suffix('.key')}")
    print(f"use it: [security] curve_key = \"{path}\" in the cluster file, or --curve-key {path}")
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
    engine_args(g)
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

    __import__("cluster.serve").serve.add_parsers(sub)

    up = sub.add_parser("up", help="start a cluster (etcd, coordinator, workers, gateway) and supervise it")
    up.add_argument("-f", "--file", default=None, help="cluster TOML file (default: one host, 1 prefill + 1 decode)")
    up.add_argument("--host", dest="node", default=None,
                    help="this host's name in the cluster file: start only what is assigned to it (default: local)")
    up.add_argument("--state-dir", default=None, help="logs, etcd data and state.json (default "
                    "$TANDEM_STATE_DIR/NAME or ~/.local/state/tandem/NAME)")
    up.add_argument("--prefill", type=int, default=None, help="prefill workers (default 1)")
    up.add_argument("--decode", type=int, default=None, help="decode workers (default 1)")
    add_key_flags(up)
    up.add_argument("--detach", action="store_true", help="return once serving; the supervisor stays in the background")
    up.add_argument("--ready-file", default=None, help=argparse.SUPPRESS)
    security_args(up)
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
        sp.set_defaults(fn=lambda a, n=name: getattr(__import__("cluster.ops").ops, n)(a))

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

    __import__("cluster.plan").plan.add_parser(sub)

    pr = sub.add_parser("profile", help="measure the cost model of the running cluster's worker shapes and store it")
    pr.add_argument("--url", default=None, help="gateway URL (default: the running `cluster up`'s)")
    pr.add_argument("--admin", default=None, help="coordinator admin URL (default: the running `cluster up`'s)")
    pr.add_argument("--cluster", default="default")
    pr.add_argument("--state-dir", default=None)
    pr.add_argument("--reps", type=int, default=3, help="requests per prompt length")
    pr.set_defaults(fn=lambda a: __import__("cluster.calibrate").calibrate.profile(a))

    ks = sub.add_parser("keys", help="make the cluster's CURVE keypair (encrypts and authenticates ZeroMQ)")
    ks.add_argument("--out", required=True, help="directory for cluster.key_secret (mode 600) and cluster.key")
    ks.set_defaults(fn=cmd_keys)

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
        apply_security_args(args)
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
