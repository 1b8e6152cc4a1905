"""Multi-turn conversations: a closed-loop workload with prefix reuse, and the simulator run on it
(DESIGN.md §8, §9). Pure Python, no I/O; deterministic for a seed.

A conversation's token stream, one chat-template's `T` tokens per message:

    [system S | T] [user 1 | T] [reply 1 | T] [user 2 | T] [reply 2 | T] ... [user k | T] ▶ reply k
    └── shared ──┘ └───────────── this conversation's own ─────────────────────────────┘
    turn k's prompt = S + T + Σ_{i<k} (user_i + T + reply_i + T) + user_k + T

so turn k+1's prompt starts with turn k's prompt and reply, and the first S + T tokens are those of
every conversation with the same system prompt. Turn 1 arrives at the conversation's start (Poisson,
`rate` per second); turn k+1 arrives `think_s` after turn k's last token reached the client. A turn
the cluster rejects ends its conversation: the turns after it are never sent, and count as rejected.

The live benchmark and the simulator share `conversation_script`: the benchmark sends the scripted
lengths (output with max_tokens = the scripted reply, EOS ignored); `simulate_conversations` runs
them through coordinator/simulator.py with every worker's prefix cache modelled.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field, replace

from coordinator.prefix_cache import Prefix
from coordinator.simulator import (
    SimCluster,
    SimRequest,
    attainment,
    bisect_rate,
    lognormal,
    percentile,
    run,
)

# Messages are clamped to [1, MAX_FACTOR × their mean] tokens: a log-normal of sigma 0.5 passes 4× its
# mean once in ~800 draws, and an unbounded tail would push a conversation past a model's context.
MAX_FACTOR = 4
_POSITIVE = ("rate", "user_mean", "output_mean")
_NON_NEGATIVE = ("user_sigma", "output_sigma", "think_s")
_COUNTS = {"turns": 1, "system_prompts": 1, "system_tokens": 0, "template_tokens": 0}  # the least of each


@dataclass
class Conversations:
    rate: float  # new conversations per second (Poisson)
    turns: int = 4
    system_tokens: int = 1300  # a long shared system prompt
    system_prompts: int = 1  # distinct system prompts; conversation i has system prompt i % system_prompts
    user_mean: float = 60  # log-normal, like ShareGPT's
    user_sigma: float = 0.5
    output_mean: float = 100
    output_sigma: float = 0.5
    think_s: float = 1.0  # the client's pause between a reply's end and its next turn
    template_tokens: int = 6  # chat-template tokens added per message

    def __post_init__(self):
        for name in (*_POSITIVE, *_NON_NEGATIVE, *_COUNTS):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"Conversations.{name} = {v!r}: must be a number")
            if name in _POSITIVE and v <= 0:
                raise ValueError(f"Conversations.{name} = {v!r}: must be > 0")
            if name in _NON_NEGATIVE and v < 0:
                raise ValueError(f"Conversations.{name} = {v!r}: must be >= 0")
            if name in _COUNTS and (not float(v).is_integer() or v < _COUNTS[name]):
                raise ValueError(f"Conversations.{name} = {v!r}: must be an integer >= {_COUNTS[name]}")

    @staticmethod
    def most_tokens(mean: float) -> int:
        """A message's clamp: MAX_FACTOR × its mean (at least 1)."""
        return max(1, int(MAX_FACTOR * mean))

    def max_prompt_tokens(self) -> int:
        """The longest prompt a script can hold (the last turn, every message at its clamp)."""
        user, out = self.most_tokens(self.user_mean), self.most_tokens(self.output_mean)
        return self.system_tokens + self.template_tokens * (2 * self.turns) + self.turns * user \
            + (self.turns - 1) * out


@dataclass(frozen=True)
class Turn:
    user_tokens: int
    output_tokens: int


@dataclass(frozen=True)
class ConversationScript:
    start: float  # seconds: turn 1's arrival
    system: int  # which system prompt (0 .. system_prompts - 1)
    turns: tuple[Turn, ...]
    system_tokens: int
    template_tokens: int
    think_s: float

    def prompt_tokens(self, k: int) -> int:
        """Turn k's prompt (k from 0): the system message, every earlier turn's user message and reply,
        and turn k's user message, each with its template tokens."""
        t = self.template_tokens
        return self.system_tokens + t + sum(u.user_tokens + u.output_tokens + 2 * t for u in self.turns[:k]) \
            + self.turns[k].user_tokens + t


