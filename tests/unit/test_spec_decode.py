"""Speculative decoding's pieces: the n-gram lookup, acceptance, and the scheduler's bookkeeping."""

import pytest

from engine import grammar
from engine.block_manager import BlockManager
from engine.config import SpeculativeConfig
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import Sequence
from engine.spec_decode import NgramProposer, accepted_prefix, ngram_lookup

EOS = 2


@pytest.mark.parametrize("tokens,k,want", [
    ([1, 2, 3, 4, 5, 1, 2, 3], 3, [4, 5, 1]),  # the longest suffix (1 2 3) and what followed it
    ([1, 2, 3, 4, 5, 9], 3, []),  # no earlier occurrence of any suffix of 2+ tokens
    ([7, 1, 2, 7, 1, 3, 7, 1], 2, [3, 7]),  # the latest occurrence wins
    ([5, 6, 5, 6], 4, [5, 6]),  # a continuation cut at the end of the tokens
    ([4, 4, 4], 2, [4]),  # overlapping occurrences
    ([1, 2], 3, []),  # too short for a suffix of 2 to occur before
    ([1, 2, 1, 2], 0, []),
])
def test_ngram_lookup(tokens, k, want):
    assert ngram_lookup(tokens, k, 2, 4) == want


def test_ngram_lookup_prefers_longer_matches_and_respects_min():
    toks = [9, 1, 2, 8, 3, 1, 2, 7, 5, 3, 1, 2]
    assert ngram_lookup(toks, 2, 2, 4) == [7, 5]  # "1 2" last at 5, but "3 1 2" occurred at 4
    assert ngram_lookup([1, 5, 6, 1], 2, 1, 4) == [5, 6]  # a 1-gram where allowed
    assert ngram_lookup([1, 5, 6, 1], 2, 2, 4) == []
    with pytest.raises(ValueError):
        NgramProposer(3, 2)


def test_accepted_prefix():
    assert accepted_prefix([4, 5, 6], [4, 5, 7, 8]) == [4, 5, 7]  # up to and including the first miss
    assert accepted_prefix([4, 5], [4, 5, 9]) == [4, 5, 9]  # all held: the draw after them too
    assert accepted_prefix([4], [3, 4]) == [3]
    assert accepted_prefix([], [3]) == [3]


def test_config_checks():
    with pytest.raises(ValueError, match="speculative = 'eagle'"):
        SpeculativeConfig(method="eagle")
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        SpeculativeConfig(method="ngram", num_tokens=0)


class Fixed:
    def __init__(self, guess):
        self.guess = guess

    def propose(self, seq, k):
        return self.guess[:k]


def make(guess, k=4, budget=64, max_batch=8, max_len=256, num_blocks=64):
    bm = BlockManager(num_blocks, 4, True)
    s = Scheduler(bm, 8, budget, max_len, (EOS,), proposer=Fixed(guess), num_speculative_tokens=k,
                  speculative_max_batch=max_batch)
    s.spec_policy.guesses = lambda seq_id, k, n=1: k  # the bookkeeping here, not the policy's choice
    return s, bm


def decoding(s, n_prompt=6, **kw):
    """A sequence past its prefill step (its first token drawn)."""
    seq = Sequence("r", 0, list(range(10, 10 + n_prompt)), n_prompt, SamplingParams(ignore_eos=True, **kw))
    s.add(seq)
    out = s.schedule()
    assert out.scheduled[0].num_new_tokens == n_prompt and not out.scheduled[0].draft  # prefills never guess
    s.update(out, {seq.seq_id: [99]})
    return seq


def test_guesses_are_scheduled_with_the_last_token_and_partly_accepted():
    s, bm = make([50, 51, 52, 53, 54])
    seq = decoding(s, max_tokens=20)
    out = s.schedule()
    (x,) = out.scheduled
    assert (x.start, x.num_new_tokens, x.draft, x.sample) == (6, 5, [50, 51, 52, 53], True)
    assert out.num_batched_tokens == 5
    assert len(seq.block_ids) == 3  # slots for every guess: positions 6..10
    drawn = [50, 51, 77]  # two guesses held, the third missed
    s.update(out, {seq.seq_id: drawn})
    assert seq.token_ids[6:] == [99, 50, 51, 77]
    assert seq.num_computed_tokens == 9  # the KV of 99, 50, 51; 77 is next
    assert (s.num_proposed, s.num_accepted) == (4, 2)


def test_guesses_stop_short_of_max_tokens_the_context_limit_and_the_budget():
    s, _ = make(list(range(50, 60)), k=8)
    seq = decoding(s, max_tokens=4)  # 1 drawn: 3 to go, the last drawn after the guesses
    assert s.schedule().scheduled[0].draft == [50, 51]
    s, _ = make(list(range(50, 60)), k=8, max_len=10)
    decoding(s, max_tokens=100)  # 7 tokens, room for 3 more
    assert s.schedule().scheduled[0].draft == [50, 51]
    s, _ = make(list(range(50, 60)), k=8, budget=8)
    decoding(s, max_tokens=100)
    assert s.schedule().scheduled[0].draft == list(range(50, 57))  # 1 + 7 = the budget
    assert seq.num_tokens == 7


