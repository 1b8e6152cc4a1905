"""`cluster bench`: the serving benchmark, a load generator against a gateway's OpenAI API
(DESIGN.md §6, §8). Torch-free.

    cluster bench --url http://127.0.0.1:8000 --rates 1,2,4,8 --duration 30 --warmup 5 \\
                  --ttft-ms 500 --tpot-ms 50 --attainment 0.9 --json out.json --plots out/

Open-loop arrivals at each rate (Poisson, or gamma with `--burstiness` as its shape: < 1 burstier,
> 1 smoother), prompt and output lengths from log-normal distributions (`--prompt-tokens MEAN`,
`--prompt-sigma`, `--output-tokens MEAN`, `--output-sigma`: the parameters of the underlying normal are
chosen so the mean is MEAN) or from a JSONL dataset (`{"prompt": str | [ids], "max_tokens": n}` per
line). Each request streams with `ignore_eos`, so it produces exactly its output length. Per rate:
throughput, TTFT / TPOT / ITL / end-to-end p50, p90, p99, SLO attainment (both TTFT and TPOT met),
and over the sweep the goodput: DistServe's highest rate whose attainment reaches the target. Requests
that arrive during the warm-up are sent but not counted.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class Sample:
    arrival: float
    prompt_tokens: int
    output_tokens: int
    ttft: float | None = None
    e2e: float | None = None
    itl: list[float] = field(default_factory=list)
    tokens: int = 0
    error: str | None = None

    @property
    def tpot(self) -> float | None:
        if self.ttft is None or self.e2e is None or self.tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.tokens - 1)


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def lognormal_int(rng: random.Random, mean: float, sigma: float, lo: int, hi: int) -> int:
    """An integer from a log-normal with this mean (mu = ln(mean) - sigma^2 / 2), clipped to [lo, hi]."""
    if sigma <= 0:
        return max(lo, min(hi, int(round(mean))))
    return max(lo, min(hi, int(round(rng.lognormvariate(math.log(mean) - sigma * sigma / 2, sigma)))))


def arrivals(rng: random.Random, rate: float, duration: float, process: str, burstiness: float) -> list[float]:
    """Arrival times in [0, duration): Poisson (exponential gaps) or gamma gaps of shape `burstiness`."""
    out, t = [], 0.0
    while True:
        if process == "poisson":
            gap = rng.expovariate(rate)
        else:
            gap = rng.gammavariate(burstiness, 1.0 / (rate * burstiness))
        t += gap
        if t >= duration:
            return out
        out.append(t)


def workload(args, rng: random.Random, n: int) -> list[tuple[object, int, int]]:
    """n (prompt, prompt_tokens, max_tokens)."""
    if args.dataset:
        rows = [json.loads(line) for line in Path(args.dataset).read_text().splitlines() if line.strip()]
        if not rows:
            raise ValueError(f"{args.dataset}: no requests")
        out = []
        for i in range(n):
            r = rows[i % len(rows)]
            p = r["prompt"]
            out.append((p, len(p) if isinstance(p, list) else max(1, len(p) // 4), int(r.get("max_tokens", 128))))
        return out
    out = []
    for _ in range(n):
        plen = lognormal_int(rng, args.prompt_tokens, args.prompt_sigma, 1, args.max_prompt)
        olen = lognormal_int(rng, args.output_tokens, args.output_sigma, 1, args.max_output)
        out.append(([rng.randrange(10, 250) for _ in range(plen)], plen, olen))  # ids every tokenizer has
    return out


async def events(session, url: str, body: dict, s: Sample):
    """The JSON events of one streamed completion; an HTTP error or an error event ends them with
    `s.error` set (connection errors propagate)."""
    async with session.post(url + "/v1/completions", json=body) as r:
        if r.status != 200:
            s.error = f"HTTP {r.status}"
            return
        async for line in r.content:
            if not line.startswith(b"data: {"):
                continue
            ev = json.loads(line[6:])
            if "error" in ev:
                s.error = ev["error"].get("code") or "error"
                return
            yield ev


async def one(session, url: str, model: str, prompt, max_tokens: int, s: Sample, t0: float,
              slos: dict | None = None) -> None:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
            "stream": True, "return_token_ids": True, **(slos or {})}
    last = None
    try:
        async for ev in events(session, url, body, s):
            now = time.perf_counter()
            n = len(ev["choices"][0].get("token_ids") or []) if ev["choices"] else 0
            if n:
                s.tokens += n
                if s.ttft is None:
                    s.ttft = now - t0 - s.arrival
                elif last is not None:
                    s.itl.append(now - last)
                last = now
        if s.error is None:
            s.e2e = time.perf_counter() - t0 - s.arrival
    except Exception as e:  # connection errors count as failed requests
        s.error = type(e).__name__


async def run_rate(url: str, model: str, rate: float, args, rng: random.Random, progress=None) -> list[Sample]:
    import aiohttp

    times = arrivals(rng, rate, args.warmup + args.duration, args.arrival, args.burstiness)
    work = workload(args, rng, len(times))
    samples = [Sample(t, p, o) for t, (_, p, o) in zip(times, work)]
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=args.timeout)) as session:
        t0 = time.perf_counter()
        tasks = []
        for s, (prompt, _, olen) in zip(samples, work):
            delay = s.arrival - (time.perf_counter() - t0)
            if delay > 0:
                await asyncio.sleep(delay)
            slos = {k: v for k, v in (("ttft_ms", args.ttft_ms), ("tpot_ms", args.tpot_ms)) if v} \
                if args.send_slos else None
            task = asyncio.create_task(one(session, url, model, prompt, olen, s, t0, slos))
            if progress is not None:
                task.add_done_callback(lambda _: progress.update(1))
            tasks.append(task)
        await asyncio.gather(*tasks)
    return samples  # the warm-up's too (arrival < args.warmup): a simulation of the run replays them


def summarize(rate: float, samples: list[Sample], wall: float, ttft_slo: float | None, tpot_slo: float | None) -> dict:
    ok = [s for s in samples if s.error is None and s.e2e is not None]
    met = [s for s in ok if (ttft_slo is None or s.ttft <= ttft_slo) and
           (tpot_slo is None or s.tpot is None or s.tpot <= tpot_slo)]

    def dist(xs):
        return {"p50": pct(xs, 0.5), "p90": pct(xs, 0.9), "p99": pct(xs, 0.99), "mean": sum(xs) / len(xs) if xs else None}
    return {
        "rate": rate, "requests": len(samples), "completed": len(ok), "failed": len(samples) - len(ok),
        "throughput_rps": len(ok) / wall if wall else 0.0,
        "output_tokens_per_s": sum(s.tokens for s in ok) / wall if wall else 0.0,
        "ttft_s": dist([s.ttft for s in ok]), "tpot_s": dist([s.tpot for s in ok if s.tpot is not None]),
        "itl_s": dist([x for s in ok for x in s.itl]), "e2e_s": dist([s.e2e for s in ok]),
        "attainment": len(met) / len(samples) if samples else 0.0,
    }


def goodput(results: list[dict], target: float) -> float:
    """DistServe: the highest rate in the sweep whose SLO attainment reaches the target (0 if none)."""
    return max((r["rate"] for r in results if r["attainment"] >= target), default=0.0)


def plots(out: Path, results: list[dict], raw: dict[float, list[Sample]], target: float) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    files = []
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, (name, get) in zip(axes, (("TTFT (s)", lambda s: [s.ttft]), ("TPOT (s)", lambda s: [s.tpot]),
                                      ("end-to-end (s)", lambda s: [s.e2e]))):
        for rate, samples in raw.items():
            xs = sorted(x for s in samples if s.error is None for x in get(s) if x is not None)
            if xs:
                ax.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))], label=f"{rate:g} req/s")
        ax.set_xlabel(name)
        ax.set_ylabel("CDF")
        ax.grid(alpha=0.3)
        ax.legend()
    files.append(save(fig, out / "latency_cdf.png"))
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["rate"] for r in results], [r["attainment"] for r in results], marker="o")
    ax.axhline(target, color="gray", linestyle="--", label=f"target {target:.0%}")
    attainment_axes(ax)
    files.append(save(fig, out / "attainment.png"))
    return files


def attainment_axes(ax) -> None:
    """An attainment-against-rate plot's axes (every figure of the serving benchmarks)."""
    ax.set_xlabel("request rate (req/s)")
    ax.set_ylabel("SLO attainment")
    ax.set_ylim(0, 1.05)
    ax.grid(alpha=0.3)
    ax.legend()


