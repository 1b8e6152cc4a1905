"""What a quantized KV cache costs in quality (--kv-cache-dtype): perplexity of the default model on a
fixed text with the KV cache in the model's dtype (fp32) and in int8 and fp8_e4m3, and the bytes a
token's KV takes in each.

    python benchmarks/kv_cache_quality.py [--model DIR] [--text FILE] [--chunks 256 2048] [--no-decode] [--threads 1]

The text (default: benchmarks/data/declaration_of_independence.txt, public domain, ~1,500 tokens) is
scored as a prompt with prompt logprobs, so every logprob comes through the cache under test: the engine
attends to K and V as the cache holds them (dequantized), a fresh prefill's own tokens included. Two
ways per dtype:

  - `prefill N`: prefill of N tokens a step (`--chunks`; the default 2048 takes the text in one step,
    which then attends to its own rows read back from the cache); each chunk attends to the earlier
    ones through the cache (the torch path: a gather and SDPA);
  - `decode`: one token a step (teacher forcing: each step adds the next token of the text), so every
    logprob comes from the decode path: for the default model engine/kernels/decode_step.c, whose
    attention reads the quantized rows in C (`--no-decode` skips it: ~1 min per dtype on one core).

Reported: perplexity, its change against fp32, the mean |logprob - fp32's| per token, and the KV bytes
per token (every layer, K and V, scales included); then, per quantized dtype, how far its own runs
(the modes) are apart: rounding K and V to codes turns the last-bit differences between two ways of
computing the same numbers (fp32: ~1e-6) into code steps, so each way is its own draw of the
quantization noise.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine import CacheConfig, DeviceConfig, EngineConfig, LLMEngine, SamplingParams, SchedulerConfig  # noqa: E402
from engine.model_store import resolve_model  # noqa: E402
from engine.tokenizer import Tokenizer  # noqa: E402

DTYPES = ("auto", "int8", "fp8_e4m3")
TEXT = ROOT / "benchmarks" / "data" / "declaration_of_independence.txt"


def prompt_logprobs(model_dir: Path, ids: list[int], kv: str, chunk: int, threads: int) -> tuple[list[float], int]:
    """The logprobs of ids[1:] given their prefixes, scored through a `kv` cache `chunk` tokens a step;
    and the cache's bytes per token."""
    eng = LLMEngine(EngineConfig(str(model_dir),
                                 cache=CacheConfig(kv_cache_memory=256 * 2**20, kv_cache_dtype=kv,
                                                   enable_prefix_caching=False),
                                 scheduler=SchedulerConfig(max_num_batched_tokens=chunk,
                                                           max_model_len=len(ids) + 8),
                                 device=DeviceConfig(num_threads=threads)))
    try:
        out = eng.generate([ids], SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0))[0]
        spec = eng.runner.kv_spec
        return [lp.logprob for lp in out["prompt_logprobs"][1:]], spec.block_bytes // spec.block_size
    finally:
        eng.shutdown()


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model directory (default: the default model, SmolLM2 Q4_1)")
    ap.add_argument("--text", default=str(TEXT))
    ap.add_argument("--chunks", type=int, nargs="+", default=[256, 2048], help="prefill chunks, tokens a step")
    ap.add_argument("--no-decode", action="store_true", help="skip the token-by-token (decode path) runs")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    model_dir = resolve_model(args.model, progress=True)
    ids = Tokenizer(str(model_dir)).encode(Path(args.text).read_text())
    print(f"model {model_dir.name}, text {Path(args.text).name}: {len(ids)} tokens; CPU: {cpu_model()}")
    modes = [(f"prefill {n}", n) for n in args.chunks] + ([] if args.no_decode else [("decode", 1)])
    rows, runs = [], {}
    for mode, chunk in modes:
        base = None
        for kv in DTYPES:
            t0 = time.perf_counter()
            lps, token_bytes = prompt_logprobs(model_dir, ids, kv, chunk, args.threads)
            runs[mode, kv] = lps
            ppl = math.exp(-sum(lps) / len(lps))
            if base is None:
                base = (lps, ppl, token_bytes)
            rows.append((mode, "fp32" if kv == "auto" else kv, ppl, 100 * (ppl / base[1] - 1), mean_abs(lps, base[0]),
                         token_bytes, base[2] / token_bytes))
            print(f"  {mode:12s} {rows[-1][1]:8s} ppl {ppl:8.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    print()
    print("| mode | KV cache | perplexity | vs fp32 | mean abs logprob diff vs fp32 | KV bytes/token | tokens in the "
          "same memory |")
    print("|---|---|---|---|---|---|---|")
    for mode, kv, ppl, pct, drift, tb, ratio in rows:
        print(f"| {mode} | {kv} | {ppl:.4f} | {pct:+.2f}% | {drift:.4f} | {tb:,} | {ratio:.2f}x |")
    print()
    for kv in DTYPES:
        pairs = [(a, b) for i, (a, _) in enumerate(modes) for b, _ in modes[i + 1:]]
        print(f"{'fp32' if kv == 'auto' else kv}: mean abs logprob diff between modes: " + ", ".join(
            f"{a} vs {b} {mean_abs(runs[a, kv], runs[b, kv]):.2g}" for a, b in pairs))


def mean_abs(a: list[float], b: list[float]) -> float:
    return sum(abs(x - y) for x, y in zip(a, b)) / len(a)


if __name__ == "__main__":
    main()
