"""Continuous-batching scheduler with chunked prefill and preemption by recompute. Pure bookkeeping.

Each step spends a token budget: first on running sequences (one token each when decoding, a chunk
when their prompt is still being computed), then on waiting ones in arrival order. When the block
pool runs dry, the most recently admitted running sequence is preempted: its blocks are freed and it
goes back to the head of the waiting queue, to be recomputed (mostly from the prefix cache).

    schedule() -> SchedulerOutput -> (model runner) -> update(output, sampled tokens)
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from engine.block_manager import BlockManager
from engine.sequence import Sequence, SequenceStatus
from engine.spec_decode import Proposer, SpeculationPolicy


@dataclass
class ScheduledSeq:
    seq: Sequence
    start: int  # first position computed this step (= num_computed_tokens before the step)
    num_new_tokens: int
    sample: bool  # this step reaches the end of the sequence's tokens: sample the next one
    prompt_logprobs: bool = False  # report the logprobs of the prompt tokens after these positions
    # speculation (engine/spec_decode.py): guessed tokens after the last one, computed in this step too
    # (num_new_tokens counts them); a token is drawn at each of the 1 + len(draft) positions
    draft: list[int] = field(default_factory=list)

    @property
    def has_output(self) -> bool:
        """The step gives something back for this sequence: a token, or prompt logprobs."""
        return self.sample or self.prompt_logprobs


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    num_batched_tokens: int = 0

    @property
    def empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int, eos_token_ids: tuple[int, ...] = (), proposer: Proposer | None = None,
                 num_speculative_tokens: int = 0, speculative_max_batch: int = 0):
        self.bm = block_manager
        self.proposer = proposer
        self.spec_k = num_speculative_tokens if proposer is not None else 0
        self.spec_policy = SpeculationPolicy(speculative_max_batch)
        self.num_proposed = 0  # guessed tokens computed, and those accepted (for metrics)
        self.num_accepted = 0
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    # ---- queue management ----------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def finish(self, seq: Sequence, status: SequenceStatus) -> None:
        """Finish or abort `seq` wherever it is; frees its blocks. Idempotent."""
        if seq.is_finished:
            return
        if seq.status == SequenceStatus.RUNNING:
            self.running.remove(seq)
        else:
            try:
                self.waiting.remove(seq)
            except ValueError:
                pass
        seq.status = status
        self.bm.free(seq)
        self.spec_policy.forget(seq.seq_id)
        if (forget := getattr(self.proposer, "forget", None)) is not None:
            forget(seq.seq_id)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    # ---- the step ------------------------------------------------------------------------------
    def schedule(self, busy: frozenset | set = frozenset(), max_seqs: int | None = None) -> SchedulerOutput:
        """`busy`: ids of sequences in a step still in flight (pipeline parallelism): not scheduled, never
        preempted. `max_seqs`: at most this many sequences in the step (so that pp steps share the
        running batch)."""
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        scheduled_ids: set[int] = set()
        cap = max_seqs if max_seqs is not None else self.max_num_seqs

        decoding = [s for s in self.running if s.num_tokens - s.num_computed_tokens == 1
                    and s.seq_id not in busy] if self.spec_k > 0 else []
        guesses = self._propose_all(decoding) if decoding and self.spec_policy.decide(len(decoding)) else {}
        i = 0
        while i < len(self.running) and budget > 0 and len(out.scheduled) < cap:
            seq = self.running[i]
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if num_new <= 0 or seq.seq_id in busy:  # nothing to do, or its last step is still in flight
                i += 1
                continue
            if num_new == 1 and (draft := guesses.get(seq.seq_id, [])[:budget - 1]) \
                    and self._spare_for(seq, 1 + len(draft), i) and self.bm.allocate_slots(seq, 1 + len(draft)):
                self._emit(out, seq, 1 + len(draft), draft)
                scheduled_ids.add(seq.seq_id)
                budget -= 1 + len(draft)
                i += 1
                continue
            while not self.bm.allocate_slots(seq, num_new):
                victim = next((s for s in reversed(self.running) if s.seq_id not in busy), seq)
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            else:
                self._emit(out, seq, num_new)
                scheduled_ids.add(seq.seq_id)
                budget -= num_new
                i += 1
                continue
            break  # seq itself was preempted: it was the last running one

        if not out.preempted:
            skipped: list[Sequence] = []
            while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and \
                    len(out.scheduled) < cap:
                seq = self.waiting[0]
                parent = seq.parent
                if parent is not None and parent.status == SequenceStatus.RUNNING \
                        and parent.num_computed_tokens < parent.num_prompt_tokens:
                    # n > 1: wait for the first sample to compute the prompt, then share its blocks
                    skipped.append(self.waiting.popleft())
                    continue
                computed = self.bm.get_computed_blocks(seq) if seq.num_computed_tokens == 0 else []
                num_new = min(seq.num_tokens - seq.num_computed_tokens
                              - len(computed) * self.bm.block_size, budget)
                if not self.bm.allocate_slots(seq, num_new, computed):
                    break
                self.waiting.popleft()
                seq.status = SequenceStatus.RUNNING
                self.running.append(seq)
                self._emit(out, seq, num_new)
                budget -= num_new
            self.waiting.extendleft(reversed(skipped))
        out.num_batched_tokens = self.max_num_batched_tokens - budget
        return out

    def update(self, out: SchedulerOutput, sampled: dict[int, list[int]]) -> list[Sequence]:
        """Advance counters after a step; append the tokens it drew (seq_id -> token ids: one, or with
        speculation the accepted guesses and the token after them). A stop (eos, stop token, length) at
        one of them drops those after it: `sampled` is trimmed to what was appended.

        Returns the sequences that finished in this step (eos, stop token, length).
        """
        finished: list[Sequence] = []
        if any(s.draft for s in out.scheduled):  # what speculating earned (engine/spec_decode.py)
            dec = [s for s in out.scheduled if s.sample and s.num_new_tokens - len(s.draft) == 1
                   and s.seq.seq_id in sampled]
            if dec:
                self.spec_policy.observe_gain(len(dec), sum(len(sampled[s.seq.seq_id]) for s in dec),
                                              sum(s.num_new_tokens for s in dec))
        for s in out.scheduled:
            seq = s.seq
            if seq.is_finished or seq.status != SequenceStatus.RUNNING:
                continue  # aborted while the step ran
            if not s.sample:
                seq.num_computed_tokens = s.start + s.num_new_tokens
                self.bm.cache_full_blocks(seq)
                continue
            tokens = sampled[seq.seq_id]
            if s.draft:
                self.num_proposed += len(s.draft)
                self.num_accepted += len(tokens) - 1
                self.spec_policy.observe_seq(seq.seq_id, len(s.draft), len(tokens) - 1)
            status = None
            for n, token in enumerate(tokens, 1):
                seq.token_ids.append(token)
                if (status := self._check_stop(seq, token)) is not None:
                    del tokens[n:]
                    break
            # the KV of the last token and of the guesses that held (the tokens drawn after them), up to
            # a stop among them
            seq.num_computed_tokens = s.start + s.num_new_tokens - len(s.draft) + len(tokens) - 1
            self.bm.cache_full_blocks(seq)
            if status is not None:
                self.finish(seq, status)
                finished.append(seq)
        return finished

    # ---- helpers -------------------------------------------------------------------------------
    def _emit(self, out: SchedulerOutput, seq: Sequence, num_new: int, draft: list[int] | None = None) -> None:
        start = seq.num_computed_tokens
        out.scheduled.append(ScheduledSeq(seq, start, num_new, start + num_new - len(draft or ()) == seq.num_tokens,
                                          seq.computes_prompt_logprobs, draft or []))

    def _spare_for(self, seq: Sequence, num_new: int, i: int) -> bool:
        """Whether `seq`'s guesses (num_new tokens with its last) fit in blocks the running sequences after
        it would not need for their next token: guesses, likely some rejected, never cost another
        sequence its place (a preemption)."""
        extra = self.bm.blocks_needed(seq.num_computed_tokens + num_new) - len(seq.block_ids)
        return extra <= self.bm.num_free_blocks - (len(self.running) - i - 1)

    def _propose_all(self, decoding: list[Sequence]) -> dict[int, list[int]]:
        """The proposer's guesses for the decoding sequences (a batch where the proposer takes one: a
        draft model), by seq_id; see _guess_limit for how many."""
        items = [(seq, k) for seq in decoding if (k := self._guess_limit(seq, len(decoding))) > 0]
        if not items:
            return {}
        batch = getattr(self.proposer, "propose_batch", None)
        got = batch(items) if batch is not None else [self.proposer.propose(seq, k) for seq, k in items]
        return {seq.seq_id: g[:k] for (seq, k), g in zip(items, got) if g}

    def _guess_limit(self, seq: Sequence, n: int = 1) -> int:
        """How many guesses `seq` may make: what its acceptance rate pays for (the policy), at most
        spec_k, none that max_tokens or the context limit would cut off (the token drawn after them
        must fit too); none for guided sequences (their grammar would have to advance through them)."""
        p = seq.params
        k = min(self.spec_k, self.max_model_len - seq.num_tokens - 1)
        if p.max_tokens is not None:
            k = min(k, p.max_tokens - seq.num_output_tokens - 1)
        if k <= 0 or p.guided:
            return 0
        return self.spec_policy.guesses(seq.seq_id, k, n)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.bm.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _check_stop(self, seq: Sequence, token: int) -> SequenceStatus | None:
        p = seq.params
        n_out = seq.num_output_tokens
        if n_out >= p.min_tokens:
            if not p.ignore_eos and token in self.eos_token_ids:
                seq.stop_reason = token
                return SequenceStatus.FINISHED_STOPPED
            if token in p.stop_token_ids:
                seq.stop_reason = token
                return SequenceStatus.FINISHED_STOPPED
        if p.max_tokens is not None and n_out >= p.max_tokens:
            return SequenceStatus.FINISHED_LENGTH
        if seq.num_tokens >= self.max_model_len:
            return SequenceStatus.FINISHED_LENGTH
        return None
