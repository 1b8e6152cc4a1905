"""CUDA paths: skipped without a GPU; run by benchmarks/gpu_check.sh on a lent GPU machine."""

import pytest
import torch
from helpers import assert_greedy_equal, hf_greedy

from engine import CacheConfig, DeviceConfig, EngineConfig, LLMEngine, SamplingParams

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


@pytest.mark.parametrize("stream", [False, True], ids=["zmq", "tcp"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_kv_pages_go_through_pinned_host_buffers_over_zeromq(dtype, stream):
    """ZeroMQ (frames, or the tcp transport's stream), CUDA caches on both ends: pages leave through
    page-locked staging buffers (one per message, copied asynchronously) and land through one, bit for
    bit, partial heads included."""
    import time

    from kvtransfer.frames import host_buffer
    from kvtransfer.outgoing import OutgoingTransfer
    from kvtransfer.pages import RankCaches
    from kvtransfer.plan import KVLayout, plan_transfer
    from kvtransfer.receiver import RankReceiver
    from kvtransfer.zmq_transport import KVClient, KVServer

    assert host_buffer(64, torch.device("cuda")).is_pinned()
    name = str(dtype).removeprefix("torch.")
    src_layout, dst_layout = KVLayout(4, 2, 8, 4, name), KVLayout(4, 2, 8, 4, name, tp=2)
    src = RankCaches([torch.randn(2, 16, 2, 4, 8, device="cuda").to(dtype) for _ in range(4)], 0, 0)
    done, servers = [], []
    for rank in range(2):  # destination tp=2: each rank takes one of the two heads
        dst = RankCaches([torch.zeros(2, 16, 1, 4, 8, device="cuda", dtype=dtype) for _ in range(4)], 0, rank)
        recv = RankReceiver(rank, dst_layout, dst, lambda *a: done.append(a))
        assert recv.stage_frames
        servers.append(KVServer("tcp://127.0.0.1:0", recv, None, stream=stream))
        servers[-1].start()
        recv.expect("r", 0, [9, 10, 11], src_layout, time.monotonic() + 10)
    client = KVClient(0, stream=stream)
    client.start()
    try:
        out = OutgoingTransfer(client, src, plan_transfer(src_layout, dst_layout), 0, "r", 0,
                               [s.endpoint for s in servers], [1, 2, 3], [9, 10, 11])
        out.send_layer(0)
        assert out.send_all() == 2  # layers 1-3, one message per destination rank
        deadline = time.monotonic() + 10
        while len(done) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sorted(d[2] for d in done) == [0, 1] and all(d[3] for d in done)
        for rank, s in enumerate(servers):
            for layer in range(4):
                want = src.caches[layer][:, 1:4, rank:rank + 1]
                assert torch.equal(s.receiver.caches.caches[layer][:, 9:12], want)
            assert s.receiver.metrics["frames_staged"] == 4
        assert client.metrics["messages_staged"] == 4
        assert client.metrics["messages_streamed"] == (4 if stream else 0)
    finally:
        client.stop()
        for s in servers:
            s.stop()
