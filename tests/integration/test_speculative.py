"""Speculative decoding on real (tiny) models: the output with it equals the output without it.

An oracle proposer (the speculation-off output, every third guess wrong) makes long accepted runs and
misses both happen on any model; the n-gram proposer runs on repetitive prompts."""

import random

import pytest
from helpers import make_tiny_gguf

from engine import CacheConfig, DeviceConfig, EngineConfig, LLMEngine, SamplingParams
from engine.config import ParallelConfig, SpeculativeConfig
from engine.kernels.gguf import decode_step
from engine.model_store import resolve_model

pytestmark = pytest.mark.integration

rng = random.Random(3)
PROMPTS = [[rng.randrange(3, 250) for _ in range(rng.randint(4, 30))] for _ in range(3)]
PROMPTS += [[40, 41, 42, 43, 44] * 6, [7, 8] * 10 + [9]]


class Oracle:
    """Proposes what the speculation-off run produced after the sequence's output so far (for the
    sequence whose prompt it is), with every `wrong`-th guess off by one."""

    def __init__(self, reference: dict[tuple, list[int]], wrong: int = 3):
        self.reference, self.wrong, self.calls = reference, wrong, 0

    def propose(self, seq, k):
        ref = self.reference.get(tuple(seq.token_ids[:seq.num_prompt_tokens]), [])
        n = seq.num_output_tokens
        out = []
        for t in ref[n:n + k]:
            self.calls += 1
            out.append((t + 1) % 250 if self.calls % self.wrong == 0 else t)
        return out


def engine(model_dir, spec="none", k=4, tp=1, pp=1, seed=0, num_blocks=256):
    """(With speculation, every step speculates, as many guesses as allowed: step times and acceptance
    rates do not decide it here.)"""
    eng = LLMEngine(EngineConfig(
        str(model_dir), cache=CacheConfig(block_size=4, num_blocks=num_blocks),
        device=DeviceConfig(dtype="float32", seed=seed),
        parallel=ParallelConfig(tp=tp, pp=pp, timeout_s=30, pipeline_min_seqs=1),
        speculative=SpeculativeConfig(method=spec, num_tokens=k, max_batch=1000)))
    eng.scheduler.spec_policy.decide = lambda n: n > 0
    eng.scheduler.spec_policy.guesses = lambda seq_id, k, n=1: k
    return eng


def outputs(eng, params, prompts=PROMPTS):
    res = eng.generate(prompts, params)
    return [r["outputs"][0] for r in res]


PARAMS = {
    "greedy": SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, logprobs=2),
    "seeded": SamplingParams(max_tokens=24, temperature=0.9, top_p=0.95, seed=11, ignore_eos=True,
                             repetition_penalty=1.2),
    "penalised": SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, frequency_penalty=0.7, min_tokens=5),
}


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    return resolve_model(str(make_tiny_gguf(tmp_path_factory.mktemp("spec-gguf") / "tiny.gguf", {}, hidden=128,
                                            intermediate=256)))


@pytest.fixture(scope="module", params=["hf", "gguf"])
def model(request, tiny_llama, tiny_gguf):
    """An HF checkpoint (layer by layer, the decode attention kernel) and a GGUF file (the fused decode
    step: every layer in one C call), each with its speculation-off outputs."""
    path = tiny_llama if request.param == "hf" else tiny_gguf
    eng = engine(path)
    ref = {name: outputs(eng, p) for name, p in PARAMS.items()}
    eng.shutdown()
    return path, ref


def oracle_for(ref_outputs):
    return Oracle({tuple(p): o["token_ids"] for p, o in zip(PROMPTS, ref_outputs)})


