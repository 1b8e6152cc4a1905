"""Scheduler tests with a fake model: 'sampling' returns a deterministic token per sequence."""

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from engine.block_manager import BlockManager
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import Sequence, SequenceStatus

EOS = 2


def make(num_blocks=64, block_size=4, max_seqs=8, budget=32, max_len=256, caching=True):
    bm = BlockManager(num_blocks, block_size, caching)
    return Scheduler(bm, max_seqs, budget, max_len, (EOS,)), bm


def add(s, n_prompt, max_tokens=5, rid="r", n=1, base=10, **kw):
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, n=n, **kw)
    first, seqs = None, []
    for i in range(n):
        q = Sequence(rid, i, [base + j for j in range(n_prompt)], n_prompt, params, parent=first)
        first = first or q
        s.add(q)
        seqs.append(q)
    return seqs[0] if n == 1 else seqs


def step(s, token=7):
    out = s.schedule()
    sampled = {x.seq.seq_id: [token] for x in out.scheduled if x.sample}
    return out, s.update(out, sampled)


def test_decode_takes_one_token_and_prompt_is_chunked_by_budget():
    s, _ = make(budget=8)
    a = add(s, 20)
    out, _ = step(s)
    assert [(x.start, x.num_new_tokens, x.sample) for x in out.scheduled] == [(0, 8, False)]
    out, _ = step(s)
    assert [(x.start, x.num_new_tokens, x.sample) for x in out.scheduled] == [(8, 8, False)]
    out, _ = step(s)
    assert [(x.start, x.num_new_tokens, x.sample) for x in out.scheduled] == [(16, 4, True)]
    assert a.num_tokens == 21 and a.num_computed_tokens == 20
    out, _ = step(s)
    assert [(x.start, x.num_new_tokens) for x in out.scheduled] == [(20, 1)]


def test_new_requests_join_the_running_batch():
    s, _ = make(budget=64)
    a = add(s, 4, max_tokens=10, rid="a")
    step(s)
    step(s)
    b = add(s, 6, rid="b", base=100)
    out, _ = step(s)
    assert {(x.seq.request_id, x.num_new_tokens) for x in out.scheduled} == {("a", 1), ("b", 6)}
    assert a.status == b.status == SequenceStatus.RUNNING


def test_finishes_on_max_tokens_eos_and_context_limit():
    s, bm = make(max_len=12)
    a = add(s, 4, max_tokens=3, rid="a")
    b = add(s, 4, max_tokens=50, rid="b")
    c = Sequence("c", 0, [1, 2, 3], 3, SamplingParams(max_tokens=50))
    s.add(c)
    out = s.schedule()
    s.update(out, {x.seq.seq_id: [EOS if x.seq is c else 7] for x in out.scheduled})
    assert c.status == SequenceStatus.FINISHED_STOPPED and c.stop_reason == EOS
    for _ in range(20):
        step(s)
    assert a.status == SequenceStatus.FINISHED_LENGTH and a.num_output_tokens == 3
    assert b.status == SequenceStatus.FINISHED_LENGTH and b.num_tokens == 12
    assert bm.num_free_blocks == bm.num_blocks


def test_preemption_under_memory_pressure_recomputes_and_completes():
    s, bm = make(num_blocks=6, block_size=4, budget=64)
    seqs = [add(s, 6, max_tokens=10, rid=f"r{i}", base=100 * i) for i in range(3)]
    preempted = 0
    for _ in range(200):
        out, _ = step(s)
        preempted += len(out.preempted)
        if not s.num_unfinished:
            break
    assert preempted > 0
    assert all(q.status == SequenceStatus.FINISHED_LENGTH and q.num_output_tokens == 10 for q in seqs)
    assert bm.num_free_blocks == bm.num_blocks


def test_n_children_wait_for_the_parent_prompt_then_share_its_blocks():
    s, bm = make(budget=64, caching=False)
    p, c = add(s, 10, n=2)
    out, _ = step(s)
    assert [x.seq for x in out.scheduled] == [p]
    out, _ = step(s)
    by = {x.seq.seq_id: x for x in out.scheduled}
    assert by[c.seq_id].start == 8  # two full blocks shared, the partial one recomputed
    assert c.block_ids[:2] == p.block_ids[:2]


def test_abort_frees_blocks_wherever_the_sequence_is():
    s, bm = make()
    a = add(s, 10, rid="a")
    b = add(s, 10, rid="b")
    step(s)
    s.finish(a, SequenceStatus.FINISHED_ABORTED)
    s.finish(b, SequenceStatus.FINISHED_ABORTED)
    s.finish(b, SequenceStatus.FINISHED_ABORTED)  # idempotent
    assert bm.num_free_blocks == bm.num_blocks and s.num_unfinished == 0


def _check_invariants(s: Scheduler, bm: BlockManager, live: list[Sequence]) -> None:
    refs = [0] * bm.num_blocks
    for q in live:
        if not q.is_finished:
            for b in q.block_ids:
                refs[b] += 1
            assert len(q.block_ids) * bm.block_size >= q.num_computed_tokens
    for b in bm.blocks:
        assert b.ref_count == refs[b.block_id], f"block {b.block_id}: ref {b.ref_count} != users {refs[b.block_id]}"
        assert (b.ref_count == 0) == (b.block_id in bm.free_queue)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["add", "abort", "step", "step", "step"]),
                          st.integers(1, 40), st.integers(1, 12), st.integers(1, 3)),
                min_size=20, max_size=250),
       st.integers(0, 2**16), st.booleans())
