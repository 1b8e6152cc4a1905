"""SmolLM2-135M-Instruct (the default model, served from its Q4_1 GGUF as stored) against Hugging Face
transformers on the same weights (the GGUF dequantized to an fp32 checkpoint)."""

import json
from pathlib import Path

import pytest
import torch
from helpers import assert_greedy_equal, hf_greedy_batch

from engine import CacheConfig, DeviceConfig, EngineConfig, LLMEngine, SamplingParams

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Once upon a time, in a small village at the edge of a great forest, there lived an old clockmaker who",
]
CHAT = [{"role": "user", "content": "Write a haiku about the sea."}]


@pytest.fixture(scope="module")
def eng(smollm2_dir):
    # fp32, as the reference computes: `auto` would be bf16 on a CPU with AMX
    return LLMEngine(EngineConfig(str(smollm2_dir), cache=CacheConfig(kv_cache_memory=64 * 2**20),
                                  device=DeviceConfig(dtype="float32")))


@pytest.fixture(scope="module")
def hf_model(smollm2_hf_dir):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(str(smollm2_hf_dir), dtype=torch.float32).eval()


def test_greedy_equals_transformers_batched(eng, hf_model):
    tok = eng.tokenizer
    ids = [tok.encode(p) for p in PROMPTS]
    ids.append(tok.encode(tok.apply_chat_template(CHAT), add_special_tokens=False))
    assert len({len(x) for x in ids}) == len(ids)  # different lengths in one batch
    res = eng.generate(ids, SamplingParams(max_tokens=64, temperature=0, ignore_eos=True, logprobs=0))
    for i, (r, ref) in enumerate(zip(res, hf_greedy_batch(hf_model, ids, 64))):
        out = r["outputs"][0]
        tie = assert_greedy_equal(out["token_ids"], ref, f"prompt {i}")
        n = 64 if tie is None else tie
        diff = max(abs(lp.logprob - want) for lp, want in zip(out["logprobs"][:n], ref.logprobs[:n]))
        assert diff < 1e-4, f"prompt {i}: top-1 logprob differs by {diff:.2e}"


def test_chat_answer_and_eos(eng):
    tok = eng.tokenizer
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    out = eng.generate([tok.encode(prompt, add_special_tokens=False)],
                       SamplingParams(max_tokens=64, temperature=0))[0]["outputs"][0]
    assert "Paris" in out["text"]
    assert out["finish_reason"] == "stop"  # <|im_end|> ends the turn


def test_tokenizer_matches_transformers_gguf_loader(smollm2_dir):
    """The tokenizer rebuilt from the GGUF's vocabulary and merges against transformers' own GGUF
    tokenizer. (The weights' conversion against transformers' GGUF loader: test_gguf_models.py, on a
    file mixing every format; here it would cost 30-50 s of transformers dequantizing in numpy.)"""
    from transformers import AutoTokenizer

    from engine.gguf import gguf_file
    from engine.tokenizer import Tokenizer

    gguf = gguf_file(smollm2_dir).resolve()
    hf_tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tok = Tokenizer(smollm2_dir)
    for s in ["Hello  world 12345!\n\ttabs", "héllo wörld 🙂 <|im_start|>user\nhi<|im_end|>", "  leading"]:
        assert tok.encode(s) == hf_tok.encode(s), s


def test_model_dirs(smollm2_dir, smollm2_hf_dir):
    """The served directory: the GGUF's metadata beside a link to it; the converted copy: a plain
    Hugging Face checkpoint."""
    meta = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"]
    assert sorted(p.name for p in Path(smollm2_dir).iterdir()) == sorted([*meta, "model.gguf"])
    assert sorted(p.name for p in Path(smollm2_hf_dir).iterdir()) == sorted([*meta, "model.safetensors"])
    for name in meta:
        a, b = (json.loads((Path(d) / name).read_text()) for d in (smollm2_dir, smollm2_hf_dir))
        assert a == b or name == "config.json" and a.pop("tandem_weights") == "gguf:F32,Q4_1,Q8_0" and a == b
    eng_mem = sum(p.stat().st_size for p in Path(smollm2_hf_dir).glob("*.safetensors"))
    assert (Path(smollm2_dir) / "model.gguf").stat().st_size < eng_mem / 4  # 4.5 bits a weight, not 32


@pytest.mark.parametrize("dtype,quantization", [("bfloat16", "int8"), ("bfloat16", "q4_0")])  # q8_0: test_gguf_models
def test_quantized_at_load_still_answers(smollm2_hf_dir, dtype, quantization):
    e = LLMEngine(EngineConfig(str(smollm2_hf_dir), cache=CacheConfig(kv_cache_memory=32 * 2**20),
                               device=DeviceConfig(dtype=dtype), quantization=quantization))
    tok = e.tokenizer
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    out = e.generate([tok.encode(prompt, add_special_tokens=False)],
                     SamplingParams(max_tokens=32, temperature=0))[0]["outputs"][0]
    assert "Paris" in out["text"]