@pytest.mark.parametrize("name", list(PARAMS))
def test_outputs_equal_speculation_off(model, name, tiny_llama):
    path, ref = model
    eng = engine(path, "ngram", k=3)
    try:
        eng.scheduler.proposer = oracle_for(ref[name])
        got = outputs(eng, PARAMS[name])
        assert [o["token_ids"] for o in got] == [o["token_ids"] for o in ref[name]]
        assert [o["text"] for o in got] == [o["text"] for o in ref[name]]
        if name == "greedy":
            for a, b in zip(got, ref[name]):
                assert len(a["logprobs"]) == len(b["logprobs"]) == 24
                for x, y in zip(a["logprobs"], b["logprobs"]):
                    assert x.logprob == pytest.approx(y.logprob, abs=1e-4)
                    assert [t for t, _ in x.top] == [t for t, _ in y.top]
        s = eng.scheduler
        # runs of accepted guesses, and misses
        assert s.num_accepted >= 20 and s.num_proposed - s.num_accepted >= 10, (s.num_proposed, s.num_accepted)
        assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks
        if path.name != tiny_llama.name and decode_step() is not None:  # the guesses went through it
            assert eng.runner.model._decode_step[1] is not None
    finally:
        eng.shutdown()


def test_ngram_proposer_on_repetitive_prompts(tiny_llama):
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    off = engine(tiny_llama)
    want = outputs(off, params)
    off.shutdown()
    eng = engine(tiny_llama, "ngram", k=5)
    try:
        assert [o["token_ids"] for o in outputs(eng, params)] == [o["token_ids"] for o in want]
        assert eng.scheduler.num_proposed > 0
    finally:
        eng.shutdown()


def test_stops_and_max_tokens_are_exact_when_several_guesses_hold(model):
    """A stop string, a stop token or max_tokens inside a run of accepted guesses ends the output where
    speculation off ends it."""
    path, ref = model
    greedy = ref["greedy"]
    long_text = max((o["text"] for o in greedy), key=len)
    stop = long_text[len(long_text) // 2:len(long_text) // 2 + 2]
    stop_token = greedy[0]["token_ids"][9]
    cases = [SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, stop=[stop]),
             SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, stop_token_ids=[stop_token]),
             SamplingParams(max_tokens=13, temperature=0, ignore_eos=True)]
    off = engine(path)
    want = [outputs(off, p) for p in cases]
    off.shutdown()
    eng = engine(path, "ngram", k=6)
    try:
        eng.scheduler.proposer = Oracle({tuple(p): o["token_ids"] for p, o in zip(PROMPTS, greedy)}, wrong=7)
        for p, w in zip(cases, want):
            got = outputs(eng, p)
            assert [(o["text"], o["token_ids"], o["finish_reason"]) for o in got] == \
                [(o["text"], o["token_ids"], o["finish_reason"]) for o in w]
        assert any(o["finish_reason"] == "stop" for o in want[0])
        assert all(len(o["token_ids"]) == 13 for o in want[2])
    finally:
        eng.shutdown()


def test_sampling_keeps_the_target_distribution(tiny_llama):
    """Unseeded sampling: the frequencies of each of the first 4 output tokens over 1000 samples, with
    speculation (guessing the greedy continuation, right about half the time) and without, agree: total
    variation < 0.15 (0.01-0.12 measured with 600; a verifier that kept every guess would be ~0.4 off
    from the second token on)."""
    prompt = PROMPTS[3]
    params = SamplingParams(n=1, max_tokens=4, temperature=0.15, ignore_eos=True)
    greedy = outputs(engine(tiny_llama), SamplingParams(max_tokens=4, temperature=0, ignore_eos=True), [prompt])
    n = 1000

    def freqs(eng):
        counts = [{} for _ in range(4)]
        for o in outputs(eng, params, [prompt] * n):
            for i, t in enumerate(o["token_ids"]):
                counts[i][t] = counts[i].get(t, 0) + 1
        return counts

    off = engine(tiny_llama, seed=1, num_blocks=4096)
    a = freqs(off)
    off.shutdown()
    on = engine(tiny_llama, "ngram", k=3, seed=2, num_blocks=4096)
    try:
        on.scheduler.proposer = Oracle({tuple(prompt): greedy[0]["token_ids"]}, wrong=10**9)
        b = freqs(on)
        assert on.scheduler.num_accepted > 500, on.scheduler.num_accepted
    finally:
        on.shutdown()
    for ca, cb in zip(a, b):
        tv = sum(abs(ca.get(t, 0) - cb.get(t, 0)) for t in set(ca) | set(cb)) / (2 * n)
        assert tv < 0.15, (tv, ca, cb)


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_tensor_and_pipeline_parallel(tiny_llama, model, tp, pp):
    path, ref = model
    if path != tiny_llama:
        pytest.skip("the HF checkpoint only")
    eng = engine(path, "ngram", k=3, tp=tp, pp=pp)
    try:
        for name in ("greedy", "seeded"):
            eng.scheduler.proposer = oracle_for(ref[name])
            got = outputs(eng, PARAMS[name])
            assert [o["token_ids"] for o in got] == [o["token_ids"] for o in ref[name]]
        assert eng.scheduler.num_accepted > 0
    finally:
        eng.shutdown()


