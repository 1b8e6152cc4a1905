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
