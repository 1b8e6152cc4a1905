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
(a sampled draft, EAGLE, Medusa) would need the general min(1, p/q) test, and `Proposer` to return
that distribution with its tokens.

KV written at rejected positions lies past the sequence's computed tokens: the next step writes over it.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from engine.sequence import Sequence


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
    """How much to speculate, from the engine's own measurements (engine/llm_engine.py feeds them): the
    time of decode steps by their row count (an average per power-of-two bucket), what speculating steps
    earned (tokens and rows per decoding sequence), and each sequence's acceptance rate.

    - A step of n decoding sequences speculates when n * gain tokens in T(n * rows) beat n in T(n) by
      5%: decode is memory-bound while the batch is small (guesses ride along cheaply) and
      compute-bound once it is large (each guess costs a token's compute). Until both times and the gain
      are measured it speculates (up to `max_batch` sequences, which also caps it), and every `explore`
      steps it does once anyway, so the gain stays current (the interval doubling, up to 16x, while
      those steps find no gain: each costs a draft model its catch-up).
    - A sequence guesses the k that maximizes the tokens a step gives over what it costs: (1 + a + ... +
      a^k) / (1 + c k), a its acceptance rate (guesses held over guesses tried; the first guess is
      tried, each next one only after the one before held), c what a row adds to a one-row step
      (measured; 0.25 until then). None where no k gains 5%, except a single one every `explore_seq`
      steps (doubling, up to 16x, while they fail), so a sequence that turns repetitive is noticed."""

    def __init__(self, max_batch: int, explore: int = 50, margin: float = 1.05, explore_seq: int = 16):
        self.max_batch, self.explore, self.margin, self.explore_seq = max_batch, explore, margin, explore_seq
        self.times: dict[int, tuple[float, float]] = {}  # row-count bucket -> (seconds, rows) of decode steps
        self.gain: float | None = None  # tokens a decoding sequence appends in a speculating step
        self.rows: float | None = None  # rows it takes there
        self.held, self.tried = 0.0, 0.0  # every sequence's guesses (decayed): the prior of a new one
        self.seqs: dict[int, list[float]] = {}  # seq_id -> [held, tried, steps without guessing, interval]
        self._since = 0
        self._interval = explore  # steps between exploring ones (doubling while they find no gain)
        self.exploring = False  # the step decide() let speculate does so to measure
        self.timed = True  # the engine times its steps (not under pipelined PP): else no exploring

    @staticmethod
    def bucket(rows: float) -> int:
        return max(1, int(rows)).bit_length()

    def observe_step(self, rows: int, seconds: float) -> None:
        """A decode-only step's (or a speculating one's) wall time."""
        b = self.bucket(rows)
        old = self.times.get(b)
        self.times[b] = (seconds, rows) if old is None else (0.8 * old[0] + 0.2 * seconds, 0.8 * old[1] + 0.2 * rows)

    def observe_gain(self, seqs: int, tokens: int, rows: int) -> None:
        """A speculating step: its decoding sequences appended `tokens` in `rows` rows."""
        g, r = tokens / seqs, rows / seqs
        self.gain = g if self.gain is None else 0.9 * self.gain + 0.1 * g
        self.rows = r if self.rows is None else 0.9 * self.rows + 0.1 * r

    def observe_seq(self, seq_id: int, guessed: int, held: int) -> None:
        tried = held + 1 if held < guessed else guessed
        st = self.seqs.setdefault(seq_id, [0.0, 0.0, 0, self.explore_seq])
        st[0], st[1] = 0.8 * st[0] + held, 0.8 * st[1] + tried
        self.held, self.tried = 0.95 * self.held + held, 0.95 * self.tried + tried

    def forget(self, seq_id: int) -> None:
        self.seqs.pop(seq_id, None)

    def row_cost(self, n: int = 1) -> float:
        """What a row adds to a step of n decoding sequences, as a share of that step's time per sequence
        (measured: T(n + 4) - T(n) over 4, against T(n) / n); 0.25 before it can be told."""
        t_n, t_more = self.step_time(n), self.step_time(n + 4)
        if t_n is None or t_more is None or t_n <= 0 or len(self.times) < 2:
            return 0.25
        return max(0.0, (t_more - t_n) / 4 / (t_n / n))

    def step_time(self, rows: float) -> float | None:
        """A decode step's time at `rows` rows: between the measured buckets' (mean rows, seconds),
        linearly, and past them along the last two; None before two are measured (one where rows fall
        in its bucket)."""
        pts = sorted((r, t) for t, r in self.times.values())
        if len(pts) < 2:
            return pts[0][1] if pts and self.bucket(rows) in self.times else None
        # the segment around `rows`, or the last one past them
        (r0, t0), (r1, t1) = next((p for p in zip(pts, pts[1:]) if rows <= p[1][0]), pts[-2:])
        return t1 if r1 == r0 else max(t0 + (t1 - t0) * (rows - r0) / (r1 - r0), 0.0)

    def decide(self, n: int) -> bool:
        """Whether a step of n decoding sequences speculates (`exploring`: only to measure it)."""
        self.exploring = False
        if n <= 0 or n > self.max_batch:
            return False
        t_plain = self.step_time(n)
        t_spec = self.step_time(n * self.rows) if self.rows is not None else None
        if self.gain is None or t_plain is None or t_spec is None:
            self.exploring = self.timed
            return True
        if self.gain * t_plain >= self.margin * t_spec:
            self._since = 0
            self._interval = self.explore
            return True
        self._since += 1
        if self._since >= self._interval:  # the interval doubles while exploring finds no gain
            self._since = 0
            self._interval = min(2 * self._interval, 16 * self.explore)
            self.exploring = self.timed
            return True
        return False

    def guesses(self, seq_id: int, kmax: int, n: int = 1) -> int:
        """How many guesses sequence `seq_id` should make this step (at most kmax), in a step of n
        decoding sequences."""
        st = self.seqs.setdefault(seq_id, [0.0, 0.0, 0, self.explore_seq])
        held, tried = (st[0], st[1]) if st[1] >= 1 else (self.held, self.tried)
        a = held / tried if tried >= 1 else 0.5
        c = self.row_cost(n)
        best_k, best = 0, self.margin
        total, p = 1.0, 1.0
        for k in range(1, kmax + 1):
            p *= a
            total += p
            if total / (1 + c * k) > best:
                best_k, best = k, total / (1 + c * k)
        if best_k == 0 and kmax > 0:
            st[2] += 1
            if st[2] >= st[3] or self.exploring:  # a step that explores tries one guess each
                st[2] = 0
                st[3] = min(2 * st[3], 16 * self.explore_seq)  # less often while tries fail
                return 1
        elif best_k:
            st[3] = self.explore_seq
        return best_k
