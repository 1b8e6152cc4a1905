"""The engine against Hugging Face transformers on tiny random-weight Llama and Qwen2 (GQA) models, and,
in fewer tests, Qwen3 and Phi-3."""

import random

import pytest
import torch
from helpers import assert_greedy_equal, hf_greedy, make_tiny_model

from engine import CacheConfig, EngineConfig, LLMEngine, SamplingParams, SchedulerConfig
from engine.errors import CapacityError, InvalidRequestError

pytestmark = pytest.mark.integration
GREEDY = dict(temperature=0.0, ignore_eos=True)


def engine(model_dir, num_blocks=256, block_size=4, budget=2048, caching=True, dtype="float32", max_seqs=64,
           kv="auto", max_len=None):
    return LLMEngine(EngineConfig(
        str(model_dir),
        cache=CacheConfig(block_size=block_size, num_blocks=num_blocks, enable_prefix_caching=caching,
                          kv_cache_dtype=kv),
        scheduler=SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=max_seqs, max_model_len=max_len),
        device=__import__("engine").DeviceConfig(dtype=dtype)))


def hf(model_dir):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()


def prompts(n, seed=0, lo=3, hi=40, vocab=250):
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def model_dir(request, tiny_llama, tiny_qwen2):
    return tiny_llama if request.param == "llama" else tiny_qwen2


@pytest.fixture(scope="module")
def reference(model_dir):
    m = hf(model_dir)
    ps = prompts(6)
    return ps, [hf_greedy(m, p, 24) for p in ps]


def tokens_of(results):
    return [r["outputs"][0]["token_ids"] for r in results]


@pytest.mark.parametrize("kernels", ["cpu-kernels", "torch-only"])
def test_batched_greedy_equals_transformers_with_logprobs(model_dir, reference, kernels, monkeypatch):
    """With engine/kernels' fused decode attention (decode-only steps), RoPE and silu * up, and without
    them (torch only, as where no compiler is found)."""
    if kernels == "torch-only":
        monkeypatch.setattr("engine.model.fused_decode_kernel", lambda *a: None)
        monkeypatch.setattr("engine.model.fused_elementwise", lambda *a: None)
        monkeypatch.setattr("engine.layers.rotary.fused_elementwise", lambda *a: None)
    ps, refs = reference
    eng = engine(model_dir)
    res = eng.generate(ps, SamplingParams(max_tokens=24, logprobs=0, **GREEDY))
    for i, (r, ref) in enumerate(zip(res, refs)):
        tie = assert_greedy_equal(r["outputs"][0]["token_ids"], ref, f"prompt {i}")
        n = len(ref.tokens) if tie is None else tie
        ours = [lp.logprob for lp in r["outputs"][0]["logprobs"]][:n]
        assert max(abs(a - b) for a, b in zip(ours, ref.logprobs[:n])) < 1e-4
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks


def test_batch_invariance(model_dir):
    eng = engine(model_dir)
    target = prompts(1, seed=7)[0]
    alone = tokens_of(eng.generate([target], SamplingParams(max_tokens=20, **GREEDY)))[0]
    eng.block_manager.reset_prefix_cache()
    batch = prompts(8, seed=8) + [target]
    together = tokens_of(eng.generate(batch, SamplingParams(max_tokens=20, **GREEDY)))[-1]
    assert alone == together


def test_prefix_cache_hits_give_the_same_tokens(model_dir, reference):
    ps, refs = reference
    eng = engine(model_dir)
    long = ps[0] + ps[1]
    first = tokens_of(eng.generate([long], SamplingParams(max_tokens=16, **GREEDY)))[0]
    before = eng.block_manager.stats.hits
    second = tokens_of(eng.generate([long], SamplingParams(max_tokens=16, **GREEDY)))[0]
    assert eng.block_manager.stats.hits - before >= (len(long) - 1) // 4 * 4
    assert first == second
    cold = tokens_of(engine(model_dir, caching=False).generate([long], SamplingParams(max_tokens=16, **GREEDY)))[0]
    assert cold == first


def test_chunked_prefill_and_preemption_give_the_same_tokens(model_dir, reference):
    ps, refs = reference
    eng = engine(model_dir, num_blocks=24, budget=7, caching=False)
    res = tokens_of(eng.generate(ps, SamplingParams(max_tokens=24, **GREEDY)))
    assert eng.scheduler.num_preemptions > 0
    for i, (r, ref) in enumerate(zip(res, refs)):
        assert_greedy_equal(r, ref, f"prompt {i} (chunked + preempted)")
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks


@pytest.mark.parametrize("kv", ["int8", "fp8_e4m3"])
def test_a_quantized_kv_cache_gives_the_same_tokens_however_the_kv_came_about(model_dir, reference, kv, monkeypatch):
    """--kv-cache-dtype: every attention reads K and V as the cache holds them (a fresh prefill too), so a
    prefix hit, chunked prefill with preemption (recompute) and the torch-only path give the tokens of the
    plain run with the same KV dtype."""
    ps, _ = reference
    greedy = SamplingParams(max_tokens=16, **GREEDY)
    eng = engine(model_dir, kv=kv)
    assert eng.runner.kv_caches[0].shape[-1] == eng.model_config.head_dim + 4
    plain = tokens_of(eng.generate(ps, greedy))
    before = eng.block_manager.stats.hits
    assert tokens_of(eng.generate(ps, greedy)) == plain
    assert eng.block_manager.stats.hits > before
    chunked = engine(model_dir, num_blocks=24, budget=7, caching=False, kv=kv)
    assert tokens_of(chunked.generate(ps, greedy)) == plain
    assert chunked.scheduler.num_preemptions > 0
    monkeypatch.setattr("engine.model.fused_decode_kernel", lambda *a: None)
    monkeypatch.setattr("engine.attention.elementwise", lambda: None)
    assert tokens_of(engine(model_dir, kv=kv).generate(ps, greedy)) == plain


def test_n_samples_and_seeds(model_dir):
    eng = engine(model_dir)
    p = prompts(1, seed=3, lo=10, hi=10)[0]
    greedy = eng.generate([p], SamplingParams(n=3, max_tokens=10, **GREEDY))[0]["outputs"]
    assert greedy[0]["token_ids"] == greedy[1]["token_ids"] == greedy[2]["token_ids"]
    sp = SamplingParams(n=3, max_tokens=12, temperature=1.0, seed=42, ignore_eos=True)
    a = [o["token_ids"] for o in eng.generate([p], sp)[0]["outputs"]]
    b = [o["token_ids"] for o in engine(model_dir).generate([p] + prompts(3, seed=9), sp)[0]["outputs"]]
    assert a == b  # reproducible, whatever else is in the batch
    assert len({tuple(x) for x in a}) > 1  # the samples differ from one another
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks


def test_stop_strings_and_stop_tokens(model_dir):
    eng = engine(model_dir)
    p = prompts(1, seed=11)[0]
    full = eng.generate([p], SamplingParams(max_tokens=24, **GREEDY))[0]["outputs"][0]
    text = full["text"]
    stop = text[8:11]
    cut = text.find(stop)
    out = eng.generate([p], SamplingParams(max_tokens=24, stop=[stop], **GREEDY))[0]["outputs"][0]
    assert out["text"] == text[:cut] and out["finish_reason"] == "stop"
    out = eng.generate([p], SamplingParams(max_tokens=24, stop=[stop], include_stop_str_in_output=True,
                                           **GREEDY))[0]["outputs"][0]
    assert out["text"] == text[:cut + len(stop)]
    tok = full["token_ids"][5]
    out = eng.generate([p], SamplingParams(max_tokens=24, stop_token_ids=[tok], **GREEDY))[0]["outputs"][0]
    assert out["token_ids"] == full["token_ids"][:full["token_ids"].index(tok) + 1]
    assert out["finish_reason"] == "stop"


def test_streamed_text_never_exposes_a_stop_string(model_dir):
    eng = engine(model_dir)
    p = prompts(1, seed=11)[0]
    text = eng.generate([p], SamplingParams(max_tokens=24, **GREEDY))[0]["outputs"][0]["text"]
    stop = text[10:13]
    eng.add_request("s", p, SamplingParams(max_tokens=24, stop=[stop], **GREEDY))
    deltas = []
    while eng.has_unfinished_requests():
        for ro in eng.step():
            deltas.append(ro.outputs[0].text)
    streamed = "".join(deltas)
    assert stop not in streamed and streamed == text[:text.find(stop)]


def test_outputs_processed_a_step_late_are_the_same(model_dir):
    """A worker's output thread processes step k while step k + 1 runs: the stop strings it finds
    reach the core a step late, and the tokens computed meanwhile are dropped, not streamed."""
    eng = engine(model_dir)
    ps = prompts(3, seed=11)
    texts = [o["outputs"][0]["text"] for o in eng.generate(ps, SamplingParams(max_tokens=24, **GREEDY))]
    params = [SamplingParams(max_tokens=24, stop=[t[6:9]], **GREEDY) for t in texts[:2]]
    params.append(SamplingParams(n=2, max_tokens=24, stop=[texts[2][12:14]], logprobs=2, **GREEDY))
    inline = eng.generate(ps, params)
    got = {}
    for i, (p, sp) in enumerate(zip(ps, params)):
        eng.add_request(f"late{i}", p, sp)
        got[f"late{i}"] = [{"token_ids": [], "text": "", "logprobs": [], "finish_reason": None} for _ in range(sp.n)]
    behind = None
    while eng.has_unfinished_requests() or behind is not None:
        core = eng.step_core() if eng.has_unfinished_requests() else None
        if behind is not None:
            outputs, stops = eng.outputs.process(behind)
            for hit in stops:
                eng.report_stop(hit)
            for ro in outputs:
                for co in ro.outputs:
                    o = got[ro.request_id][co.index]
                    o["token_ids"] += co.token_ids
                    o["text"] += co.text
                    o["logprobs"] += co.logprobs or []
                    o["finish_reason"] = co.finish_reason or o["finish_reason"]
        behind = core
    assert [got[f"late{i}"] for i in range(3)] == [r["outputs"] for r in inline]
    assert [o["finish_reason"] for r in inline for o in r["outputs"]].count("stop") >= 2
    assert eng.outputs.num_requests == 0
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks


def test_abort_frees_everything(model_dir):
    eng = engine(model_dir)
    for i, p in enumerate(prompts(4)):
        eng.add_request(f"r{i}", p, SamplingParams(max_tokens=50, **GREEDY))
    eng.step()
    eng.step()
    assert eng.block_manager.num_free_blocks < eng.block_manager.num_blocks
    for i in range(4):
        assert eng.abort_request(f"r{i}")
    assert not eng.abort_request("r0")
    assert not eng.has_unfinished_requests()
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks


def test_bad_requests_raise_typed_errors(model_dir):
    eng = engine(model_dir, num_blocks=8)
    with pytest.raises(InvalidRequestError, match="context"):
        eng.add_request("a", [5] * 600)
    with pytest.raises(InvalidRequestError, match="token ids"):
        eng.add_request("b", [5, -1])
    with pytest.raises(InvalidRequestError, match="empty"):
        eng.add_request("c", "")
    with pytest.raises(InvalidRequestError, match="vocabulary") as e:  # the sampler indexes logits by them
        eng.add_request("c2", [5, 6], SamplingParams(stop_token_ids=[eng.model_config.vocab_size], min_tokens=2))
    assert e.value.param == "stop_token_ids"
    with pytest.raises(CapacityError):
        eng.add_request("d", [5] * 40)
    eng.add_request("e", [5, 6])
    with pytest.raises(InvalidRequestError, match="already"):
        eng.add_request("e", [5, 6])


def test_llama3_rope_scaling_and_bfloat16(tmp_path):
    d = make_tiny_model(tmp_path, "llama", seed=1, tie_word_embeddings=True,
                        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    ps = prompts(3, seed=5, lo=60, hi=90)
    m = hf(d)
    refs = [hf_greedy(m, p, 16) for p in ps]
    res = tokens_of(engine(d).generate(ps, SamplingParams(max_tokens=16, **GREEDY)))
    for i, (r, ref) in enumerate(zip(res, refs)):
        assert_greedy_equal(r, ref, f"llama3-rope prompt {i}")
    out = engine(d, dtype="bfloat16").generate(ps, SamplingParams(max_tokens=8, logprobs=1, **GREEDY))
    lps = [lp.logprob for r in out for lp in r["outputs"][0]["logprobs"]]
    assert len(lps) == 24 and all(lp <= 0.0 and lp == lp for lp in lps)


@pytest.mark.parametrize("arch,max_len,lo,hi", [
    ("qwen3", None, 3, 40),
    # LongRoPE (original_max_position_embeddings 64 of 512): transformers takes the short factors while a
    # sequence fits in 64 positions, the long ones past that; the engine takes one set by its context limit
    ("phi3", 64, 3, 40),  # limit 64: short factors, sequences of at most 56 tokens
    ("phi3", None, 65, 90),  # limit 512: long factors, prompts already past 64
])
def test_qwen3_and_phi3_greedy_equal_transformers(arch, max_len, lo, hi, tiny_qwen3, tiny_phi3, monkeypatch):
    """Qwen3's q/k norm (head_dim 32, not 64 / 4) and Phi-3's fused projections and LongRoPE, token for token
    against transformers: with the CPU kernels, chunked and preempted, and torch only."""
    d = tiny_qwen3 if arch == "qwen3" else tiny_phi3
    ps = prompts(4, seed=21, lo=lo, hi=hi)
    m = hf(d)
    refs = [hf_greedy(m, p, 16) for p in ps]
    greedy = SamplingParams(max_tokens=16, logprobs=0, **GREEDY)
    eng = engine(d, max_len=max_len)
    assert eng.model_config.rope_scaling.use_long_factor == (arch == "phi3" and max_len is None)
    res = eng.generate(ps, greedy)
    for i, (r, ref) in enumerate(zip(res, refs)):
        tie = assert_greedy_equal(r["outputs"][0]["token_ids"], ref, f"{arch} prompt {i}")
        n = len(ref.tokens) if tie is None else tie
        ours = [lp.logprob for lp in r["outputs"][0]["logprobs"]][:n]
        assert max(abs(a - b) for a, b in zip(ours, ref.logprobs[:n])) < 1e-4
    # room for the longest sequence and a little more: the four together preempt
    chunked = engine(d, num_blocks=(hi + 16) // 4 + 2, budget=7, caching=False, max_len=max_len)
    assert tokens_of(chunked.generate(ps, greedy)) == tokens_of(res)
    assert chunked.scheduler.num_preemptions > 0
    monkeypatch.setattr("engine.model.fused_decode_kernel", lambda *a: None)
    monkeypatch.setattr("engine.model.fused_elementwise", lambda *a: None)
    monkeypatch.setattr("engine.layers.rotary.fused_elementwise", lambda *a: None)
    monkeypatch.setattr("engine.layers.norm._fused_norm", lambda *a: None)
    assert tokens_of(engine(d, max_len=max_len).generate(ps, greedy)) == tokens_of(res)