def conversation_script(w: Conversations, n: int, seed: int = 0) -> list[ConversationScript]:
    """`n` conversations. The same seed gives the same lengths at every rate, and start times that scale
    as 1/rate (what a goodput bisection over the rate wants); conversation i does not depend on n."""
    rng = random.Random(seed)
    out, t = [], 0.0
    most_user, most_out = w.most_tokens(w.user_mean), w.most_tokens(w.output_mean)
    for i in range(n):
        t += rng.expovariate(w.rate)
        turns = tuple(Turn(lognormal(rng, w.user_mean, w.user_sigma, most_user),
                           lognormal(rng, w.output_mean, w.output_sigma, most_out)) for _ in range(w.turns))
        out.append(ConversationScript(t, i % w.system_prompts, turns, int(w.system_tokens), int(w.template_tokens),
                                      w.think_s))
    return out


def simulate_conversations(cluster: SimCluster, scripts: list[ConversationScript], ttft_slo: float = math.inf,
                           tpot_slo: float = math.inf, policy: str | None = None) -> list[SimRequest]:
    """Every turn of every script (conversation-major), the turns never sent included (rejected).
    `policy` overrides the cluster's."""
    if policy is not None:
        cluster = replace(cluster, policy=policy)
    reqs: list[SimRequest] = []
    for ci, s in enumerate(scripts):
        prefix = Prefix(("system", s.system), s.system_tokens + s.template_tokens, ("conversation", ci))
        for k, turn in enumerate(s.turns):
            reqs.append(SimRequest(len(reqs), s.start, s.prompt_tokens(k), turn.output_tokens, ttft_slo, tpot_slo,
                                   conversation=ci, turn=k, prefix=prefix))
    by_turn = {(r.conversation, r.turn): r for r in reqs}

    def follow(r: SimRequest) -> SimRequest | None:
        nxt = by_turn.get((r.conversation, r.turn + 1))
        if nxt is None:
            return None
        if r.rejected:  # the conversation ends here
            for k in range(r.turn + 1, len(scripts[r.conversation].turns)):
                by_turn[(r.conversation, k)].rejected = True
                by_turn[(r.conversation, k)].arrival = r.arrival
            return None
        nxt.arrival = r.finish + scripts[r.conversation].think_s
        return nxt

    run(cluster, [r for r in reqs if r.turn == 0], follow)
    return reqs


@dataclass
class ConversationStats:
    attainment: float  # share of all scripted turns that met both SLOs
    ttft_first: tuple[float | None, float | None, float | None]  # first turns' TTFT p50, p90, p99 (s)
    ttft_later: tuple[float | None, float | None, float | None]  # later turns'
    hit_rate_later: float  # later turns: prompt tokens the worker that prefilled them had cached
    shipped_per_prompt_first: float  # KV shipped P -> D per prompt token, first turns
    shipped_per_prompt_later: float
    local_share: float  # of the turns served, those their decode worker prefilled
    served: int
    rejected: int
    by_turn: list[float] = field(default_factory=list)  # attainment of each turn index


def conversation_stats(reqs: list[SimRequest]) -> ConversationStats:
    served = [r for r in reqs if not r.rejected and r.first_token is not None]
    first, later = [r for r in served if r.turn == 0], [r for r in served if r.turn > 0]

    def ttfts(rs):
        xs = [r.ttft for r in rs]
        return percentile(xs, 0.5), percentile(xs, 0.9), percentile(xs, 0.99)

    def share(rs, num):
        total = sum(r.prompt for r in rs)
        return sum(num(r) for r in rs) / total if total else 0.0

    turns = max((r.turn for r in reqs), default=-1) + 1
    by_turn = [attainment([r for r in reqs if r.turn == k]) for k in range(turns)]
    return ConversationStats(
        attainment=attainment(reqs),
        ttft_first=ttfts(first), ttft_later=ttfts(later),
        hit_rate_later=share(later, lambda r: r.hit),
        shipped_per_prompt_first=share(first, lambda r: r.shipped),
        shipped_per_prompt_later=share(later, lambda r: r.shipped),
        local_share=sum(r.local for r in served) / len(served) if served else 0.0,
        served=len(served), rejected=sum(r.rejected for r in reqs), by_turn=by_turn)


def conversation_goodput(cluster: SimCluster, w: Conversations, ttft_slo: float, tpot_slo: float, target: float,
                         n: int = 100, seed: int = 0, hi: float | None = None, iters: int = 12) -> float:
    """The highest conversation rate at which at least `target` of all turns meet both SLOs (bisection
    over the rate, as simulator.goodput; the same script seed at every rate)."""
    def ok(rate: float) -> bool:
        reqs = simulate_conversations(cluster, conversation_script(replace(w, rate=rate), n, seed), ttft_slo, tpot_slo)
        return conversation_stats(reqs).attainment >= target
    return bisect_rate(ok, hi or max(1.0, w.rate), iters)