@pytest.fixture(scope="module")
def small_draft(tmp_path_factory):
    """A 2-layer random model with the tiny models' tokenizer: a draft whose guesses rarely hold."""
    from helpers import make_tiny_model
    return make_tiny_model(tmp_path_factory.mktemp("draft"), "llama", seed=1, num_hidden_layers=2)


@pytest.mark.parametrize("draft", ["self", "small"])
def test_a_draft_model_proposer(tiny_llama, small_draft, draft):
    """--speculative draft:PATH: the target as its own draft (every greedy guess holds) and a small
    foreign one (few do); greedy and seeded output equal speculation off either way; the draft's blocks
    are freed with the sequences."""
    path = tiny_llama if draft == "self" else small_draft
    eng = engine(tiny_llama, f"draft:{path}", k=4)
    try:
        prop = eng.scheduler.proposer
        prop.catch_up_tokens = 8  # prompts of up to 30 tokens: the draft catches up over several steps
        for name in ("greedy", "seeded"):
            off = engine(tiny_llama)
            want = outputs(off, PARAMS[name])
            off.shutdown()
            p0, a0 = eng.scheduler.num_proposed, eng.scheduler.num_accepted
            got = outputs(eng, PARAMS[name])
            assert [o["token_ids"] for o in got] == [o["token_ids"] for o in want], name
            proposed, accepted = eng.scheduler.num_proposed - p0, eng.scheduler.num_accepted - a0
            assert proposed > 0
            if draft == "self" and name == "greedy":
                assert accepted == proposed  # the same model, greedy: every guess is the target's token
        assert not prop.seqs and prop.bm.num_free_blocks == prop.bm.num_blocks
    finally:
        eng.shutdown()


def test_a_draft_with_another_tokenizer_is_refused(tiny_llama, tmp_path):
    from helpers import make_tiny_model

    from engine.errors import ModelConfigError

    other = make_tiny_model(tmp_path / "wide", "llama", vocab_size=400)
    with pytest.raises(ModelConfigError, match="vocab_size 400 differs"):
        engine(tiny_llama, f"draft:{other}")
    with pytest.raises(ValueError, match="draft:PATH"):
        SpeculativeConfig(method="draft:")


def test_the_draft_frees_the_copies_asked_about_least_recently_for_those_asked_now(tiny_llama):
    """A draft cache of 12 blocks of 4 tokens: a 30-token sequence's copy takes 9; another's, asked
    about next, gets room by freeing it (not guesses refused), and guesses the same as when alone."""
    from engine.block_manager import BlockManager
    from engine.config import DeviceConfig as Dev
    from engine.draft_proposer import DraftProposer
    from engine.sequence import Sequence

    eng = engine(tiny_llama)
    try:
        prop = DraftProposer(str(tiny_llama), eng.model_config, Dev(dtype="float32"), None, 4)
        prop.bm = BlockManager(12, 4, False)
        a = Sequence("a", 0, list(range(40, 70)), 30, SamplingParams(max_tokens=8))
        b = Sequence("b", 0, list(range(90, 120)), 30, SamplingParams(max_tokens=8))
        (ga,) = prop.propose_batch([(a, 3)])
        assert len(ga) == 3 and set(prop.seqs) == {a.seq_id}
        (gb,) = prop.propose_batch([(b, 3)])
        assert len(gb) == 3 and set(prop.seqs) == {b.seq_id}  # a's copy made way
        prop.forget(b.seq_id)
        assert prop.bm.num_free_blocks == 12
        assert prop.propose_batch([(b, 3)]) == [gb]  # the same guesses with the cache to itself
    finally:
        eng.shutdown()
