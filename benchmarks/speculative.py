"""Speculative decoding (n-gram prompt lookup) against none, on SmolLM2 as served (its Q4_1 GGUF), in one run.

    python benchmarks/speculative.py [--concurrency 1 32] [--threads 2] [--k 4] [--max-tokens 128]
                                     [--draft-layers N] [--out bench_results/speculative.json]

Workloads (chat prompts, greedy, each output capped at --max-tokens):
  - grounded: copy a given text (slices of benchmarks/data/declaration_of_independence.txt), summarize it,
    and edit a given code file (engine/sequence.py: rename a field) -- outputs that repeat their input;
  - free-form: stories and explanations from a one-line prompt.
For each workload and concurrency C (C prompts at once; at C=1 the workload's prompts one at a time),
with speculation off and on: at C=1 the decode rate (tokens after the first over the time after the
first), at C=32 output tokens/s (wall time, prefills included); the speedup, the share of guesses that
held, and whether the outputs are the same tokens (they must be: greedy). Speculation decides per step whether
it pays (engine/spec_decode.py SpeculationPolicy), so at C=32 it may run few speculating steps.
`--draft-layers N` adds a draft-model proposer: SmolLM2 cut to its first N layers (made once from its fp32
copy), quantized to q4_0 at load. The machine's CPU model and flags are printed with the figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROOT = Path(__file__).resolve().parents[1]
TOPICS = ["a lighthouse keeper who finds a message in a bottle", "why the sky is blue", "a robot learning to cook",
          "how bees make honey", "the history of the bicycle", "a dragon afraid of heights",
          "how vaccines work", "a day in the life of a city bus"]


def workloads(n: int) -> dict[str, list[list[dict]]]:
    text = (ROOT / "benchmarks/data/declaration_of_independence.txt").read_text()
    code = (ROOT / "engine/sequence.py").read_text()
    paras = [p for p in text.split("\n\n") if len(p) > 200]
    grounded = []
    for i in range(n):
        p = paras[i % len(paras)][:900]
        kind = i % 3
        if kind == 0:
            msg = f"Copy the following text exactly, word for word:\n\n{p}"
        elif kind == 1:
            msg = f"Summarize the following text, quoting its key sentences:\n\n{p}"
        else:
            start = (i * 600) % max(1, len(code) - 1500)
            msg = ("Rename the field `num_computed_tokens` to `computed` in this Python code and return the whole "
                   f"code:\n\n```python\n{code[start:start + 1400]}\n```")
        grounded.append([{"role": "user", "content": msg}])
    free = [[{"role": "user", "content": (f"Write a short story about {t}." if i % 2 == 0 else f"Explain {t}.")}]
            for i, t in ((i, TOPICS[i % len(TOPICS)]) for i in range(n))]
    return {"grounded": grounded, "free-form": free}


def truncated_draft(layers: int) -> Path:
    """SmolLM2 cut to its first `layers` decoder layers (the fp32 copy's tensors of those, the final norm
    and the embedding): a draft with the target's tokenizer, made once under the cache directory."""
    from safetensors.torch import load_file, save_file

    from engine.model_store import cache_dir, hf_copy

    out = cache_dir() / "models" / f"SmolLM2-135M-Instruct-first{layers}"
    if (out / "model.safetensors").exists():
        return out
    src = hf_copy()
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.suffix in (".json", ".txt", ".jinja") and f.name != "config.json":
            (out / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((src / "config.json").read_text())
    cfg["num_hidden_layers"] = layers
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    tensors = {}
    for f in src.glob("*.safetensors"):
        for name, t in load_file(str(f)).items():
            if not name.startswith("model.layers.") or int(name.split(".")[2]) < layers:
                tensors[name] = t
    save_file(tensors, str(out / "model.safetensors"))
    return out


def cpu_info() -> dict:
    from benchmarks.offline_throughput import cpu_info as info
    return info()


def run(engine, prompts, max_tokens: int, one_at_a_time: bool):
    """Output tokens/s (all tokens over the wall time, prefills included) and, one at a time, the decode
    rate: tokens after the first over the time after the first."""
    from engine import SamplingParams

    sp = SamplingParams(max_tokens=max_tokens, temperature=0)
    s = engine.scheduler
    p0, a0 = s.num_proposed, s.num_accepted
    outs: dict[str, list[int]] = {}
    wall = decode_s = 0.0
    decode_n = 0
    for i, batch in enumerate([[p] for p in prompts] if one_at_a_time else [prompts]):
        ids = [f"b{i}-{j}" for j in range(len(batch))]
        for rid, p in zip(ids, batch):
            engine.add_request(rid, p, sp)
            outs[rid] = []
        t0 = time.perf_counter()
        first = None
        while engine.has_unfinished_requests():
            for ro in engine.step():
                outs[ro.request_id] += ro.outputs[0].token_ids
            if first is None and any(outs[r] for r in ids):
                first = time.perf_counter()
        end = time.perf_counter()
        wall += end - t0
        if one_at_a_time:
            decode_s += end - first
            decode_n += len(outs[ids[0]]) - 1
    n = sum(map(len, outs.values()))
    r = {"tokens": n, "seconds": round(wall, 3), "tok_s": round(n / wall, 2),
         "proposed": s.num_proposed - p0, "accepted": s.num_accepted - a0}
    if one_at_a_time:
        r.update(decode_tok_s=round(decode_n / decode_s, 2), decode_tokens=decode_n, decode_seconds=decode_s)
    return r, list(outs.values())


def merge(into: dict, r: dict) -> None:
    for key in ("tokens", "seconds", "proposed", "accepted", "decode_tokens", "decode_seconds"):
        into[key] += r[key]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--k", type=int, default=4, help="--num-speculative-tokens")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--c1-prompts", type=int, default=6, help="prompts of each workload at C=1, one at a time")
    ap.add_argument("--draft-layers", type=int, default=0,
                    help="also a draft model: SmolLM2's first N layers, q4_0 at load (0: none)")
    ap.add_argument("--out", default="bench_results/speculative.json")
    args = ap.parse_args()

    from engine import CacheConfig, DeviceConfig, EngineConfig, LLMEngine, SamplingParams
    from engine.config import SpeculativeConfig
    from engine.model_store import pull_default

    model = pull_default()
    machine = cpu_info()
    print(f"machine: {machine}", flush=True)
    methods = ["none", "ngram"] + ([f"draft:{truncated_draft(args.draft_layers)}"] if args.draft_layers else [])
    engines = {m: LLMEngine(EngineConfig(str(model), cache=CacheConfig(kv_cache_memory=1 << 30),
                                         device=DeviceConfig(num_threads=args.threads),
                                         speculative=SpeculativeConfig(method=m, num_tokens=args.k,
                                                                       draft_quantization="q4_0")))
               for m in methods}
    for e in engines.values():  # warm-up
        e.generate(["Hello"], SamplingParams(max_tokens=4, temperature=0))
    results = []
    for c in args.concurrency:
        for name, prompts in workloads(max(c, args.c1_prompts)).items():
            prompts = prompts[:args.c1_prompts if c == 1 else c]
            texts = [engines["none"].tokenizer.apply_chat_template(m) for m in prompts]
            res: dict[str, dict] = {}
            outs: dict[str, list] = {m: [] for m in methods}
            if c == 1:  # prompt by prompt, each method in turn: all see the machine as it is at that moment
                for t in texts:
                    for m in methods:
                        r, o = run(engines[m], [t], args.max_tokens, True)
                        if m in res:
                            merge(res[m], r)
                        else:
                            res[m] = dict(r)
                        outs[m] += o
                for r in res.values():
                    r["tok_s"] = round(r["tokens"] / r["seconds"], 2)
                    r["decode_tok_s"] = round(r["decode_tokens"] / r["decode_seconds"], 2)
            else:
                for m in methods:
                    res[m], outs[m] = run(engines[m], texts, args.max_tokens, one_at_a_time=False)
            rate = "decode_tok_s" if c == 1 else "tok_s"  # C=1: the decode rate; else all output over the wall time
            off = res["none"]
            for m in methods[1:]:
                on = res[m]
                r = {"workload": name, "concurrency": c, "method": m.split(":")[0], "k": args.k,
                     "threads": args.threads, "off": off, "on": on, "rate": rate,
                     "speedup": round(on[rate] / off[rate], 3),
                     "acceptance": round(on["accepted"] / on["proposed"], 3) if on["proposed"] else None,
                     "same_tokens": outs[m] == outs["none"]}
                results.append(r)
                print(json.dumps(r), flush=True)
    for e in engines.values():
        e.shutdown()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine, "results": results}, indent=1))
    print(f"\n{'workload':<10} {'C':>3} {'method':<6} {'rate':<13} {'off':>7} {'on':>7} {'speedup':>8} {'accept':>7} "
          "same")
    for r in results:
        acc = f"{r['acceptance']:.0%}" if r["acceptance"] is not None else "-"
        print(f"{r['workload']:<10} {r['concurrency']:>3} {r['method']:<6} {r['rate']:<13} {r['off'][r['rate']]:>7} "
              f"{r['on'][r['rate']]:>7} {r['speedup']:>7}x {acc:>7} {r['same_tokens']}")


if __name__ == "__main__":
    main()
