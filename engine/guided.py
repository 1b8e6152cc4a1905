"""Guided decoding on the sampling rank: one llguidance matcher per guided sequence, and the next
token's mask computed while the step's forward runs.

    step N:  begin(seqs)  -> each matcher takes the tokens its sequence gained since step N-1 (the one
                             sampled there; or, the first time, the output some other worker sampled:
                             a prefill worker's first token, a migrated request's delivered tokens),
                             then a thread fills the masks for this step's sampling
             forward      -> logits
             apply()      -> waits for the masks; disallowed tokens get -inf

A matcher follows its sequence's token ids, so nothing about it travels between workers but the
grammar and how many output tokens came before (SamplingParams.guided_start): it is rebuilt anywhere
by replaying them. Compiled grammars are cached (a fresh matcher is a copy of the cached one).

A sequence whose grammar is finished, or that hit an error (a token its grammar refuses, work past
engine/grammar.LIMITS), may only end: its mask allows only the end-of-sequence tokens. A grammar the
model cannot finish within max_tokens ends with finish_reason "length", as any other request.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from engine import grammar as grammars

log = logging.getLogger(__name__)


class _State:
    __slots__ = ("matcher", "consumed", "failed")

    def __init__(self, matcher):
        self.matcher = matcher
        self.consumed = 0  # tokens of the sequence (from its guided start) the matcher has taken
        self.failed = False


class GuidedDecoder:
    def __init__(self, tokenizer_json: str, vocab_size: int, eos_token_ids: tuple[int, ...],
                 cache_size: int = 64):
        self.vocab_size = vocab_size
        self.eos = [t for t in eos_token_ids if t < vocab_size]
        self._tokenizer_json = tokenizer_json
        self._tok = None
        self._tok_lock = threading.Lock()
        self._compiled: OrderedDict[str, object] = OrderedDict()
        self.cache_size = cache_size
        self.states: dict[int, _State] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._executor = None
        self._bitmask: torch.Tensor | None = None
        self.overlap = True  # False: masks computed when sampling needs them (benchmarks/guided_decoding.py)
        self.fill_s = 0.0  # time spent computing masks (matchers fed, masks filled)
        self.wait_s = 0.0  # time sampling waited for them (what the overlap did not hide)

    # ---- matchers --------------------------------------------------------------------------------
    def tokenizer(self):
        """llguidance's view of the vocabulary (~0.5 s to build: once a process, on first use)."""
        with self._tok_lock:
            if self._tok is None:
                import llguidance

                self._tok = llguidance.LLTokenizer(self._tokenizer_json, n_vocab=self.vocab_size,
                                                   eos_token=self.eos or None)
            return self._tok

    def _matcher(self, grammar: str):
        import llguidance

        m = self._compiled.get(grammar)
        if m is None:
            m = llguidance.LLMatcher(self.tokenizer(), grammar, limits=grammars.limits())
            self._compiled[grammar] = m
            while len(self._compiled) > self.cache_size:
                self._compiled.popitem(last=False)
        else:
            self._compiled.move_to_end(grammar)
        return m.deep_copy()

    def _sync(self, seq) -> _State:
        """The sequence's matcher, fed every token it has not taken yet."""
        st = self.states.get(seq.seq_id)
        if st is None:
            st = self.states[seq.seq_id] = _State(self._matcher(seq.params.guided))
            if st.matcher.is_error():
                self._fail(st, seq, st.matcher.get_error())
        start = seq.num_prompt_tokens - seq.params.guided_start
        have = len(seq.token_ids) - start
        if st.failed:
            return st
        if have < st.consumed:  # the sequence lost tokens (never expected): take them back
            st.matcher.rollback(st.consumed - have)
            st.consumed = have
        if have > st.consumed:
            new = seq.token_ids[start + st.consumed:]
            if not st.matcher.consume_tokens(new):
                self._fail(st, seq, st.matcher.get_error() or f"a token of {new} is not allowed")
            st.consumed = have
        return st

    def _fail(self, st: _State, seq, why: str) -> None:
        st.failed = True
        log.warning("guided decoding of %s: %s; it may only end now", seq.request_id or seq.seq_id, why)

    def release(self, seq_id: int) -> None:
        self.states.pop(seq_id, None)

    # ---- masks -----------------------------------------------------------------------------------
    def begin(self, seqs: list) -> tuple[Callable[[], torch.Tensor] | None, list[int]]:
        """Starts the masks of this step's guided sequences (`seqs`: the sampled Sequences, in row
        order). Returns a handle for apply()."""
        rows = [i for i, s in enumerate(seqs) if s.params.guided]
        if not rows:
            return None, rows
        if self._pool is None:
            import llguidance

            self._pool = ThreadPoolExecutor(1, thread_name_prefix="guided-mask")
            self._executor = llguidance.LLExecutor()
        guided = [seqs[i] for i in rows]
        if not self.overlap:
            return (lambda: self._fill(guided)), rows
        return self._pool.submit(self._fill, guided).result, rows

    def _fill(self, seqs: list) -> torch.Tensor:
        t0 = time.perf_counter()
        try:
            return self._fill_masks(seqs)
        finally:
            self.fill_s += time.perf_counter() - t0

    def _fill_masks(self, seqs: list) -> torch.Tensor:
        """The disallowed tokens of each of `seqs` (bool [len(seqs), vocab]), unpacked here, off the
        sampling path, so that sampling only applies them."""
        words = (self.vocab_size + 31) // 32
        if self._bitmask is None or self._bitmask.shape[0] < len(seqs):
            self._bitmask = torch.empty(max(len(seqs), 8), words, dtype=torch.int32)
        mask = self._bitmask[:len(seqs)]
        live = []
        for j, seq in enumerate(seqs):
            st = self._sync(seq)
            if st.failed:
                self._only_eos(mask[j])
            else:
                live.append((st, j, seq))
        if live:
            # llguidance.torch's fill_next_token_bitmask_par, without importing that module (it
            # decorates a function with torch.compile at import: seconds of torch._dynamo)
            self._executor.unsafe_compute_mask_ptr([(st.matcher, j) for st, j, _ in live], mask.data_ptr(),
                                                   words * 4, mask.shape[0])
            for st, j, seq in live:  # the mask step itself may fail (work past the limits)
                if st.matcher.is_error():
                    self._fail(st, seq, st.matcher.get_error())
                    self._only_eos(mask[j])
        return unpack(mask, self.vocab_size)

    def _only_eos(self, row: torch.Tensor) -> None:
        row.zero_()
        for t in self.eos:
            row[t // 32] |= _bit(t % 32)

    def apply(self, handle: tuple[Callable[[], torch.Tensor] | None, list[int]], logits: torch.Tensor) -> None:
        """Disallowed tokens of the guided rows get -inf, in place."""
        future, rows = handle
        if future is None:
            return
        t0 = time.perf_counter()
        disallowed = future()
        self.wait_s += time.perf_counter() - t0
        apply_disallowed(logits, disallowed, rows)


def _bit(i: int) -> int:
    """Bit i of an int32 word, as a Python int that fits int32 (bit 31 is the sign)."""
    return -(1 << 31) if i == 31 else 1 << i


def unpack(mask: torch.Tensor, width: int) -> torch.Tensor:
    """llguidance's bitmask (int32 words; token t is bit t % 32 of word t // 32) as the tokens it does
    not allow: bool [rows, width] (tokens past the mask's end are not allowed)."""
    bits = np.unpackbits(mask.numpy().view(np.uint8), axis=1, bitorder="little")
    if bits.shape[1] < width:
        bits = np.pad(bits, ((0, 0), (0, width - bits.shape[1])))
    return torch.from_numpy(bits[:, :width] == 0)


def apply_disallowed(logits: torch.Tensor, disallowed: torch.Tensor, rows: list[int]) -> None:
    """logits[rows[j], t] = -inf where disallowed[j, t], in place, on the logits' device."""
    dev = logits.device
    v = logits.shape[1]
    if disallowed.shape[1] != v:  # logits wider (or narrower) than the mask: what it does not cover is out
        pad = torch.ones(disallowed.shape[0], max(v - disallowed.shape[1], 0), dtype=torch.bool)
        disallowed = torch.cat([disallowed, pad], dim=1)[:, :v]
    d = disallowed.to(dev)
    if len(rows) == logits.shape[0] and rows == list(range(len(rows))):
        logits.masked_fill_(d, float("-inf"))
        return
    idx = torch.tensor(rows, dtype=torch.long, device=dev)
    logits[idx] = logits[idx].masked_fill(d, float("-inf"))
