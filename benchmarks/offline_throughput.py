"""Offline throughput: tandem vs Hugging Face transformers and llama.cpp on SmolLM2, with each step's bytes
over the machine's memory bandwidth (the roofline of a memory-bound decode).

    python benchmarks/offline_throughput.py [--concurrency 1 8 32] [--dtypes float32] [--threads 2]
                                            [--out bench_results/offline_throughput.json]

For each concurrency C: C distinct prompts of ~128 tokens, 128 greedy output tokens each (eos ignored),
all submitted at once. Reports output tokens/s (C*128 / wall time), prompt tokens/s (a prefill-only
pass: 1 output token; median of 3), and at C=1 the decode rate (tokens after the first / time after the
first). Systems:
  - `tandem gguf`: the default model as served, its Q4_1 GGUF kept as stored (fp32 activations);
  - `tandem`: the same weights converted to an fp32 checkpoint (`engine.model_store.hf_copy`), dense;
  - `transformers`: `generate` batched with left padding on that fp32 checkpoint, same threads;
  - `tandem gguf int8-act`: the same with int8 activations (opt-in, lossy: llama.cpp's arithmetic), C <= 8;
  - `llama.cpp` (llama-cpp-python, the same GGUF, n_threads = --threads): C=1 only.
At C=1, tandem's lines also give the bytes a decode step reads (weights + KV) and that rate over the
memory bandwidth measured here (a 1 GiB read with --threads threads), the roofline fraction.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TEXT = (
    "The history of computing is a story of people and machines. Early mechanical calculators were built "
    "to add and multiply; later, programmable machines followed instructions stored on punched cards. "
    "Electronic computers of the 1940s filled whole rooms and used vacuum tubes that failed often. The "
    "transistor made machines smaller, faster and more reliable, and the integrated circuit put many "
    "transistors on a single chip. Personal computers brought computing into homes and offices, and the "
    "internet connected them into one network spanning the globe. Today, phones in our pockets are more "
    "powerful than the supercomputers of a few decades ago, and large language models write text, answer "
    "questions and translate between languages. Each generation of hardware and software built on the one "
    "before, and each was shaped by the problems people wanted to solve: navigation, cryptography, "
    "weather forecasting, accounting, science and play. ") * 4


def make_prompts(tok, n: int, length: int) -> list[list[int]]:
    ids = tok.encode(TEXT)
    return [ids[(i * 7) % (len(ids) - length - 1):][:length] for i in range(n)]


DEVICE = "cpu"


def _sync():
    if DEVICE.startswith("cuda"):
        import torch
        torch.cuda.synchronize()


def step_bytes(eng, context: float) -> int:
    """Bytes a decode step of one sequence reads: every weight once (an untied embedding but a row), and
    the KV of `context` tokens."""
    model = eng.runner.model
    total = 0
    for name, module in model.named_modules():
        if getattr(module, "gguf", None) is not None:
            total += module.gguf.nbytes
        for p in module.parameters(recurse=False):
            if not (name == "embed_tokens" and model.lm_head is not None):
                total += p.numel() * p.element_size()
        packed = getattr(module, "packed_weight", None)
        if packed is not None:
            total += module.in_features * module.out_features * packed.element_size()
    spec = eng.runner.kv_spec
    kv = context * spec.num_layers * 2 * spec.num_kv_heads * spec.head_dim * spec.dtype.itemsize
    return int(total + kv)


def memory_bandwidth(threads: int) -> float:
    """Bytes/s of a 1 GiB read with `threads` threads (best of 5)."""
    import torch

    torch.set_num_threads(threads)
    a = torch.ones(2**28)
    best = 0.0
    for _ in range(5):
        t0 = time.perf_counter()
        a.sum()
        best = max(best, a.numel() * 4 / (time.perf_counter() - t0))
    return best


def cpu_info() -> dict:
    info = {"cpus": os.cpu_count()}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        info["model"] = fields.get("Model name", "").strip()
        flags = set(fields.get("Flags", "").split())
        info["flags"] = sorted(f for f in flags if f.startswith(("avx", "amx", "fma", "f16c")))
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def bench_tandem(model_dir, dtype, threads, prompts, out_tokens, quantization="none", int8_activations=False):
    from engine import CacheConfig, DeviceConfig, EngineConfig, LLMEngine, SamplingParams

    eng = LLMEngine(EngineConfig(str(model_dir), cache=CacheConfig(kv_cache_memory=512 * 2**20,
                                                                   enable_prefix_caching=False),
                                 device=DeviceConfig(device=DEVICE, dtype=dtype, num_threads=threads,
                                                     int8_activations=int8_activations),
                                 quantization=quantization))
    bytes_per_step = step_bytes(eng, len(prompts[0]) + out_tokens / 2)
    eng.generate(prompts[:2], SamplingParams(max_tokens=4, temperature=0))  # warm-up
    prefill_s = _median_time(lambda: eng.generate(prompts, SamplingParams(max_tokens=1, temperature=0)))

    sp = SamplingParams(max_tokens=out_tokens, temperature=0, ignore_eos=True)
    for i, p in enumerate(prompts):
        eng.add_request(f"b{i}", p, sp)
    t0 = time.perf_counter()
    first = None
    n = 0
    while eng.has_unfinished_requests():
        for ro in eng.step():
            n += sum(len(o.token_ids) for o in ro.outputs)
        if first is None:
            first = time.perf_counter() - t0
    total = time.perf_counter() - t0
    eng.shutdown()
    r = _result(len(prompts), n, total, first, prefill_s, sum(map(len, prompts)))
    if "decode_tok_s" in r:
        r["step_mb"] = round(bytes_per_step / 1e6, 1)
        r["read_gb_s"] = round(bytes_per_step * r["decode_tok_s"] / 1e9, 2)
    return r


def bench_hf(model_dir, dtype, threads, prompts, out_tokens):
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=getattr(torch, dtype)).eval().to(DEVICE)
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):  # left padding
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    ids, mask = ids.to(DEVICE), mask.to(DEVICE)
    kw = dict(attention_mask=mask, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.inference_mode():
        model.generate(ids[:1, -16:], attention_mask=mask[:1, -16:], max_new_tokens=4, do_sample=False,
                       pad_token_id=0)  # warm-up
        _sync()
        prefill_s = _median_time(lambda: (model(ids, attention_mask=mask, logits_to_keep=1), _sync()))
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=out_tokens, min_new_tokens=out_tokens, **kw)
        total = time.perf_counter() - t0
    n = (out.shape[1] - width) * len(prompts)
    first = None
    if len(prompts) == 1:  # the decode rate: time one more single-token generate for the first token
        with torch.inference_mode():
            t0 = time.perf_counter()
            model.generate(ids, max_new_tokens=1, **kw)
            first = time.perf_counter() - t0
    return _result(len(prompts), n, total, first, prefill_s, sum(map(len, prompts)))


def bench_llama_cpp(gguf, threads, prompts, out_tokens):
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_ctx=1024, n_batch=512, n_threads=threads, n_threads_batch=threads,
                verbose=False, logits_all=False)
    eos = llm.token_eos()
    prompt = prompts[0]
    llm.create_completion(prompt[:16], max_tokens=4, temperature=0.0)  # warm-up
    llm.reset()
    prefill_s = _median_time(lambda: (llm.eval(prompt), llm.reset()))
    t0 = time.perf_counter()
    first, n = None, 0
    for _ in llm.create_completion(prompt, max_tokens=out_tokens, temperature=0.0, stream=True,
                                   logit_bias={eos: float("-inf")}):
        n += 1
        if first is None:
            first = time.perf_counter() - t0
    total = time.perf_counter() - t0
    return _result(1, n, total, first, prefill_s, len(prompt))


PREFILL_REPEATS = 3


def _median_time(fn) -> float:
    """The median of PREFILL_REPEATS timed calls: a prefill is a second or less, and this VM's speed
    swings by tens of percent from one second to the next (one shot each made the ratio wander)."""
    times = []
    for _ in range(PREFILL_REPEATS):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def _result(c, n, total, first, prefill_s, prompt_tokens):
    r = {"concurrency": c, "output_tokens": n, "seconds": round(total, 3),
         "output_tok_s": round(n / total, 1), "prompt_tok_s": round(prompt_tokens / prefill_s, 1)}
    if c == 1 and first is not None and n > 1:
        r["decode_tok_s"] = round((n - 1) / (total - first), 1)
    return r


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--dtypes", nargs="+", default=None,
                    help="activation dtypes (default: float32, and bfloat16 where the CPU computes it natively)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--output-tokens", type=int, default=128)
    ap.add_argument("--peers", nargs="+", default=["transformers", "llama.cpp"])
    ap.add_argument("--int8-up-to", type=int, default=0,
                    help="also run tandem bf16 with int8 weights at concurrency <= this (0: never)")
    ap.add_argument("--int8-activations-up-to", type=int, default=8,
                    help="also run the GGUF with int8 activations (opt-in, lossy, as llama.cpp) at concurrency <= this")
    ap.add_argument("--out", default="bench_results/offline_throughput.json")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (llama.cpp runs on the CPU only)")
    ap.add_argument("--model", default=None, help="a checkpoint directory instead of SmolLM2 (no llama.cpp then)")
    args = ap.parse_args()
    global DEVICE
    DEVICE = args.device

    from engine.model_store import cache_dir, hf_copy, pull_default
    from engine.tokenizer import Tokenizer

    machine = cpu_info()
    if args.dtypes is None:
        native_bf16 = {"avx512_bf16", "amx_bf16"} & set(machine.get("flags", []))
        args.dtypes = ["float32", "bfloat16"] if native_bf16 or args.device != "cpu" else ["float32"]
    gguf_dir = None if args.model else pull_default()
    model_dir = Path(args.model) if args.model else hf_copy()
    tok = Tokenizer(model_dir)
    results = []
    machine["read_gb_s"] = round(memory_bandwidth(args.threads) / 1e9, 1)
    print(f"machine: {machine}", flush=True)

    def record(system, dtype, r):
        r = {"system": system, "dtype": dtype, "threads": args.threads, "device": args.device, **r}
        results.append(r)
        print(json.dumps(r), flush=True)

    for c in args.concurrency:
        prompts = make_prompts(tok, c, args.prompt_tokens)
        for dtype in args.dtypes:
            if gguf_dir is not None and args.device == "cpu":
                record("tandem gguf", dtype, bench_tandem(gguf_dir, dtype, args.threads, prompts, args.output_tokens))
                if c <= args.int8_activations_up_to:
                    record("tandem gguf", "int8-act", bench_tandem(gguf_dir, dtype, args.threads, prompts,
                                                                   args.output_tokens, int8_activations=True))
            record("tandem", dtype, bench_tandem(model_dir, dtype, args.threads, prompts, args.output_tokens))
            if dtype == "bfloat16" and c <= args.int8_up_to:
                record("tandem", "bf16+int8", bench_tandem(model_dir, dtype, args.threads, prompts,
                                                           args.output_tokens, "int8"))
            if "transformers" in args.peers:
                record("transformers", dtype, bench_hf(model_dir, dtype, args.threads, prompts, args.output_tokens))
        if c == 1 and "llama.cpp" in args.peers and args.device == "cpu" and not args.model:
            try:
                import llama_cpp  # noqa: F401
            except ImportError:
                print("llama-cpp-python not installed: skipping llama.cpp (see docs/benchmarks.md)")
            else:
                gguf = next((cache_dir() / "downloads").glob("*.gguf"))
                record("llama.cpp", "Q4_1", bench_llama_cpp(gguf, args.threads, prompts, args.output_tokens))

    print()
    print(f"{'system':<13}{'dtype':<11}{'C':>4}{'out tok/s':>11}{'prompt tok/s':>14}{'decode tok/s':>14}"
          f"{'step MB':>9}{'GB/s':>7}{'roofline':>10}")
    bw = machine["read_gb_s"]
    for r in results:
        roof = f"{r['read_gb_s'] / bw:.0%}" if "read_gb_s" in r else ""
        if roof:
            r["roofline"] = round(r["read_gb_s"] / bw, 3)
        print(f"{r['system']:<13}{r['dtype']:<11}{r['concurrency']:>4}{r['output_tok_s']:>11}"
              f"{r['prompt_tok_s']:>14}{r.get('decode_tok_s', ''):>14}{r.get('step_mb', ''):>9}"
              f"{r.get('read_gb_s', ''):>7}{roof:>10}")
    print(f"(roofline: the bytes a decode step reads times the decode rate, over {bw} GB/s measured here)")
    print()
    ratios = {}
    for r in results:
        if not r["system"].startswith("tandem"):
            continue
        for peer in results:
            same = peer["dtype"] == r["dtype"] or (r["dtype"] == "bf16+int8" and peer["dtype"] == "bfloat16")
            if not peer["system"].startswith("tandem") and peer["concurrency"] == r["concurrency"] and \
                    (same or peer["system"] == "llama.cpp"):
                key = f"{r['system']} {r['dtype']} / {peer['system']} {peer['dtype']} C={r['concurrency']}"
                ratios[key] = {"output": round(r["output_tok_s"] / peer["output_tok_s"], 2),
                               "prompt": round(r["prompt_tok_s"] / peer["prompt_tok_s"], 2)}
                if "decode_tok_s" in r and "decode_tok_s" in peer:
                    ratios[key]["decode"] = round(r["decode_tok_s"] / peer["decode_tok_s"], 2)
                print(f"{key:<62} " + "  ".join(f"{k} x{v}" for k, v in ratios[key].items()))
    for c in args.concurrency:
        ours = [r for r in results if r["system"].startswith("tandem") and r["concurrency"] == c]
        theirs = [r for r in results if r["system"] == "transformers" and r["concurrency"] == c]
        if ours and theirs:
            a, b = max(ours, key=lambda r: r["output_tok_s"]), max(theirs, key=lambda r: r["output_tok_s"])
            key = f"best tandem ({a['system']} {a['dtype']}) / best transformers ({b['dtype']}) C={c}"
            ratios[key] = {"output": round(a["output_tok_s"] / b["output_tok_s"], 2)}
            print(f"{key:<60} output x{ratios[key]['output']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"results": results, "ratios": ratios,
                                          "machine": machine}, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