def test_no_block_leaks_under_random_add_abort_finish(ops, seed, caching):
    rng = random.Random(seed)
    s, bm = make(num_blocks=24, block_size=4, max_seqs=6, budget=24, max_len=64, caching=caching)
    live: list[Sequence] = []
    next_id = 0
    for op, plen, max_tokens, n in ops:
        if op == "add":
            toks = [rng.randrange(3, 20) for _ in range(plen)]  # small alphabet: prefix hits happen
            params = SamplingParams(max_tokens=max_tokens, n=n)
            first = None
            for i in range(n):
                q = Sequence(f"r{next_id}", i, list(toks), plen, params, parent=first)
                first = first or q
                s.add(q)
                live.append(q)
            next_id += 1
        elif op == "abort" and live:
            q = rng.choice(live)
            s.finish(q, SequenceStatus.FINISHED_ABORTED)
        else:
            out = s.schedule()
            s.update(out, {x.seq.seq_id: [rng.choice([EOS, 5, 6, 7, 8])] for x in out.scheduled if x.sample})
        _check_invariants(s, bm, live)
    for _ in range(2000):  # drain
        if not s.num_unfinished:
            break
        out = s.schedule()
        s.update(out, {x.seq.seq_id: [rng.choice([EOS, 5, 6])] for x in out.scheduled if x.sample})
        _check_invariants(s, bm, live)
    assert s.num_unfinished == 0
    assert bm.num_free_blocks == bm.num_blocks


def test_micro_batches_split_a_step_evenly_and_deterministically():
    from engine.executor import micro_batches
    from engine.scheduler import ScheduledSeq
    seqs = [ScheduledSeq(Sequence("r", 0, [1] * n, n, SamplingParams()), 0, n, True) for n in (10, 1, 1, 8, 20)]
    groups = micro_batches(seqs, 2)
    assert [[s.num_new_tokens for s in g] for g in groups] == [[10, 1, 1, 8], [20]]
    assert [len(g) for g in micro_batches(seqs, 5)] == [1, 1, 1, 1, 1]
    assert [len(g) for g in micro_batches(seqs[:2], 4)] == [1, 1]
    assert micro_batches(seqs, 1) == [seqs] and micro_batches([], 3) == []
    assert sum(len(g) for g in micro_batches(seqs, 3)) == 5


def test_steps_in_flight_share_the_batch_and_are_never_preempted():
    """Pipeline parallelism: a step takes at most `max_seqs`; sequences of a step in flight (`busy`) are
    neither scheduled again nor preempted, even under memory pressure."""
    s, bm = make(num_blocks=7, block_size=4, budget=64)
    seqs = [add(s, 4, max_tokens=20, rid=f"r{i}", base=100 * i) for i in range(4)]
    first = s.schedule(max_seqs=2)
    second = s.schedule(busy={x.seq.seq_id for x in first.scheduled}, max_seqs=2)
    assert [x.seq for x in first.scheduled] == seqs[:2] and [x.seq for x in second.scheduled] == seqs[2:]
    s.update(first, {x.seq.seq_id: [7] for x in first.scheduled})
    in_flight = {x.seq.seq_id for x in second.scheduled}
    preempted = []
    for _ in range(40):  # the first two decode while the second pair stays in flight: 7 blocks run out
        out = s.schedule(busy=in_flight, max_seqs=2)
        assert not in_flight & {x.seq.seq_id for x in out.scheduled}
        preempted += out.preempted
        if not out.scheduled:
            break
        s.update(out, {x.seq.seq_id: [7] for x in out.scheduled})
    assert preempted and not in_flight & {q.seq_id for q in preempted}
    assert all(q.status == SequenceStatus.RUNNING for q in seqs[2:])


def test_only_the_first_sample_scores_the_prompt_and_only_before_its_first_token():
    s, _ = make(budget=8)
    parent, child = add(s, 12, n=2, prompt_logprobs=2)
    flags = []
    while parent.num_output_tokens == 0:
        out = s.schedule()
        flags += [(x.seq.index, x.start, x.num_new_tokens, x.prompt_logprobs) for x in out.scheduled]
        s.update(out, {x.seq.seq_id: [5] for x in out.scheduled if x.sample})
    assert flags == [(0, 0, 8, True), (0, 8, 4, True)]  # chunks of 8; the child waits for the prompt
    out = s.schedule()
    assert [(x.seq.index, x.prompt_logprobs) for x in out.scheduled] == [(0, False), (1, False)]


def test_prompt_rows_follow_the_step_order_and_stop_before_the_last_prompt_position():
    from engine.model_runner import prompt_rows
    from engine.scheduler import ScheduledSeq
    p = SamplingParams(prompt_logprobs=1)
    long_, short, last, plain = (Sequence("r", 0, [1] * n, n, p) for n in (20, 10, 7, 6))
    step = [ScheduledSeq(long_, 4, 8, False, True),  # mid-prompt: its last position scores token 12
            ScheduledSeq(short, 0, 10, True, True),  # the whole prompt: positions 0..8 score tokens 1..9
            ScheduledSeq(last, 6, 1, True, True),  # the last prompt position alone: it only samples
            ScheduledSeq(plain, 0, 6, True, False)]
    rows = prompt_rows(step)
    # rows: `last` first (a one-token step), then long_ from row 1, short from row 9
    assert [(r.seq, r.row, r.start, r.count) for r in rows] == [(long_, 1, 4, 8), (short, 9, 0, 9)]
