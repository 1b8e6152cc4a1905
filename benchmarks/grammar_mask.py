"""Which grammar engine for structured outputs (issue: OpenAI API): llguidance and xgrammar on SmolLM2's
49,152-token vocabulary, one core, in one run.

For each grammar (a JSON schema of the kind tool calls and extraction use, `{"type": "json_object"}`,
a regex, a choice), a valid output is tokenized with the model's tokenizer and replayed token by
token: each step computes the next-token mask (a bitmask over the vocabulary, what the sampler
applies) and then advances the matcher by the token. Reported: the mask time per token (p50, p99,
mean), the time to compile the grammar the first time and again (cached), and the tokenizer's
one-time set-up.

    python benchmarks/grammar_mask.py [--model DIR] [--reps 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string", "pattern": "^[a-z0-9.]+@[a-z0-9]+\\.[a-z]{2,4}$"},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
        "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                    "required": ["city", "zip"], "additionalProperties": False},
        "role": {"enum": ["admin", "user", "guest"]},
    },
    "required": ["name", "age", "email", "tags", "address", "role"],
    "additionalProperties": False,
}
DOC = {"name": "Ada Lovelace", "age": 36, "email": "ada@analytical.org", "tags": ["math", "poetry", "engines"],
       "address": {"city": "London", "zip": "W1"}, "role": "admin"}
CASES = {  # name -> (llguidance grammar, xgrammar compile, valid output)
    "json_schema": (lambda: ("json", json.dumps(SCHEMA)), lambda c: c.compile_json_schema(json.dumps(SCHEMA)),
                    json.dumps(DOC)),
    "json_object": (lambda: ("json", json.dumps({"type": "object"})), lambda c: c.compile_builtin_json_grammar(),
                    json.dumps({**DOC, "notes": "free-form: any JSON object"})),
    "regex": (lambda: ("regex", r"\d{3}-\d{3}-\d{4} \(call [a-z ]{1,30}\)"),
              lambda c: c.compile_regex(r"\d{3}-\d{3}-\d{4} \(call [a-z ]{1,30}\)"), "555-123-4567 (call after noon)"),
    "choice": (lambda: ("regex", "(positive|negative|neutral)"), lambda c: c.compile_regex("(positive|negative|neutral)"),
               "negative"),
}


def _nested(depth: int) -> dict:
    s: dict = {"type": "integer"}
    for _ in range(depth):
        s = {"type": "object", "properties": {"x": s}, "required": ["x"]}
    return s


PATHOLOGICAL = {  # name -> (kind, text): what a hostile or careless client may send
    "regex a{1,5000}": ("regex", "a{1,5000}"),
    "regex ((a|b){1,50}c){1,50}": ("regex", "((a|b){1,50}c){1,50}"),
    "string maxLength 100000": ("json", json.dumps({"type": "string", "maxLength": 100000})),
    "array minItems 1000": ("json", json.dumps({"type": "array", "items": {"type": "integer"}, "minItems": 1000,
                                                "maxItems": 5000})),
    "object of 500 required properties": ("json", json.dumps({
        "type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(500)},
        "required": [f"p{i}" for i in range(500)]})),
    "objects nested 60 deep": ("json", json.dumps(_nested(60))),
    "integer in [12345, 987654321987]": ("json", json.dumps({"type": "integer", "minimum": 12345,
                                                             "maximum": 987654321987})),
}


def pathological(hf_tok, vocab_size: int) -> dict:
    """First compile (and llguidance's first mask) of each hostile grammar, per engine (ms)."""
    import llguidance
    import llguidance.hf
    import llguidance.torch
    import xgrammar as xgr

    tok = llguidance.hf.from_tokenizer(hf_tok)
    mask = llguidance.torch.allocate_token_bitmask(1, tok.vocab_size)
    compiler = xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(hf_tok, vocab_size=vocab_size), max_threads=1)
    out = {}
    for name, (kind, text) in PATHOLOGICAL.items():
        t0 = time.perf_counter()
        m = llguidance.LLMatcher(tok, llguidance.grammar_from(kind, text))
        if not m.is_error():
            llguidance.torch.fill_next_token_bitmask(m, mask, 0)
        llg = 1e3 * (time.perf_counter() - t0)
        t0 = time.perf_counter()
        (compiler.compile_regex if kind == "regex" else compiler.compile_json_schema)(text)
        out[name] = {"llguidance_ms": llg, "xgrammar_ms": 1e3 * (time.perf_counter() - t0),
                     "llguidance_error": m.get_error() if m.is_error() else ""}
    return out


def stats(xs: list[float]) -> dict:
    xs = sorted(xs)
    return {"p50_us": 1e6 * xs[len(xs) // 2], "p99_us": 1e6 * xs[min(len(xs) - 1, int(0.99 * len(xs)))],
            "mean_us": 1e6 * statistics.fmean(xs), "n": len(xs)}


def run_llguidance(hf_tok, ids_of: dict, reps: int) -> dict:
    import llguidance
    import llguidance.hf
    import llguidance.torch

    t0 = time.perf_counter()
    tok = llguidance.hf.from_tokenizer(hf_tok)
    out = {"tokenizer_setup_ms": 1e3 * (time.perf_counter() - t0)}
    mask = llguidance.torch.allocate_token_bitmask(1, tok.vocab_size)
    for name, (grammar, _, _) in CASES.items():
        kind, text = grammar()
        compile_s, times = [], []
        for _ in range(reps):
            t0 = time.perf_counter()
            m = llguidance.LLMatcher(tok, llguidance.grammar_from(kind, text))
            compile_s.append(time.perf_counter() - t0)
            assert not m.is_error(), m.get_error()
            for t in ids_of[name]:
                t0 = time.perf_counter()
                llguidance.torch.fill_next_token_bitmask(m, mask, 0)
                times.append(time.perf_counter() - t0)
                assert m.consume_token(t), (name, t, m.get_error())
        out[name] = {"mask": stats(times), "compile_first_ms": 1e3 * compile_s[0],
                     "compile_again_ms": 1e3 * statistics.median(compile_s[1:] or compile_s)}
    return out


def run_xgrammar(hf_tok, ids_of: dict, reps: int, vocab_size: int) -> dict:
    import xgrammar as xgr

    t0 = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(hf_tok, vocab_size=vocab_size)
    compiler = xgr.GrammarCompiler(info, max_threads=1)
    out = {"tokenizer_setup_ms": 1e3 * (time.perf_counter() - t0)}
    mask = xgr.allocate_token_bitmask(1, info.vocab_size)
    for name, (_, compile_fn, _) in CASES.items():
        compile_s, times = [], []
        for _ in range(reps):
            t0 = time.perf_counter()
            compiled = compile_fn(compiler)  # the compiler caches: reps after the first are lookups
            m = xgr.GrammarMatcher(compiled)
            compile_s.append(time.perf_counter() - t0)
            for t in ids_of[name]:
                t0 = time.perf_counter()
                m.fill_next_token_bitmask(mask)
                times.append(time.perf_counter() - t0)
                assert m.accept_token(t), (name, t)
        out[name] = {"mask": stats(times), "compile_first_ms": 1e3 * compile_s[0],
                     "compile_again_ms": 1e3 * statistics.median(compile_s[1:] or compile_s)}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint directory (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    import torch
    from transformers import AutoTokenizer

    torch.set_num_threads(1)
    if a.model is None:
        from engine.model_store import pull_default
        a.model = str(pull_default(progress=False))
    hf_tok = AutoTokenizer.from_pretrained(a.model)
    vocab_size = json.loads((Path(a.model) / "config.json").read_text())["vocab_size"]
    ids_of = {name: hf_tok.encode(text, add_special_tokens=False) for name, (_, _, text) in CASES.items()}
    from benchmarks.multi_turn import machine
    report = {"machine": machine(), "vocab_size": vocab_size, "tokens": {k: len(v) for k, v in ids_of.items()},
              "llguidance": run_llguidance(hf_tok, ids_of, a.reps), "xgrammar": run_xgrammar(hf_tok, ids_of, a.reps, vocab_size),
              "pathological": pathological(hf_tok, vocab_size)}
    import importlib.metadata as md
    report["versions"] = {p: md.version(p) for p in ("llguidance", "xgrammar")}
    print(f"machine: {report['machine']}; vocabulary {vocab_size}; {report['versions']}")
    for eng in ("llguidance", "xgrammar"):
        r = report[eng]
        print(f"{eng}: tokenizer set-up {r['tokenizer_setup_ms']:.0f} ms")
        for name in CASES:
            c = r[name]
            print(f"  {name:<12} mask p50 {c['mask']['p50_us']:7.1f} us  p99 {c['mask']['p99_us']:8.1f} us  mean "
                  f"{c['mask']['mean_us']:7.1f} us ({c['mask']['n']} tokens)  compile {c['compile_first_ms']:7.1f} ms, "
                  f"again {c['compile_again_ms']:6.2f} ms")
    print("pathological grammars, first compile (ms):")
    for name, r in report["pathological"].items():
        print(f"  {name:<36} llguidance {r['llguidance_ms']:7.1f}  xgrammar {r['xgrammar_ms']:7.1f}"
              + (f"  (llguidance refused: {r['llguidance_error'][:60]})" if r["llguidance_error"] else ""))
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
