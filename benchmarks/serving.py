"""The serving benchmark (issue 8): real clusters started here, one after the other on the same cores,
the same seeded workload through each gateway (cluster/bench.py's load generator), and in one run:

  (a) disaggregated (1 prefill + 1 decode worker) vs colocated (2 colocated workers);
  (b) placement policies `slo` vs `least-loaded` vs `round-robin` on 2 prefill + 2 decode workers,
      with the SLOs sent with each request (so `slo` rejects early what it predicts it cannot serve);
  (c) the simulator's predicted SLO attainment vs the measured one on the 1P+1D cluster at 3 rates
      (cost models from `cluster profile`, rescaled to the step times the workers' heartbeats report
      during each run's warm-up, as the coordinator's online refinement would).

    python benchmarks/serving.py [--quick] [--model DIR] [--out bench_results/serving]

Default: SmolLM2 (fp32, one torch thread per worker), prompts log-normal (mean 96 tokens, sigma 0.5),
outputs log-normal (mean 24, sigma 0.5), Poisson arrivals. `--quick`: a tiny random-weight model and
2-second runs (a smoke run, ~1 minute). Writes serving.json and PNG figures to --out.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import sys
import tempfile
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from live_cluster import LiveCluster, get_json  # noqa: E402

from cluster import bench, calibrate  # noqa: E402

POLICIES = ("slo", "least-loaded", "round-robin")


def load_args(a, warmup: float, duration: float, send_slos: bool) -> types.SimpleNamespace:
    return types.SimpleNamespace(warmup=warmup, duration=duration, arrival="poisson", burstiness=1.0, dataset=None,
                                 prompt_tokens=a.prompt_tokens, prompt_sigma=0.5, output_tokens=a.output_tokens,
                                 output_sigma=0.5, max_prompt=a.max_prompt, max_output=4 * a.output_tokens,
                                 ttft_ms=a.ttft_ms, tpot_ms=a.tpot_ms, send_slos=send_slos, timeout=300)


class Setup:
    """One cluster: etcd, a coordinator with `policy`, the workers of `roles`, a gateway."""

    def __init__(self, tmp: Path, model: Path, roles: list[str], policy: str, worker_flags: tuple[str, ...]):
        self.c = LiveCluster(tmp, model, cluster="bench", worker_flags=worker_flags)
        try:
            self.admin = self.c.coordinator("coord-0", "--policy", policy).info["admin"]
            for i, role in enumerate(roles):
                self.c.worker(role, f"{role}-{i}")
            gw = self.c.gateway()
            self.c.wait_ready(gw, timeout=120)
            self.url = gw.info["url"]
            self.model = get_json(self.url + "/v1/models")["data"][0]["id"]
            self._live(len(roles))
        except BaseException:
            print(self.c.logs(), file=sys.stderr)
            self.c.close()
            raise

    def _live(self, n: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ws = get_json(self.admin + "/v1/cluster")["workers"]
            if sum(w["state"] == "live" for w in ws) == n:
                return
            time.sleep(0.2)
        raise RuntimeError("workers not live in the coordinator's view")

    def run(self, rate: float, args, seed: int, beats: list | None = None) -> tuple[list, float]:
        """All samples of one run (warm-up included) and its start (wall clock); heartbeats into `beats`."""
        return calibrate.run_watched(self.url, self.model, rate, args, random.Random(seed), self.admin, beats)

    def close(self) -> None:
        self.c.close()


def summary(rate: float, samples: list, args) -> dict:
    counted = [s for s in samples if s.arrival >= args.warmup]
    span = max((s.arrival + s.e2e for s in counted if s.e2e is not None), default=args.warmup + args.duration)
    return bench.summarize(rate, counted, max(span - args.warmup, 1e-9), args.ttft_ms / 1e3, args.tpot_ms / 1e3)


def short(r: dict) -> dict:
    ms = lambda d, k: None if d[k] is None else round(d[k] * 1e3, 1)  # noqa: E731
    return {"rate": r["rate"], "attainment": round(r["attainment"], 3), "completed": r["completed"],
            "failed": r["failed"], "throughput_rps": round(r["throughput_rps"], 2),
            "ttft_ms": {k: ms(r["ttft_s"], k) for k in ("p50", "p90", "p99")},
            "tpot_ms": {k: ms(r["tpot_s"], k) for k in ("p50", "p90", "p99")}}


def line(name: str, r: dict) -> str:
    return (f"  {name:<28} {r['rate']:>5g} req/s  attainment {r['attainment']:5.2f}  ok {r['completed']:>4}/"
            f"{r['completed'] + r['failed']:<4} TTFT p50/p90 {r['ttft_ms']['p50']}/{r['ttft_ms']['p90']} ms  "
            f"TPOT p50/p90 {r['tpot_ms']['p50']}/{r['tpot_ms']['p90']} ms")


def figures(out: Path, report: dict) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    fig, axes = plt.subplots(1, 3, figsize=(16, 4))
    ax = axes[0]
    for name, rows in report["disaggregation"].items():
        ax.plot([r["rate"] for r in rows], [r["attainment"] for r in rows], marker="o", label=name)
    ax.set_title("(a) 1P+1D vs 2 colocated")
    ax = axes[1]
    for name, rows in report["policies"].items():
        ax.plot([r["rate"] for r in rows], [r["attainment"] for r in rows], marker="o", label=name)
    ax.set_title("(b) placement on 2P+2D")
    ax = axes[2]
    rows = report["validation"]
    ax.plot([r["rate"] for r in rows], [r["measured"] for r in rows], marker="o", label="measured")
    ax.plot([r["rate"] for r in rows], [r["predicted"] for r in rows], marker="x", linestyle="--",
            label="simulator")
    ax.set_title("(c) predicted vs measured, 1P+1D")
    for ax in axes:
        bench.attainment_axes(ax)
    files.append(bench.save(fig, out / "serving.png"))
    return files


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny random-weight model, 2 s runs (smoke run)")
    ap.add_argument("--model", default=None, help="model directory (default: SmolLM2; --quick: a tiny one)")
    ap.add_argument("--rates", default=None, help="comma-separated rates for (a) and (c) (req/s)")
    ap.add_argument("--policy-rate", type=float, default=None, help="rate for (b) (req/s)")
    ap.add_argument("--duration", type=float, default=None, help="measured seconds per run")
    ap.add_argument("--warmup", type=float, default=None, help="unmeasured seconds first in each run")
    ap.add_argument("--prompt-tokens", type=float, default=96)
    ap.add_argument("--output-tokens", type=float, default=24)
    ap.add_argument("--max-prompt", type=int, default=512)
    ap.add_argument("--ttft-ms", type=float, default=None)
    ap.add_argument("--tpot-ms", type=float, default=None)
    ap.add_argument("--out", default="bench_results/serving")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="tandem-serving-"))
    if a.quick:
        from helpers import make_tiny_model
        model = Path(a.model) if a.model else make_tiny_model(tmp / "tiny", "llama")
        flags = ("--kv-cache-memory", "8MiB", "--block-size", "4")
        rates, policy_rate, dur, warm = [20.0, 60.0, 120.0], 60.0, 2.0, 0.5
        a.prompt_tokens, a.output_tokens, a.max_prompt = 32, 8, 128
        ttft, tpot = 50.0, 20.0
    else:
        from engine.model_store import pull_default
        model = Path(a.model) if a.model else pull_default(progress=False)
        flags = ("--kv-cache-memory", "256MiB", "--block-size", "16")
        rates, policy_rate, dur, warm = [0.5, 1.5, 3.0], 2.0, 15.0, 3.0
        ttft, tpot = 1500.0, 150.0
    rates = [float(x) for x in a.rates.split(",")] if a.rates else rates
    policy_rate = a.policy_rate or policy_rate
    a.ttft_ms, a.tpot_ms = a.ttft_ms or ttft, a.tpot_ms or tpot
    dur, warm = a.duration or dur, a.warmup if a.warmup is not None else warm
    plain, with_slos = load_args(a, warm, dur, False), load_args(a, warm, dur, True)
    report = {"model": str(model), "quick": a.quick, "slo": {"ttft_ms": a.ttft_ms, "tpot_ms": a.tpot_ms},
              "workload": {"arrival": "poisson", "prompt": {"dist": "lognormal", "mean": a.prompt_tokens, "sigma": 0.5},
                           "output": {"dist": "lognormal", "mean": a.output_tokens, "sigma": 0.5},
                           "warmup_s": warm, "duration_s": dur},
              "disaggregation": {}, "policies": {}, "validation": []}
    t_start = time.time()

    # (a) + (c): the 1P+1D cluster, profiled; then 2 colocated workers
    print(f"(a) disaggregated vs colocated, (c) simulator vs live; SLO TTFT {a.ttft_ms:g} ms, TPOT {a.tpot_ms:g} ms")
    s = Setup(tmp / "disagg", model, ["prefill", "decode"], "slo", flags)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            if calibrate.profile(types.SimpleNamespace(url=s.url, admin=s.admin, cluster="bench", state_dir=None,
                                                   reps=3)) != 0:
                raise RuntimeError("cluster profile failed")
        report["profiles"] = get_json(s.admin + "/v1/profiles")
        kv = next(w["kv_capacity_tokens"] for w in get_json(s.admin + "/v1/cluster")["workers"]
                  if w["role"] == "decode")
        rows = []
        for rate in rates:
            samples, _ = s.run(rate, plain, a.seed)
            rows.append(short(summary(rate, samples, plain)))
            print(line("disaggregated 1P+1D", rows[-1]), flush=True)
        report["disaggregation"]["disaggregated 1P+1D"] = rows
        for rate in rates:
            beats: list = []
            samples, t0 = s.run(rate, with_slos, a.seed + 1, beats)
            measured = summary(rate, samples, with_slos)
            profiles = calibrate.calibrated(report["profiles"], beats, until=t0 + warm)
            predicted = calibrate.predicted_attainment(profiles, s.model, 1, 1, kv, "slo", samples, warm,
                                                   a.ttft_ms / 1e3, a.tpot_ms / 1e3)
            row = {"rate": rate, "measured": round(measured["attainment"], 3), "predicted": round(predicted, 3),
                   "difference_points": round(100 * (predicted - measured["attainment"]), 1),
                   "rejected": sum(x.error == "HTTP 429" for x in samples if x.arrival >= warm),
                   "live": short(measured)}
            report["validation"].append(row)
            print(f"  simulator vs live {rate:>8g} req/s  measured {row['measured']:.2f}  predicted "
                  f"{row['predicted']:.2f}  ({row['difference_points']:+.1f} points)", flush=True)
    finally:
        s.close()
    s = Setup(tmp / "coloc", model, ["colocated", "colocated"], "slo", flags)
    try:
        rows = []
        for rate in rates:
            samples, _ = s.run(rate, plain, a.seed)
            rows.append(short(summary(rate, samples, plain)))
            print(line("colocated x2", rows[-1]), flush=True)
        report["disaggregation"]["colocated x2"] = rows
    finally:
        s.close()

    # (b) the placement policies on 2P+2D, the SLOs sent with each request
    print(f"(b) placement policies on 2P+2D at {policy_rate:g} req/s")
    for policy in POLICIES:
        s = Setup(tmp / f"pol-{policy}", model, ["prefill", "prefill", "decode", "decode"], policy, flags)
        try:
            samples, _ = s.run(policy_rate, with_slos, a.seed + 2)
            r = short(summary(policy_rate, samples, with_slos))
            r["rejected"] = sum(x.error == "HTTP 429" for x in samples if x.arrival >= warm)
            report["policies"][policy] = [r]
            print(line(policy, r), flush=True)
        finally:
            s.close()

    dis, col = report["disaggregation"]["disaggregated 1P+1D"], report["disaggregation"]["colocated x2"]
    report["ratios"] = {
        "attainment_disaggregated_over_colocated": [round(d["attainment"] / c["attainment"], 2) if c["attainment"]
                                                    else None for d, c in zip(dis, col)],
        "attainment_slo_over_least_loaded": _ratio(report, "slo", "least-loaded"),
        "attainment_slo_over_round_robin": _ratio(report, "slo", "round-robin"),
        "max_abs_difference_points": max(abs(v["difference_points"]) for v in report["validation"]),
    }
    report["wall_s"] = round(time.time() - t_start, 1)
    print("ratios:", json.dumps(report["ratios"]))
    (out / "serving.json").write_text(json.dumps(report, indent=1))
    try:
        for f in figures(out, report):
            print(f"figure: {f}")
    except ImportError:
        print("figures need matplotlib", file=sys.stderr)
    print(f"wrote {out / 'serving.json'} ({report['wall_s']:g} s)")
    return 0


def _ratio(report: dict, a: str, b: str) -> float | None:
    x, y = report["policies"][a][0]["attainment"], report["policies"][b][0]["attainment"]
    return round(x / y, 2) if y else None


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