def save(fig, path) -> str:
    import matplotlib.pyplot as plt
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)


def bench(args) -> int:
    from tqdm import tqdm

    url = args.url
    if not url:
        from cluster.ops import read_state
        try:
            url = read_state(args)["url"]
        except RuntimeError as e:
            print(f"error: {e} (or pass --url)", file=sys.stderr)
            return 1
    url = url.rstrip("/")
    try:
        with urllib.request.urlopen(url + "/v1/models", timeout=10) as r:
            model = args.model or json.loads(r.read())["data"][0]["id"]
    except OSError as e:
        print(f"error: no gateway at {url}: {e}", file=sys.stderr)
        return 1
    rates = [float(x) for x in str(args.rates).split(",")]
    if any(r <= 0 for r in rates):
        print("error: --rates must be positive", file=sys.stderr)
        return 2
    if args.workload == "multi-turn":
        from cluster.multi_turn import bench_conversations
        return bench_conversations(args, url, model, rates)
    ttft_slo = args.ttft_ms / 1e3 if args.ttft_ms else None
    tpot_slo = args.tpot_ms / 1e3 if args.tpot_ms else None
    rng = random.Random(args.seed)
    results, raw = [], {}
    for rate in rates:
        expected = int(rate * (args.warmup + args.duration))
        with tqdm(total=expected, desc=f"{rate:g} req/s", unit="req", disable=args.quiet, file=sys.stderr) as bar:
            samples = [s for s in asyncio.run(run_rate(url, model, rate, args, rng, bar)) if s.arrival >= args.warmup]
        # the measured window: from the end of the warm-up to the last counted request's completion
        span = max((s.arrival + s.e2e for s in samples if s.e2e is not None), default=args.warmup + args.duration)
        res = summarize(rate, samples, max(span - args.warmup, 1e-9), ttft_slo, tpot_slo)
        results.append(res)
        raw[rate] = samples
        f = lambda d, k: f"{1e3 * d[k]:.0f}" if d[k] is not None else "-"  # noqa: E731
        print(f"rate {rate:g} req/s: {res['completed']}/{res['requests']} ok, {res['throughput_rps']:.2f} req/s, "
              f"{res['output_tokens_per_s']:.0f} tok/s; TTFT p50/p90/p99 {f(res['ttft_s'], 'p50')}/"
              f"{f(res['ttft_s'], 'p90')}/{f(res['ttft_s'], 'p99')} ms; TPOT p50/p99 {f(res['tpot_s'], 'p50')}/"
              f"{f(res['tpot_s'], 'p99')} ms; attainment {res['attainment']:.0%}")
    g = goodput(results, args.attainment)
    report = {"url": url, "model": model, "arrival": args.arrival, "burstiness": args.burstiness,
              "duration_s": args.duration, "warmup_s": args.warmup,
              "lengths": {"dataset": args.dataset} if args.dataset else {
                  "prompt": {"dist": "lognormal", "mean": args.prompt_tokens, "sigma": args.prompt_sigma},
                  "output": {"dist": "lognormal", "mean": args.output_tokens, "sigma": args.output_sigma}},
              "slo": {"ttft_ms": args.ttft_ms, "tpot_ms": args.tpot_ms, "attainment": args.attainment},
              "results": results, "goodput_rps": g}
    print(f"goodput: {g:g} req/s (highest rate with >= {args.attainment:.0%} of requests meeting both SLOs)")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    if args.plots:
        try:
            for f_ in plots(Path(args.plots), results, raw, args.attainment):
                print(f"plot: {f_}")
        except ImportError:
            print("plots need matplotlib (pip install matplotlib)", file=sys.stderr)
    if args.raw:
        Path(args.raw).write_text(json.dumps({str(r): [asdict(s) for s in ss] for r, ss in raw.items()}))
    return 0


