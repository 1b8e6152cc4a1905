"""A quick cost-model profile of an engine at worker start-up (DESIGN.md §6), refined later by the
coordinator from heartbeats and by `cluster profile`:

    prefill seconds(n)        ≈ a + b·n + c·n²     (timed at a few prompt lengths)
    decode step seconds(B, T) ≈ base + per_seq·B + per_token·T   (timed at a few batch sizes)

It runs real steps on dummy prompts, so it costs about as much as serving them (well under a second
on the tiny test model; about a second on SmolLM2 on 2 CPU cores).
"""

from __future__ import annotations

import time

import numpy as np

from engine.sampling_params import SamplingParams


def _tokens(n: int, rng) -> list[int]:
    return [int(t) for t in rng.integers(5, 200, n)]  # random: no prefix-cache hits between probes


def _timed_prefill(engine, n: int, rng) -> float:
    rid = f"profile-prefill-{n}-{time.monotonic_ns()}"
    engine.add_request(rid, _tokens(n, rng), SamplingParams(max_tokens=1, temperature=0))
    t0 = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
    return time.perf_counter() - t0


def _timed_decode(engine, batch: int, rng, prompt_len: int = 8, steps: int = 4) -> float:
    params = SamplingParams(max_tokens=steps + 1, temperature=0, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"profile-decode-{batch}-{i}-{time.monotonic_ns()}", _tokens(prompt_len, rng), params)
    engine.step()  # the prefills
    t0, n = time.perf_counter(), 0
    while engine.has_unfinished_requests():
        engine.step()
        n += 1
    return (time.perf_counter() - t0) / max(n, 1)


def profile(engine, prefill_lengths=(16, 64, 256), batches=(1, 4, 16)) -> dict:
    cap = min(engine.max_model_len - 2, engine.kv_capacity_tokens // 2)
    lengths = sorted({max(1, min(n, cap)) for n in prefill_lengths})
    rng = np.random.default_rng(0)
    xs = lengths
    ys = [_timed_prefill(engine, n, rng) for n in xs]
    c2 = 0.0
    if len(xs) >= 3:
        c2, b, a = np.polyfit(xs, ys, 2)
    if len(xs) < 3 or c2 < 0:  # too few points, or noise: a line
        c2 = 0.0
        b, a = np.polyfit(xs, ys, 1) if len(xs) >= 2 else (ys[0] / (2 * xs[0]), ys[0] / 2)
    bs, ts = [], []
    max_batch = max(1, min(engine.config.scheduler.max_num_seqs, engine.kv_capacity_tokens // 32))
    for batch in sorted({min(b_, max_batch) for b_ in batches}):
        bs.append(batch)
        ts.append(_timed_decode(engine, batch, rng))
    if len(bs) >= 2:
        per_seq, base = np.polyfit(bs, ts, 1)
    else:
        per_seq, base = 0.0, ts[0]
    return {"prefill": {"a": max(float(a), 1e-4), "b": max(float(b), 1e-7), "c": max(float(c2), 0.0)},
            "decode": {"base": max(float(base), 1e-4), "per_seq": max(float(per_seq), 0.0), "per_token": 1e-7}}
