"""Disaggregated (1 prefill + 1 decode worker) vs colocated (2 workers) on the same cores.

    python benchmarks/disagg_vs_colocated.py [--rates 0.5 1 2] [--requests 20] [--model DIR]
        [--ttft-ms 1000 --tpot-ms 100] [--out bench_results/disagg_vs_colocated.json]

The same Poisson workload (seeded) goes to both setups, one after the other: prompt lengths
log-normal (median 128 tokens, sigma 0.6, clipped to [16, 768]), output lengths uniform in [16, 64],
greedy, eos ignored. Every worker runs one torch thread, so both setups use the 2 cores alike.
Reports TTFT and TPOT p50/p90/p99 per rate, SLO attainment (both SLOs met), and goodput: the
highest rate whose attainment is >= 90% (DistServe's definition, over the rates swept).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.messages import MessageError, decode_chunk  # noqa: E402
from common.sampling import SamplingSpec  # noqa: E402
from common.worker_client import WorkerClient  # noqa: E402


def start_worker(role, model, kv, extra=()):
    cmd = [sys.executable, "-m", "cluster.cli", "worker", "--role", role, "--kv-cache-memory", kv, *extra]
    if model:
        cmd += ["--model", model]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = p.stdout.readline()
    if not line:
        raise RuntimeError(f"{role} worker failed to start")
    return p, json.loads(line)


def workload(n, rate, seed, vocab=49000):
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1.0 / rate, n)
    arrivals = np.cumsum(gaps) - gaps[0]
    plen = np.clip(rng.lognormal(np.log(128), 0.6, n).astype(int), 16, 768)
    olen = rng.integers(16, 65, n)
    prompts = [rng.integers(100, vocab, int(k)).tolist() for k in plen]
    return list(zip(arrivals.tolist(), prompts, olen.tolist()))


def run_load(client: WorkerClient, submit, reqs, timeout=600):
    """submit(i, prompt, max_tokens); returns per-request (ttft_s, tpot_s)."""
    t0 = time.monotonic()
    first, last, count = {}, {}, {}
    sent_at = {}
    i = 0
    done = set()
    deadline = t0 + timeout
    while len(done) < len(reqs) and time.monotonic() < deadline:
        now = time.monotonic() - t0
        while i < len(reqs) and reqs[i][0] <= now:
            rid = f"q{i}"
            sent_at[rid] = time.monotonic()
            submit(rid, reqs[i][1], reqs[i][2])
            i += 1
        wait_ms = 1 if i >= len(reqs) else max(0, int((reqs[i][0] - now) * 1000))
        if not client.pull.poll(min(wait_ms, 50) or 1):
            continue
        while True:
            try:
                data = client.pull.recv(flags=1)  # NOBLOCK
            except Exception:
                break
            try:
                c = decode_chunk(data)
            except MessageError:
                continue
            t = time.monotonic()
            if c.token_ids:
                first.setdefault(c.request_id, t)
                last[c.request_id] = t
                count[c.request_id] = count.get(c.request_id, 0) + len(c.token_ids)
            if c.finish_reason:
                done.add(c.request_id)
    out = []
    for rid in sent_at:
        if rid not in first:
            out.append((float("inf"), float("inf")))
            continue
        n = count[rid]
        out.append((first[rid] - sent_at[rid], (last[rid] - first[rid]) / max(n - 1, 1)))
    return out


def summarize(samples, ttft_slo, tpot_slo):
    ttft = np.array([s[0] for s in samples])
    tpot = np.array([s[1] for s in samples])
    ok = np.mean((ttft <= ttft_slo) & (tpot <= tpot_slo))
    pct = lambda a, q: round(float(np.percentile(a, q)) * 1e3, 1) if np.isfinite(a).all() else None  # noqa: E731
    return {"ttft_ms": {f"p{q}": pct(ttft, q) for q in (50, 90, 99)},
            "tpot_ms": {f"p{q}": pct(tpot, q) for q in (50, 90, 99)},
            "attainment": round(float(ok), 3), "completed": int(np.isfinite(ttft).sum())}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", type=float, nargs="+", default=[1.0, 2.0, 4.0, 8.0, 16.0])
    ap.add_argument("--requests", type=int, default=20)
    ap.add_argument("--model", default=None)
    ap.add_argument("--ttft-ms", type=float, default=1000)
    ap.add_argument("--tpot-ms", type=float, default=100)
    ap.add_argument("--kv", default="256MiB")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench_results/disagg_vs_colocated.json")
    args = ap.parse_args()
    slo = (args.ttft_ms / 1e3, args.tpot_ms / 1e3)
    results = {}
    for setup in ("disaggregated", "colocated"):
        if setup == "disaggregated":
            procs = [start_worker("decode", args.model, args.kv), start_worker("prefill", args.model, args.kv)]
            d, p = procs[0][1], procs[1][1]
        else:
            procs = [start_worker("colocated", args.model, args.kv, ["--worker-id", f"colocated-{i}"])
                     for i in range(2)]
        try:
            results[setup] = {}
            # None: an unmeasured warm-up round with the same prompts (torch/oneDNN set up kernels
            # per new input shape; the measured rounds should not pay that)
            for rate in [None] + args.rates:
                rate_, n = (max(args.rates), args.requests) if rate is None else (rate, args.requests)
                client = WorkerClient()
                reqs = workload(n, rate_, args.seed)
                counter = [0]

                def submit(rid, prompt, max_tokens):
                    params = SamplingSpec(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
                    if setup == "disaggregated":
                        client.submit(p, rid, prompt, params, decode=d)
                    else:
                        client.submit(procs[counter[0] % 2][1], rid, prompt, params)
                        counter[0] += 1
                res = summarize(run_load(client, submit, reqs), *slo)
                client.close()
                if rate is None:
                    continue
                results[setup][str(rate)] = res
                print(json.dumps({"setup": setup, "rate": rate, **res}), flush=True)
        finally:
            for proc, _ in procs:
                proc.terminate()
                proc.wait(30)
    goodput = {s: max([float(r) for r, v in res.items() if v["attainment"] >= 0.9], default=0.0)
               for s, res in results.items()}
    print(json.dumps({"slo": {"ttft_ms": args.ttft_ms, "tpot_ms": args.tpot_ms}, "goodput_req_s": goodput}))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"results": results, "goodput_req_s": goodput,
                                          "slo": {"ttft_ms": args.ttft_ms, "tpot_ms": args.tpot_ms},
                                          "requests": args.requests, "rates": args.rates}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