def add_arguments(p) -> None:
    p.add_argument("--url", default=None, help="gateway URL (default: the running `cluster up`'s)")
    p.add_argument("--cluster", default="default")
    p.add_argument("--state-dir", default=None)
    p.add_argument("--model", default=None, help="model name (default: the gateway's first)")
    p.add_argument("--rates", default="1", help="request rates to sweep, comma-separated (req/s)")
    p.add_argument("--arrival", choices=["poisson", "gamma"], default="poisson")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape (1 = Poisson)")
    p.add_argument("--duration", type=float, default=30.0, help="seconds measured at each rate")
    p.add_argument("--warmup", type=float, default=5.0, help="seconds sent first and not counted")
    p.add_argument("--prompt-tokens", type=float, default=256, help="mean prompt length (log-normal)")
    p.add_argument("--prompt-sigma", type=float, default=0.5)
    p.add_argument("--output-tokens", type=float, default=64, help="mean output length (log-normal)")
    p.add_argument("--output-sigma", type=float, default=0.5)
    p.add_argument("--max-prompt", type=int, default=2048)
    p.add_argument("--max-output", type=int, default=1024)
    p.add_argument("--dataset", default=None, help="JSONL: {\"prompt\": str | [ids], \"max_tokens\": n} per line")
    p.add_argument("--ttft-ms", type=float, default=None)
    p.add_argument("--tpot-ms", type=float, default=None)
    p.add_argument("--attainment", type=float, default=0.9, help="goodput target share of requests meeting SLOs")
    p.add_argument("--send-slos", action="store_true",
                   help="send the SLOs with each request (the slo policy then rejects what it cannot serve in time)")
    p.add_argument("--timeout", type=float, default=600.0, help="per-request timeout (s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the report here")
    p.add_argument("--plots", default=None, help="directory for latency CDF and attainment PNGs")
    p.add_argument("--raw", default=None, help="write every request's timings here (JSON)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.add_argument("--workload", choices=["requests", "multi-turn"], default="requests",
                   help="independent requests (default), or conversations (--rates in conversations/s; "
                   "--output-tokens: reply lengths)")
    p.add_argument("--conversations", type=int, default=16, help="multi-turn: conversations a rate")
    p.add_argument("--turns", type=int, default=4, help="multi-turn: turns a conversation")
    p.add_argument("--system-tokens", type=int, default=1000, help="multi-turn: the shared system prompt's length")
    p.add_argument("--system-prompts", type=int, default=1, help="multi-turn: distinct system prompts")
    p.add_argument("--user-tokens", type=float, default=60, help="multi-turn: mean user message length")
    p.add_argument("--think-s", type=float, default=1.0, help="multi-turn: pause before a conversation's next turn")
