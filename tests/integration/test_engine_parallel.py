"""LLMEngine over TP x PP rank processes (gloo): the same tokens as one process, ranks cleaned up."""

import os
import re
import signal
import time

import pytest

from engine import CacheConfig, DeviceConfig, EngineConfig, LLMEngine, SamplingParams, SchedulerConfig, grammar
from engine.config import ParallelConfig

pytestmark = pytest.mark.integration

PROMPTS = [[5, 17, 42, 99, 123, 7, 8], [200, 31, 64] * 9, list(range(3, 40)), [9, 9, 9, 10]]


def engine(model_dir, tp=1, pp=1, num_blocks=64, max_len=None):
    # pipeline_min_seqs=1: this test's few sequences are shared among steps in flight too; fp32, where TP's
    # split sums change no sampled token (in bf16 they could, on a CPU where `auto` means it)
    return LLMEngine(EngineConfig(str(model_dir), cache=CacheConfig(block_size=4, num_blocks=num_blocks),
                                  device=DeviceConfig(dtype="float32"), scheduler=SchedulerConfig(max_model_len=max_len),
                                  parallel=ParallelConfig(tp=tp, pp=pp, timeout_s=30, pipeline_min_seqs=1)))


def run(eng, params):
    return [[o["token_ids"] for o in r["outputs"]] for r in eng.generate(PROMPTS, params)]


# guided decoding on the sampling rank (a follower when pp > 1), from its mirror of the sequences
GUIDED = grammar.check(grammar.regex("[a-z]{3,8}( [a-z]{2,6}){1,3}\\.", "guided_regex"))


@pytest.fixture(scope="module")
def reference(tiny_llama):
    eng = engine(tiny_llama)
    greedy = run(eng, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=1))
    sampled = run(eng, SamplingParams(n=2, max_tokens=10, temperature=0.9, seed=7, ignore_eos=True,
                                      repetition_penalty=1.3))
    guided = run(eng, SamplingParams(max_tokens=40, temperature=0, guided=GUIDED))
    for r in guided:  # each output is a full match (the grammar then allowed only the end)
        assert re.fullmatch(r"[a-z]{3,8}( [a-z]{2,6}){1,3}\.", eng.tokenizer.decode(r[0])), r
    eng.shutdown()
    return greedy, sampled, guided


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2), (2, 2)])
def test_parallel_engine_equals_single_process(tiny_llama, reference, tp, pp):
    eng = engine(tiny_llama, tp, pp)
    try:
        pids = [p.pid for p in eng.executor.followers]
        assert len(pids) == tp * pp - 1
        greedy = run(eng, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=1))
        sampled = run(eng, SamplingParams(n=2, max_tokens=10, temperature=0.9, seed=7, ignore_eos=True,
                                          repetition_penalty=1.3))
        assert greedy == reference[0]
        assert sampled == reference[1]  # seeds, n > 1 and penalties on the sampling rank's mirror
        assert run(eng, SamplingParams(max_tokens=40, temperature=0, guided=GUIDED)) == reference[2]
        assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks
        assert eng.executor.max_in_flight == pp  # pp > 1: steps were in flight side by side
    finally:
        eng.shutdown()
    for pid in pids:  # the follower processes are gone
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_preemption_across_ranks(tiny_llama, reference):
    eng = engine(tiny_llama, 2, 2, num_blocks=14)
    try:
        greedy = run(eng, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=1))
        assert eng.scheduler.num_preemptions > 0
        assert greedy == reference[0]
    finally:
        eng.shutdown()


def test_pipelined_steps_with_aborts_in_flight(tiny_llama, reference):
    """pp = 2 with steps in flight: requests aborted while their step is in flight free their blocks
    when it comes back, and the others still get the single-process tokens."""
    eng = engine(tiny_llama, 1, 2)
    try:
        params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
        for i, p in enumerate(PROMPTS):
            eng.add_request(f"r{i}", p, params)
        got = {f"r{i}": [] for i in range(len(PROMPTS))}
        steps, aborted = 0, set()
        while eng.has_unfinished_requests():
            for ro in eng.step():
                got[ro.request_id] += ro.outputs[0].token_ids
            steps += 1
            if steps == 6:  # mid-decode: abort the requests whose step is in flight right now
                aborted = {s.request_id for s in eng.scheduler.running if s.seq_id in eng._busy}
                assert aborted and len(aborted) < len(PROMPTS)
                for rid in aborted:
                    assert eng.abort_request(rid)
                assert eng._finish_later  # their blocks wait for the step to come back
        assert eng.executor.max_in_flight == 2 and not eng._finish_later
        for i in range(len(PROMPTS)):
            if f"r{i}" not in aborted:
                assert got[f"r{i}"] == reference[0][i][0]
        assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks
    finally:
        eng.shutdown()


def test_impossible_tp_is_refused_before_any_rank_starts(tiny_llama):
    with pytest.raises(ValueError, match="divisible"):
        engine(tiny_llama, tp=3)


def test_a_dead_rank_takes_the_whole_worker_down(tiny_llama):
    eng = engine(tiny_llama, 2, 2)
    try:
        procs = list(eng.executor.followers)
        run(eng, SamplingParams(max_tokens=2, temperature=0))
        os.kill(procs[0].pid, signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(RuntimeError):
            run(eng, SamplingParams(max_tokens=4, temperature=0))
        assert time.monotonic() - t0 < 30
    finally:
        eng.shutdown()
    for p in procs:  # the surviving ranks exit too: no half-alive worker
        assert p.wait(30) is not None


def test_phi3_context_limit_reaches_every_rank(tiny_phi3):
    """LongRoPE's factor set follows the engine's context limit on the follower ranks too (they build
    their config themselves): TP 2 x PP 2 gives the single process's tokens with the short factors."""
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    single = engine(tiny_phi3, max_len=64)
    want = run(single, params)
    single.shutdown()
    eng = engine(tiny_phi3, 2, 2, max_len=64)
    try:
        assert not eng.model_config.rope_scaling.use_long_factor
        assert run(eng, params) == want
    finally:
        eng.shutdown()