def test_gguf_with_bf16_activations_answers(smollm2_dir):
    e = LLMEngine(EngineConfig(str(smollm2_dir), cache=CacheConfig(kv_cache_memory=32 * 2**20),
                               device=DeviceConfig(dtype="bfloat16")))
    tok = e.tokenizer
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    out = e.generate([tok.encode(prompt, add_special_tokens=False)],
                     SamplingParams(max_tokens=32, temperature=0))[0]["outputs"][0]
    assert "Paris" in out["text"]


def test_an_int8_kv_cache_still_answers(smollm2_dir):
    """--kv-cache-dtype int8 on the default model (its decode steps through decode_step.c's quantized path;
    fp8_e4m3 there: tests/integration/test_gguf_models.py; the quality cost: docs/benchmarks.md)."""
    from engine import kernels

    e = LLMEngine(EngineConfig(str(smollm2_dir), cache=CacheConfig(kv_cache_memory=16 * 2**20,
                                                                   kv_cache_dtype="int8")))
    assert e.runner.kv_caches[0].shape[-1] == 64 + 4
    tok = e.tokenizer
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    out = e.generate([tok.encode(prompt, add_special_tokens=False)],
                     SamplingParams(max_tokens=32, temperature=0))[0]["outputs"][0]
    assert "Paris" in out["text"]
    assert kernels.decode_step() is None or e.runner.model._decode_step[1] is not None  # the fused step took it


def _run(eng, rid, prompt, params, **kw):
    eng.add_request(rid, prompt, params, **kw)
    text, reason = "", None
    while eng.has_unfinished_requests():
        for ro in eng.step():
            text += ro.outputs[0].text
            reason = ro.outputs[0].finish_reason or reason
    return text, reason


def test_a_resumed_request_emits_held_text_and_finds_a_stop_across_the_migration(eng):
    """A migration: the first worker streamed the text of tokens[:cut] except a tail it held back (a stop
    string could start there); the next worker gets prompt + tokens[:cut] and that tail as `held_text`.
    The client's text is then the same as one uninterrupted run's, with or without a stop string that
    straddles the cut."""
    from engine.tokenizer import IncrementalDetokenizer
    p = eng.tokenizer.encode(PROMPTS[2])
    full = eng.generate([p], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))[0]["outputs"][0]
    ids, text = full["token_ids"], full["text"]
    checked = 0
    for cut in range(3, 18):
        detok = IncrementalDetokenizer(eng.tokenizer, p)
        first = "".join(detok.add(t) for t in ids[:cut])
        stop = text[len(first) - 2:len(first) + 2]
        if len(first) < 4 or len(stop) < 4 or text.find(stop) != len(first) - 2:
            continue  # no stop string of 4 that straddles this cut and appears nowhere earlier
        checked += 1
        hold = len(stop) - 1
        seen, held = first[:len(first) - hold], first[len(first) - hold:]
        resumed = SamplingParams(max_tokens=24 - cut, temperature=0, ignore_eos=True)
        out, reason = _run(eng, f"plain-{cut}", p + ids[:cut], resumed, held_text=held)
        assert seen + out == text and reason == "length"
        resumed = SamplingParams(max_tokens=24 - cut, stop=[stop], temperature=0, ignore_eos=True)
        out, reason = _run(eng, f"stop-{cut}", p + ids[:cut], resumed, held_text=held)
        assert seen + out == text[:len(first) - 2] and reason == "stop", (cut, stop)
    assert checked >= 3


def test_int8_activations_are_opt_in_and_close(smollm2_dir):
    """`int8_activations` (llama.cpp's lossy int8 rounding of a small batch's activations) on the default
    model: every GGUF weight takes it, and plain prompts keep their answers. (The chat question's first
    token is a near tie, -1.88 vs -1.96 nats: there both this mode and llama.cpp itself answer otherwise.)"""
    e = LLMEngine(EngineConfig(str(smollm2_dir), cache=CacheConfig(kv_cache_memory=32 * 2**20),
                               device=DeviceConfig(dtype="float32", int8_activations=True)))
    model = e.executor.runner.model
    assert all(m.gguf.int8_activations for m in model.modules() if getattr(m, "gguf", None) is not None)
    tok = e.tokenizer
    for prompt, answer in [("The capital of France is", "Paris"), ("The capital of Germany is", "Berlin")]:
        out = e.generate([tok.encode(prompt)], SamplingParams(max_tokens=8, temperature=0))[0]["outputs"][0]
        assert answer in out["text"], out["text"]
