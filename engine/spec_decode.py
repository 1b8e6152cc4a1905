"""Speculative decoding: proposers, and the verification of what they propose.

A proposer guesses the next tokens of a decoding sequence. The scheduler gives such a sequence its last
token plus the guesses (`ScheduledSeq.draft`) in one step; the model computes every position, and the
sampler draws a token at each of them, each with the history that the guesses before it make. The
guesses are accepted while each equals the token drawn at the position before it; the first draw that
differs (or the one after the last guess) is kept too. So a step appends 1 to k + 1 tokens, each drawn
by the target model's sampler from its own distribution given the tokens before it: the output is the
one speculation-off decoding gives, token for token with greedy sampling and with seeds (the draws take
the same noise: engine/model_runner.py rewinds a seeded generator past rejected positions), and in
distribution otherwise.

This is rejection sampling for proposers that propose one token with certainty (n-gram lookup; a
greedy draft model): accepting a guess x with probability p(x), and otherwise sampling from p without
x, renormalised, is the same as drawing from p and comparing. A proposer with a distribution of its own
(a sampled draft, EAGLE, Medusa) would need the general min(1, p/q) test; `Proposal.probs` leaves room
for it.

KV written at rejected positions lies past the sequence's computed tokens: the next step writes over it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from engine.sequence import Sequence


@dataclass
class Proposal:
    tokens: list[int]
    probs: None = None  # a proposer's own distributions (none of today's have one)


class Proposer(Protocol):
    def propose(self, seq: Sequence, k: int) -> list[int]:
        """Up to k tokens that may follow `seq.token_ids`; [] for no guess."""


class NgramProposer:
    """Prompt lookup: the longest suffix of the sequence (max_n tokens down to min_n) that occurred
    before in its prompt or output, and the tokens that followed its latest earlier occurrence."""

    def __init__(self, min_n: int = 1, max_n: int = 4):
        if not 1 <= min_n <= max_n:
            raise ValueError(f"ngram sizes must satisfy 1 <= min ({min_n}) <= max ({max_n})")
        self.min_n, self.max_n = min_n, max_n

    def propose(self, seq: Sequence, k: int) -> list[int]:
        return ngram_lookup(seq.token_ids, k, self.min_n, self.max_n)


# the lookup scans at most this many tokens back
NGRAM_WINDOW = 4096


def ngram_lookup(tokens: list[int], k: int, min_n: int, max_n: int) -> list[int]:
    """The continuation (up to k tokens) of the latest earlier occurrence of the longest suffix of
    `tokens` of max_n..min_n tokens; [] when none occurs. Vectorised: n compares over the window."""
    if k <= 0 or len(tokens) < min_n + 1:
        return []
    arr = np.asarray(tokens[-NGRAM_WINDOW:], dtype=np.int64)
    m = len(arr)
    for n in range(min(max_n, m - 1), min_n - 1, -1):
        # hit[i]: an occurrence of the suffix (arr[m - n:]) starts at i, for i < m - n
        hit = arr[:m - n] == arr[m - n]
        for j in range(1, n):
            hit &= arr[j:m - n + j] == arr[m - n + j]
        found = np.flatnonzero(hit)
        if found.size:
            i = int(found[-1])
            return arr[i + n:i + n + k].tolist()
    return []


def accepted_prefix(draft: list[int], drawn: list[int]) -> list[int]:
    """The tokens a step appends: drawn[j] for j up to and including the first j where the guess
    draft[j] differs from drawn[j] (all k + 1 draws when every guess holds)."""
    out: list[int] = []
    for j, t in enumerate(drawn):
        out.append(t)
        if j >= len(draft) or draft[j] != t:
            break
    return out


class SpeculationPolicy:
    """Whether a step speculates, from the engine's own measurements: the step time of decode steps by
    their row count (an average per power-of-two bucket), the tokens a decoding sequence appended in
    steps that speculated (`gain`) and the rows it took in them. A step of n decoding sequences
    speculates when n * gain tokens in T(n * rows) beat n tokens in T(n) by 5%: decode is memory-bound
    while the batch is small (guesses ride along almost free) and compute-bound once it is large (each
    guess costs a token's compute). Until both times and the gain are measured, it speculates up to
    `max_batch` sequences; and every `explore` steps it does once anyway, so the gain stays current.
    `max_batch` also caps it."""

    def __init__(self, max_batch: int, explore: int = 50, margin: float = 1.05):
        self.max_batch, self.explore, self.margin = max_batch, explore, margin
        self.times: dict[int, float] = {}  # row-count bucket -> seconds a decode step takes
        self.gain: float | None = None  # tokens a decoding sequence appends in a speculating step
        self.rows: float | None = None  # rows it takes there
        self._since = 0

    @staticmethod
    def bucket(rows: float) -> int:
        return max(1, int(rows)).bit_length()

    def observe_step(self, rows: int, seconds: float) -> None:
        """A decode-only step's (or a speculating one's) wall time."""
        b = self.bucket(rows)
        old = self.times.get(b)
        self.times[b] = seconds if old is None else 0.8 * old + 0.2 * seconds

    def observe_gain(self, seqs: int, tokens: int, rows: int) -> None:
        """A speculating step: its decoding sequences appended `tokens` in `rows` rows."""
        g, r = tokens / seqs, rows / seqs
        self.gain = g if self.gain is None else 0.9 * self.gain + 0.1 * g
        self.rows = r if self.rows is None else 0.9 * self.rows + 0.1 * r

    def decide(self, n: int) -> bool:
        if n <= 0 or n > self.max_batch:
            return False
        t_plain = self.times.get(self.bucket(n))
        t_spec = self.times.get(self.bucket(n * self.rows)) if self.rows is not None else None
        if self.gain is None or t_plain is None or t_spec is None:
            return True
        if self.gain * t_plain >= self.margin * t_spec:
            self._since = 0
            return True
        self._since += 1
        if self._since >= self.explore:
            self._since = 0
            return True
        return False
