"""Multi-turn conversations in the simulator: the script, the closed loop, the prefix caches and the
placement that follows them (coordinator/conversations.py, coordinator/prefix_cache.py)."""

import dataclasses

import pytest

from coordinator.conversations import (
    MAX_FACTOR,
    Conversations,
    ConversationScript,
    Turn,
    conversation_goodput,
    conversation_script,
    conversation_stats,
    simulate_conversations,
)
from coordinator.policy import DecodeCost, PrefillCost
from coordinator.prefix_cache import PrefixCache
from coordinator.simulator import SimCluster

PRE, DEC = PrefillCost(0.01, 2e-4, 0.0, 0.002), DecodeCost(0.02, 0.001, 1e-7)


def two_by_two(policy="slo", **kw):
    # KV on the wire at 20 µs a token: a 1,400-token conversation costs 28 ms to ship again
    return SimCluster([PRE] * 2, [DEC] * 2, transfer_s_per_token=2e-5, policy=policy, **kw)


def test_the_script_is_deterministic_and_each_prompt_extends_the_last():
    w = Conversations(rate=2.0, turns=3, system_prompts=3)
    a = conversation_script(w, 20, seed=1)
    assert a == conversation_script(w, 20, seed=1) and a != conversation_script(w, 20, seed=2)
    assert conversation_script(w, 5, seed=1) == a[:5]  # conversation i does not depend on how many follow
    faster = conversation_script(dataclasses.replace(w, rate=4.0), 20, seed=1)
    assert [s.turns for s in faster] == [s.turns for s in a]  # same lengths at every rate, starts twice as dense
    assert [s.start for s in faster] == pytest.approx([s.start / 2 for s in a])
    assert [s.system for s in a[:5]] == [0, 1, 2, 0, 1]
    for s in a:
        t = s.turns
        assert s.prompt_tokens(0) == 1300 + 6 + t[0].user_tokens + 6
        for k in range(2):
            assert s.prompt_tokens(k + 1) == s.prompt_tokens(k) + t[k].output_tokens + 6 + t[k + 1].user_tokens + 6
    # lengths are clamped to [1, MAX_FACTOR x mean]; a wide log-normal reaches both ends
    wide = conversation_script(Conversations(1.0, turns=8, user_mean=5, user_sigma=3.0), 50)
    users = [t.user_tokens for s in wide for t in s.turns]
    assert min(users) == 1 and max(users) == MAX_FACTOR * 5
    assert max(s.prompt_tokens(7) for s in wide) <= Conversations(1.0, turns=8, user_mean=5).max_prompt_tokens()
    for bad in ({"rate": 0}, {"turns": 1.5}, {"system_prompts": 0}, {"think_s": -1}, {"user_sigma": float("nan")}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            Conversations(**{"rate": 1.0, **bad})


def test_turns_are_closed_loop():
    w = Conversations(rate=1.0, turns=3, think_s=0.7)
    scripts = conversation_script(w, 10)
    reqs = simulate_conversations(two_by_two(), scripts)
    assert len(reqs) == 30 and all(r.finish is not None for r in reqs)
    by = {(r.conversation, r.turn): r for r in reqs}
    for c, s in enumerate(scripts):
        assert by[(c, 0)].arrival == s.start
        for k in range(2):
            assert by[(c, k + 1)].arrival == pytest.approx(by[(c, k)].finish + 0.7)
            assert by[(c, k)].prompt == s.prompt_tokens(k) and by[(c, k)].output == s.turns[k].output_tokens


def test_a_rejected_turn_ends_its_conversation():
    # a TTFT SLO no prefill can meet for the first turn: nothing after it is sent, and all count as rejected
    scripts = conversation_script(Conversations(rate=1.0, turns=3), 4)
    reqs = simulate_conversations(two_by_two(), scripts, ttft_slo=0.05)
    assert all(r.rejected and r.first_token is None for r in reqs)
    assert conversation_stats(reqs).attainment == 0.0


def test_cache_aware_placement_reuses_each_conversations_prefix_and_ships_far_less():
    # every conversation its own 1,300-token system prompt (a document, a user's context): a first turn is
    # computed and shipped whole; later turns find it where the turn before left it, if placed there
    scripts = conversation_script(Conversations(rate=0.5, system_prompts=10**6), 60)
    slo = conversation_stats(simulate_conversations(two_by_two(), scripts, ttft_slo=0.8, tpot_slo=0.05))
    rr = conversation_stats(simulate_conversations(two_by_two(), scripts, 0.8, 0.05, policy="round-robin"))
    assert slo.served == rr.served == 240
    assert slo.hit_rate_later >= 0.8 and rr.hit_rate_later <= 0.7
    assert slo.shipped_per_prompt_first >= 0.99 and rr.shipped_per_prompt_first >= 0.99
    assert slo.shipped_per_prompt_later <= 0.2 * slo.shipped_per_prompt_first
    assert rr.shipped_per_prompt_later >= 2 * slo.shipped_per_prompt_later
    assert slo.ttft_later[1] < rr.ttft_later[1]  # p90 of later turns: recomputing costs time
    # no reuse at all without caches, whatever the policy
    off = conversation_stats(simulate_conversations(two_by_two(prefix_caching=False), scripts, 0.8, 0.05))
    assert off.hit_rate_later == 0.0 and off.shipped_per_prompt_later == 1.0 and off.local_share == 0.0


def test_a_shared_system_prompt_is_reused_by_every_conversation():
    scripts = conversation_script(Conversations(rate=0.5), 30)
    reqs = simulate_conversations(two_by_two(), scripts, 0.8, 0.05)
    firsts = sorted((r for r in reqs if r.turn == 0), key=lambda r: r.arrival)
    # the very first prompt is computed whole; later first turns find the system prompt's 81 full blocks
    assert firsts[0].hit == 0 and all(r.hit >= 1296 for r in firsts[4:])


def test_a_cache_too_small_for_one_block_holds_nothing():
    scripts = conversation_script(Conversations(rate=0.5, turns=3), 8)
    # 15 tokens of room: less than a block, on every worker (the decode workers then take one request at a
    # time: requests without SLOs queue for room)
    tiny = two_by_two(prefill_kv_capacity_tokens=15, kv_capacity_tokens=15)
    reqs = simulate_conversations(tiny, scripts)
    assert all(r.finish is not None for r in reqs)
    # (an idle decode worker may still prefill a prompt itself: shipping it costs more than a decode step)
    assert all(r.hit == 0 and r.held == 0 and r.shipped == (0 if r.local else r.prompt) for r in reqs)
    roomy = simulate_conversations(two_by_two(), scripts)
    assert sum(r.hit for r in roomy) > 0.5 * sum(r.prompt for r in roomy)


def test_a_decode_worker_prefills_locally_when_the_prefill_worker_is_queued():
    # A: 100 tokens, then 20 more; one P (0.01 + 1 ms a token), one D (steps of 50 ms), 16-token blocks.
    # Turn 1: P computes 100 tokens (0.11 s), D decodes the second token (0.16 s) and both keep 6 blocks
    # (96 tokens). Turn 2 arrives at 0.2 s with a 122-token prompt: 26 tokens to compute wherever it goes.
    a = ConversationScript(0.0, 0, (Turn(100, 2), Turn(20, 2)), 0, 0, think_s=0.04)
    # B: a 2,000-token prompt at 0.15 s holds P until 2.16 s
    b = ConversationScript(0.15, 1, (Turn(2000, 2),), 0, 0, think_s=0.0)
    c = SimCluster([PrefillCost(0.01, 1e-3)], [DecodeCost(0.05, 0.0, 0.0)])
    idle = simulate_conversations(c, [a])[1]
    assert (idle.local, idle.hit, idle.held, idle.shipped) == (False, 96, 96, 26)
    assert idle.ttft == pytest.approx(0.01 + 0.026)  # P is free: it computes the 26 tokens
    queued = simulate_conversations(c, [a, b])[1]
    assert (queued.local, queued.hit, queued.held, queued.shipped) == (True, 96, 96, 0)
    # D's next step carries the 26-token prefill: 0.05 s of decode step + 0.036 s of prefill
    assert queued.ttft == pytest.approx(0.05 + 0.036)
    never = simulate_conversations(dataclasses.replace(c, local_prefill_tokens=0), [a, b])[1]
    assert not never.local and never.ttft == pytest.approx(2.16 + 0.036 - 0.2)  # behind B at P


def test_a_local_prefill_stalls_the_requests_decoding_there():
    # C (4 tokens, 7 out) arrives while P computes A's first turn: D prefills it itself and decodes it in
    # steps of 0.05 s (first token at 0.065 s). A's first turn joins at 0.115 s and ends at 0.165 s; its
    # second turn (0.205 s) finds P held by B, so D prefills it in the step from 0.215 s, which lasts
    # 0.05 + 0.036 s: C's TPOT takes that stall, A's TTFT is the wait for the step and the step
    a = ConversationScript(0.0, 0, (Turn(100, 2), Turn(20, 2)), 0, 0, think_s=0.04)
    b = ConversationScript(0.15, 1, (Turn(2000, 2),), 0, 0, think_s=0.0)
    c_ = ConversationScript(0.001, 2, (Turn(4, 7),), 0, 0, think_s=0.0)
    c = SimCluster([PrefillCost(0.01, 1e-3)], [DecodeCost(0.05, 0.0, 0.0)])
    a1, a2, _, c1 = simulate_conversations(c, [a, b, c_])
    assert c1.local and c1.first_token == pytest.approx(0.065)
    assert a1.finish == pytest.approx(0.165) and a2.local and a2.ttft == pytest.approx(0.01 + 0.086)
    assert c1.finish - c1.first_token == pytest.approx(6 * 0.05 + 0.036)


def test_the_prefix_cache_is_lru_pins_linked_blocks_and_evicts_a_tail_first():
    cache = PrefixCache(3)
    cache.store(["a0", "a1", "a2"])
    assert cache.match(["a0", "a1", "a2", "a3"]) == 3 and cache.match(["b0"]) == 0
    cache.store(["b0"])  # over capacity: a's tail goes, its head stays
    assert cache.match(["a0", "a1", "a2"]) == 2
    cache.pin(["a0"])  # linked by a request: not evictable, not counted
    cache.store(["c0", "c1"])  # a1 is the least recently used unpinned block
    assert cache.match(["a0", "a1"]) == 1 and cache.match(["b0"]) == 1 and cache.match(["c0", "c1"]) == 2
    cache.resize(0)
    assert len(cache) == 1 and cache.match(["a0"]) == 1  # only the pinned block is left
    cache.unpin(["a0"])
    cache.resize(0)
    assert len(cache) == 0


def test_goodput_in_conversations_per_second_grows_with_the_cluster():
    w = Conversations(rate=0.5, turns=3, system_prompts=10**6)
    one = conversation_goodput(SimCluster([PRE], [DEC]), w, 0.8, 0.05, 0.9, n=30, iters=6)
    two = conversation_goodput(two_by_two(), w, 0.8, 0.05, 0.9, n=30, iters=6)
    assert 0 < one < two
