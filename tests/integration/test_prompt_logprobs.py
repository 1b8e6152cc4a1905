"""Prompt logprobs (the completions API's echo + logprobs) against one plain forward of the prompt in
Hugging Face transformers: whatever the engine did to compute the prompt (prefix cache, chunks, n > 1,
preemption, TP x PP ranks), every prompt token after the first gets its logprob and top-k."""

import random

import pytest
import torch

from engine import CacheConfig, DeviceConfig, EngineConfig, LLMEngine, SamplingParams, SchedulerConfig
from engine.config import ParallelConfig

pytestmark = pytest.mark.integration
K = 3


def engine(model_dir, num_blocks=256, budget=2048, tp=1, pp=1):
    return LLMEngine(EngineConfig(  # fp32, as the transformers reference computes
        str(model_dir), cache=CacheConfig(block_size=4, num_blocks=num_blocks),
        scheduler=SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=16), device=DeviceConfig(dtype="float32"),
        parallel=ParallelConfig(tp=tp, pp=pp, timeout_s=30, pipeline_min_seqs=1)))


def prompt(n, seed):
    rng = random.Random(seed)
    return [rng.randrange(3, 250) for _ in range(n)]


@pytest.fixture(scope="module")
def hf_logprobs(tiny_llama):
    """prompt (as a tuple) -> log_softmax of a full forward's logits [len, vocab]."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32).eval()
    cache = {}

    def get(p):
        if tuple(p) not in cache:
            with torch.no_grad():
                cache[tuple(p)] = torch.log_softmax(model(torch.tensor([p])).logits[0].float(), -1)
        return cache[tuple(p)]
    return get


def check(got, p, ref, k=K):
    assert got is not None and len(got) == len(p) and got[0] is None
    for i in range(1, len(p)):
        row = ref[i - 1]
        assert abs(got[i].logprob - float(row[p[i]])) < 1e-4, i
        assert len(got[i].top) == k
        want = row.topk(k)
        assert [t for t, _ in got[i].top] == want.indices.tolist(), i
        assert max((abs(a - b) for (_, a), b in zip(got[i].top, want.values.tolist())), default=0) < 1e-4


def test_prompt_logprobs_equal_a_full_forward_even_on_a_prefix_cache_hit(tiny_llama, hf_logprobs):
    eng = engine(tiny_llama)
    p = prompt(150, 0)  # 149 scored positions: three slices of logits
    params = SamplingParams(max_tokens=3, temperature=0, prompt_logprobs=K)
    for _ in range(2):  # the second would find the whole prompt in the prefix cache
        eng.add_request("r", p, params)
        outs = []
        while eng.has_unfinished_requests():
            outs += eng.step()
        check(outs[0].prompt_logprobs, p, hf_logprobs(p))
        assert outs[0].num_cached_tokens == 0
        assert all(o.prompt_logprobs is None for o in outs[1:])  # only with the first token
    # without prompt_logprobs the same prompt is a hit, and reports none
    res = eng.generate([p], SamplingParams(max_tokens=2, temperature=0))[0]
    assert res["prompt_logprobs"] is None
    assert eng.block_manager.stats.hits > 0


def test_chunked_prefill_n_2_and_preemption(tiny_llama, hf_logprobs):
    """Chunks of at most 16 tokens among other prompts (a chunk's last position scores the next chunk's
    first token); n = 2 reports once; a pool too small for all preempts and recomputes (20 blocks: the
    n = 2 request's first sample, twice in the middle of its prompt)."""
    eng = engine(tiny_llama, num_blocks=20, budget=16)
    ps = [prompt(37, 1), prompt(21, 2), prompt(30, 3), prompt(2, 4)]
    params = [SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, prompt_logprobs=k) for k in (K, 0)] + [
        SamplingParams(n=2, max_tokens=12, temperature=0.8, seed=1, ignore_eos=True, prompt_logprobs=K),
        SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, prompt_logprobs=K)]
    res = eng.generate(ps, params)
    assert eng.scheduler.num_preemptions > 0
    for p, sp, r in zip(ps, params, res):
        check(r["prompt_logprobs"], p, hf_logprobs(p), sp.prompt_logprobs)
        assert all(len(o["token_ids"]) == 12 for o in r["outputs"])
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks


def test_tp_2_pp_2_equal_one_process(tiny_llama, hf_logprobs):
    """The last stage's TP ranks compute the logits together; the sampling rank (a follower) scores
    the chunk's last position with the next token the driver sent it."""
    eng = engine(tiny_llama, budget=16, tp=2, pp=2)
    try:
        ps = [prompt(40, 5), prompt(9, 6)]
        res = eng.generate(ps, SamplingParams(max_tokens=4, temperature=0, prompt_logprobs=K))
    finally:
        eng.shutdown()
    for p, r in zip(ps, res):
        check(r["prompt_logprobs"], p, hf_logprobs(p))
