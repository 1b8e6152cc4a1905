"""Requests and sequences: pure bookkeeping, shared by the scheduler, the engine and the workers.

A `Sequence` is one stream of tokens (prompt + output). The scheduler only counts tokens:
`num_computed_tokens` of `num_tokens` have KV in the cache; whatever is between the two is computed
next, whether it is a whole prompt, a chunk of one, or the single token sampled in the last step.
A decode worker that received a prompt's KV simply starts with `num_computed_tokens = prompt_len`.

A request with `n > 1` has n sequences. Children wait until the first sequence has computed the
prompt, then share its full KV blocks (`parent` / fork in the block manager) and only recompute the
last, partial block.
"""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field

from engine.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"  # eos, stop token or stop string
    FINISHED_LENGTH = "length"  # max_tokens or the context limit
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in (SequenceStatus.FINISHED_STOPPED, SequenceStatus.FINISHED_LENGTH,
                        SequenceStatus.FINISHED_ABORTED)


_seq_ids = itertools.count()


@dataclass(eq=False)
class Sequence:
    request_id: str
    index: int  # which of the request's n samples
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    seq_id: int = field(default_factory=lambda: next(_seq_ids))
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # of the prompt, found in the prefix cache at admission
    block_ids: list[int] = field(default_factory=list)
    parent: Sequence | None = None  # n > 1: share the parent's prompt blocks once it has them
    num_preemptions: int = 0
    stop_reason: int | str | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def computes_prompt_logprobs(self) -> bool:
        """This is the sequence that reports its request's prompt logprobs (the first sample; n > 1
        children wait for it), and it has not yet: it has no output token."""
        return self.params.prompt_logprobs is not None and self.parent is None and self.num_output_tokens == 0

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    def __repr__(self) -> str:
        return (f"Sequence({self.request_id}#{self.index}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens}, {self.status.value})")
