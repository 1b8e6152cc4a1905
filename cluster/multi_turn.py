"""`cluster bench --workload multi-turn`: conversations against a gateway, the workload where knowing
where KV lives pays (issue 22). Torch-free.

Each conversation has a long system prompt shared with others (`--system-prompts` distinct ones),
and `--turns` turns: the prompt of turn k is the system prompt, every earlier turn's user message and
reply, and a new user message (log-normal lengths, like ShareGPT's); the next turn is sent
`--think-s` after the reply's last token (closed loop, as a user does). Conversations start at
`--rates` conversations per second (Poisson). Prompts are token ids sent to /v1/completions (exactly
the history a chat client resends, with `--template-tokens` ids a message standing for the chat
template), streamed with `ignore_eos`, and the usage the gateway reports says per request which
prompt tokens were cached where they were prefilled (`prompt_tokens_details.cached_tokens`) and how
many had their KV shipped between workers (`kv_transfer_tokens`).

Reported per rate, for first turns and later turns apart: TTFT p50/p90/p99, TPOT, SLO attainment, the
share of prompt tokens cached, KV bytes shipped per prompt token; and the goodput (the highest rate
whose attainment reaches the target). The workload's shape (coordinator/conversations.py) is the
one the simulator and `cluster plan` model, so a live run can be set beside its prediction.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass

from cluster.bench import Sample, events, pct

FILLER = (1000, 40000)  # token ids SmolLM2 (49,152) has as ordinary text: the default


@dataclass
class Turn(Sample):
    """One turn's timings (cluster.bench.Sample, `arrival` in seconds since the run's start) and where its
    KV came from."""
    conversation: int = 0
    turn: int = 0
    cached_tokens: int = 0
    kv_tokens: int = 0

    def met(self, ttft_slo: float | None, tpot_slo: float | None) -> bool:
        return (self.error is None and self.e2e is not None and (ttft_slo is None or self.ttft <= ttft_slo)
                and (tpot_slo is None or self.tpot is None or self.tpot <= tpot_slo))


def ids(rng: random.Random, n: int, id_range: tuple[int, int] = FILLER) -> list[int]:
    return [rng.randrange(*id_range) for _ in range(n)]


async def _turn(session, url: str, model: str, prompt: list[int], s: Turn, t0: float, slos: dict | None) -> list[int]:
    """Streams one turn into `s`; returns the reply's token ids."""
    body = {"model": model, "prompt": prompt, "max_tokens": s.output_tokens, "temperature": 0.0,
            "ignore_eos": True, "stream": True, "return_token_ids": True,
            "stream_options": {"include_usage": True}, **(slos or {})}
    out: list[int] = []
    start = time.perf_counter()
    s.arrival = start - t0
    try:
        async for ev in events(session, url, body, s):
            if ev.get("usage"):
                u = ev["usage"]
                s.cached_tokens = (u.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
                s.kv_tokens = u.get("kv_transfer_tokens") or 0
            new = (ev["choices"][0].get("token_ids") or []) if ev["choices"] else []
            if new:
                if s.ttft is None:
                    s.ttft = time.perf_counter() - start
                out += new
        if s.error is not None:
            return out
        s.tokens = len(out)
        s.e2e = time.perf_counter() - start
    except Exception as e:  # connection errors count as failed requests
        s.error = type(e).__name__
    return out


async def run_conversations(url: str, model: str, scripts, system_tokens: int, system_prompts: int, think_s: float,
                            template_tokens: int, seed: int, timeout: float = 600.0, slos: dict | None = None,
                            progress=None, id_range: tuple[int, int] = FILLER) -> list[Turn]:
    """Every turn of `scripts` (coordinator.conversations.ConversationScript: start, system, turns of
    user and output tokens) through the gateway at `url`. The system prompts' and messages' ids come from `seed`: another
    seed shares nothing with this one, so runs on one cluster do not warm each other's caches."""
    import aiohttp

    rng = random.Random(seed)
    systems = [ids(rng, system_tokens, id_range) for _ in range(system_prompts)]
    template = ids(rng, template_tokens, id_range)
    samples: list[Turn] = []
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        t0 = time.perf_counter()

        async def conversation(i: int, script) -> None:
            crng = random.Random(f"{seed}/{i}")
            await asyncio.sleep(max(0.0, script.start - (time.perf_counter() - t0)))
            history = systems[script.system % len(systems)] + template  # as script.prompt_tokens counts
            for k, t in enumerate(script.turns):
                prompt = history + ids(crng, t.user_tokens, id_range) + template
                s = Turn(0.0, len(prompt), t.output_tokens, conversation=i, turn=k)
                samples.append(s)
                reply = await _turn(session, url, model, prompt, s, t0, slos)
                if progress is not None:
                    progress.update(1)
                if s.error is not None:
                    return  # the conversation ends with its failed turn (the rest count as not sent)
                history = prompt + reply + template
                await asyncio.sleep(think_s)

        await asyncio.gather(*(conversation(i, sc) for i, sc in enumerate(scripts)))
    return samples


def summarize(rate: float, samples: list[Turn], expected: int, ttft_slo: float | None, tpot_slo: float | None,
              kv_bytes_per_token: int) -> dict:
    """One rate's figures; `expected`: the turns the scripts hold (those never sent count as missed)."""
    def dist(xs):
        return {"p50": pct(xs, 0.5), "p90": pct(xs, 0.9), "p99": pct(xs, 0.99)}

    def part(ss: list[Turn]) -> dict:
        ok = [s for s in ss if s.error is None and s.e2e is not None]
        prompt = sum(s.prompt_tokens for s in ok)
        return {"requests": len(ss), "completed": len(ok),
                "unshipped": sum(s.kv_tokens == 0 for s in ok),  # served by one worker: local prefill, colocated
                "ttft_s": dist([s.ttft for s in ok]), "tpot_s": dist([s.tpot for s in ok if s.tpot is not None]),
                "attainment": sum(s.met(ttft_slo, tpot_slo) for s in ss) / len(ss) if ss else 0.0,
                "prompt_tokens": prompt,
                "hit_rate": sum(s.cached_tokens for s in ok) / prompt if prompt else None,
                "kv_bytes_per_request": kv_bytes_per_token * sum(s.kv_tokens for s in ok) / len(ok) if ok else None,
                "kv_bytes_per_prompt_token": kv_bytes_per_token * sum(s.kv_tokens for s in ok) / prompt if prompt else None}

    ok = [s for s in samples if s.error is None and s.e2e is not None]
    wall = max((s.arrival + s.e2e for s in ok), default=0.0)
    return {"rate": rate, "turns_expected": expected, "failed": len(samples) - len(ok),
            "attainment": sum(s.met(ttft_slo, tpot_slo) for s in samples) / expected if expected else 0.0,
            "throughput_rps": len(ok) / wall if wall else 0.0,
            "first": part([s for s in samples if s.turn == 0]), "later": part([s for s in samples if s.turn > 0]),
            "all": part(samples)}


def line(name: str, r: dict) -> str:
    ms = lambda d, k: "-" if d[k] is None else f"{d[k] * 1e3:.0f}"  # noqa: E731
    f, later = r["first"], r["later"]
    pc = lambda x: "-" if x is None else f"{x:.0%}"  # noqa: E731
    kb = lambda x: "-" if x is None else f"{x / 1e3:.1f}"  # noqa: E731
    return (f"  {name:<22} {r['rate']:>5g} conv/s  attain {r['attainment']:4.0%}  failed {r['failed']}  "
            f"TTFT first p50 {ms(f['ttft_s'], 'p50')} ms, later p50/p90/p99 {ms(later['ttft_s'], 'p50')}/"
            f"{ms(later['ttft_s'], 'p90')}/{ms(later['ttft_s'], 'p99')} ms  TPOT p50 {ms(r['all']['tpot_s'], 'p50')} ms  "
            f"hits later {pc(later['hit_rate'])}  KV kB/prompt token first {kb(f['kv_bytes_per_prompt_token'])} "
            f"later {kb(later['kv_bytes_per_prompt_token'])}")


def bench_conversations(args, url: str, model: str, rates: list[float]) -> int:
    """`cluster bench --workload multi-turn` against a running gateway."""
    import sys
    from pathlib import Path

    from coordinator.conversations import Conversations, conversation_script

    ttft_slo = args.ttft_ms / 1e3 if args.ttft_ms else None
    tpot_slo = args.tpot_ms / 1e3 if args.tpot_ms else None
    slos = {k: v for k, v in (("ttft_ms", args.ttft_ms), ("tpot_ms", args.tpot_ms)) if v} if args.send_slos else None
    bytes_per_token = _kv_bytes_per_token(args)
    results = []
    for i, rate in enumerate(rates):
        w = Conversations(rate=rate, turns=args.turns, system_tokens=args.system_tokens,
                          system_prompts=args.system_prompts, user_mean=args.user_tokens,
                          output_mean=args.output_tokens, output_sigma=args.output_sigma, think_s=args.think_s)
        scripts = conversation_script(w, args.conversations, args.seed + i)
        samples = asyncio.run(run_conversations(url, model, scripts, w.system_tokens, w.system_prompts, w.think_s,
                                                w.template_tokens, args.seed * 1000 + i, args.timeout, slos))
        r = summarize(rate, samples, sum(len(s.turns) for s in scripts), ttft_slo, tpot_slo, bytes_per_token)
        results.append(r)
        print(line("multi-turn", r), flush=True)
    g = max((r["rate"] for r in results if r["attainment"] >= args.attainment), default=0.0)
    print(f"goodput: {g:g} conversations/s (highest rate with >= {args.attainment:.0%} of turns meeting both SLOs)"
          + ("" if bytes_per_token else "; KV bytes not known (no coordinator admin API found)"))
    if args.json:
        Path(args.json).write_text(json.dumps({"url": url, "model": model, "workload": "multi-turn",
                                               "results": results, "goodput_conversations_per_s": g}, indent=1))
    if args.plots:
        print("--plots: the multi-turn figure is benchmarks/multi_turn.py's", file=sys.stderr)
    return 0


def kv_bytes_per_token(admin: str) -> int:
    """A worker's KV bytes per token, from the coordinator's admin API at `admin`."""
    import urllib.request

    with urllib.request.urlopen(admin + "/v1/cluster", timeout=5) as r:
        return json.loads(r.read())["workers"][0]["kv_bytes_per_token"]


def _kv_bytes_per_token(args) -> int:
    """kv_bytes_per_token of the running `cluster up`'s coordinator (0 if none is found)."""
    from cluster.ops import read_state
    try:
        return kv_bytes_per_token(read_state(args)["admins"][0])
    except (RuntimeError, OSError, KeyError, IndexError, ValueError):
        return 0