def test_a_stop_inside_the_accepted_run_drops_what_follows():
    s, bm = make([50, 51, 52])
    seq = decoding(s, max_tokens=20, stop_token_ids=[51])
    out = s.schedule()
    drawn = [50, 51, 52, 60]
    finished = s.update(out, {seq.seq_id: drawn})
    assert finished == [seq] and seq.stop_reason == 51
    assert drawn == [50, 51]  # trimmed to what was appended
    assert seq.token_ids[6:] == [99, 50, 51]
    assert bm.num_free_blocks == bm.num_blocks


def test_no_guesses_for_guided_sequences_large_batches_or_without_a_guess():
    s, _ = make([50, 51])
    decoding(s, max_tokens=20, guided=grammar.check(grammar.regex("[a-z]+", "guided_regex")))
    assert s.schedule().scheduled[0].draft == []
    s, _ = make([50, 51], max_batch=1)
    seqs = [Sequence("r", 0, [10, 11, 12], 3, SamplingParams(ignore_eos=True, max_tokens=20)) for _ in range(2)]
    for q in seqs:
        s.add(q)
    out = s.schedule()
    s.update(out, {q.seq_id: [99] for q in seqs})
    assert all(not x.draft and x.num_new_tokens == 1 for x in s.schedule().scheduled)  # 2 decoding > 1
    s, _ = make([])
    decoding(s, max_tokens=20)
    assert s.schedule().scheduled[0].num_new_tokens == 1


def test_the_policy_speculates_while_the_measured_step_times_say_it_pays():
    from engine.spec_decode import SpeculationPolicy

    p = SpeculationPolicy(max_batch=64, explore=10)
    assert p.decide(4) and not p.decide(65) and not p.decide(0)  # unmeasured: up to max_batch
    assert p.guesses(1, 4) == 1  # no acceptance known yet (a = 0.5) and rows at 0.25 of a step: 1 guess
    # memory-bound small steps: 5 rows a sequence cost about one
    p.observe_step(1, 0.010)
    p.observe_step(5, 0.011)
    p.observe_gain(seqs=1, tokens=3, rows=5)
    assert p.decide(1)
    # compute-bound large ones: 32 sequences x 5 rows cost ~4x 32 rows, for 3x the tokens
    p.observe_step(32, 0.050)
    p.observe_step(160, 0.200)
    decisions = [p.decide(32) for _ in range(40)]
    assert [i for i, d in enumerate(decisions) if d] == [9, 29]  # exploring: after 10 steps, then 20 (doubling)
    for _ in range(15):  # guesses that always hold: 5 tokens for 4x the time pays
        p.observe_gain(seqs=32, tokens=32 * 5, rows=32 * 5)
    assert p.gain > 4.2 and p.decide(32)


def test_a_sequence_guesses_as_many_tokens_as_its_acceptance_rate_pays_for():
    from engine.spec_decode import SpeculationPolicy

    p = SpeculationPolicy(max_batch=64, explore_seq=4)
    p.observe_step(1, 0.010)
    p.observe_step(5, 0.014)  # a row adds 10% of a one-row step
    assert p.row_cost() == pytest.approx(0.1)
    for _ in range(5):
        p.observe_seq(1, guessed=8, held=8)  # copying: every guess holds
        p.observe_seq(2, guessed=2, held=0)  # free text: none do
    assert p.guesses(1, 8) == 8
    tries = [p.guesses(2, 8) for _ in range(30)]
    assert [i for i, k in enumerate(tries) if k] == [3, 11, 27]  # a try after 4 steps, then 8, 16 (doubling)
    p.observe_seq(3, guessed=4, held=2)  # a = 2/3: a few
    assert 2 <= p.guesses(3, 8) <= 6
    p.forget(1)
    assert 1 not in p.seqs


def test_guesses_take_only_blocks_no_other_sequence_needs():
    """Two decoding sequences of 9 tokens (8 computed: 2 full blocks each), each next token needing a
    3rd block:
    with 2 blocks free, guesses would cost the other sequence its place (a preemption), so none are
    made; with blocks to spare they are."""
    for num_blocks, want in ((6, [[], []]), (10, [[50, 51, 52, 53], [50, 51, 52, 53]])):
        s, bm = make([50, 51, 52, 53], num_blocks=num_blocks)
        seqs = [Sequence("r", 0, list(range(10, 18)), 8, SamplingParams(ignore_eos=True, max_tokens=20))
                for _ in range(2)]
        for q in seqs:
            s.add(q)
        s.update(s.schedule(), {q.seq_id: [99] for q in seqs})
        out = s.schedule()
        assert [x.draft for x in out.scheduled] == want and not out.preempted
