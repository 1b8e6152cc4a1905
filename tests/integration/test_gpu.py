"""CUDA paths: skipped without a GPU; run by benchmarks/gpu_check.sh on a lent GPU machine."""

import pytest
import torch

from engine import CacheConfig, DeviceConfig, EngineConfig, LLMEngine, SamplingParams
from helpers import assert_greedy_equal, hf_greedy

pytestmark = [pytest.mark.gpu, pytest.mark.integration,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

PROMPTS = [[5, 17, 42, 99, 123, 7, 8], [200, 31, 64] * 7, list(range(3, 40))]


def test_cuda_fp32_greedy_equals_transformers(tiny_llama):
    from transformers import AutoModelForCausalLM
    eng = LLMEngine(EngineConfig(str(tiny_llama), cache=CacheConfig(block_size=4, num_blocks=128),
                                 device=DeviceConfig(device="cuda", dtype="float32")))
    res = eng.generate(PROMPTS, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))
    m = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32).eval()
    for i, (p, r) in enumerate(zip(PROMPTS, res)):
        assert_greedy_equal(r["outputs"][0]["token_ids"], hf_greedy(m, p, 16), f"cuda prompt {i}")


def test_cuda_bf16_runs_batched_with_sampling(tiny_llama):
    eng = LLMEngine(EngineConfig(str(tiny_llama), cache=CacheConfig(block_size=4, num_blocks=128),
                                 device=DeviceConfig(device="cuda", dtype="bfloat16")))
    greedy = eng.generate(PROMPTS, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, logprobs=2))
    sampled = eng.generate(PROMPTS, SamplingParams(max_tokens=16, temperature=0.8, top_p=0.9, seed=1,
                                                   ignore_eos=True))
    again = eng.generate(PROMPTS, SamplingParams(max_tokens=16, temperature=0.8, top_p=0.9, seed=1,
                                                 ignore_eos=True))
    assert all(len(r["outputs"][0]["token_ids"]) == 16 for r in greedy + sampled)
    assert [r["outputs"][0]["token_ids"] for r in sampled] == [r["outputs"][0]["token_ids"] for r in again]
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks
