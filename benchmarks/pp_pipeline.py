"""Pipeline parallelism across steps: decode throughput of a pp = 2 engine with up to 2 steps in flight
(each on half the running batch) against the same engine running one step at a time, same run.

    python benchmarks/pp_pipeline.py [--pp 2] [--seqs 8 24 48] [--tokens 64]

SmolLM2 (fp32), prompts of 64 random tokens, greedy, eos ignored; both modes must give the same tokens.
`pipeline_min_seqs` is 1 here, so every batch is cut: the table shows where cutting pays (the default
cuts from 12 sequences per share).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine import CacheConfig, EngineConfig, LLMEngine, SamplingParams  # noqa: E402
from engine.config import ParallelConfig  # noqa: E402
from engine.model_store import resolve_model  # noqa: E402


def run(pp: int, pipelined: bool, prompts: list[list[int]], tokens: int) -> tuple[float, list, int]:
    eng = LLMEngine(EngineConfig(str(resolve_model()), cache=CacheConfig(kv_cache_memory=256 * 2**20),
                                 parallel=ParallelConfig(tp=1, pp=pp, pipeline_steps=pipelined,
                                                         pipeline_min_seqs=1)))
    try:
        eng.generate(prompts[:2], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))  # warm-up
        t0 = time.perf_counter()
        out = eng.generate(prompts, SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True))
        dt = time.perf_counter() - t0
        return len(prompts) * tokens / dt, [o["outputs"][0]["token_ids"] for o in out], eng.executor.max_in_flight
    finally:
        eng.shutdown()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pp", type=int, default=2)
    ap.add_argument("--seqs", type=int, nargs="+", default=[8, 24, 48])
    ap.add_argument("--tokens", type=int, default=64)
    a = ap.parse_args()
    rng = random.Random(0)
    rows = []
    for n in a.seqs:
        prompts = [[rng.randrange(100, 40000) for _ in range(64)] for _ in range(n)]
        seq_tps, seq_ids, _ = run(a.pp, False, prompts, a.tokens)
        pip_tps, pip_ids, depth = run(a.pp, True, prompts, a.tokens)
        row = {"pp": a.pp, "seqs": n, "one_step_tok_s": round(seq_tps, 1), "pipelined_tok_s": round(pip_tps, 1),
               "ratio": round(pip_tps / seq_tps, 2), "same_tokens": pip_ids == seq_ids, "in_flight": depth}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return 0 if all(r["same_tokens"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
