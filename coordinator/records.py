"""The records placement works on: cost models, worker states as the policies see them, a request to
place and the answers (coordinator/policy.py decides; the live view and the simulator fill them in).
Pure data, no I/O."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

INF = float("inf")


@dataclass(frozen=True, order=True)  # ordered: an index key may hold one
class PrefillCost:
    a: float = 0.005  # seconds per step (shared by the prompts batched in it)
    b: float = 2e-4  # seconds per token
    c: float = 0.0  # seconds per token^2 (per prompt)
    hop: float = 0.0  # seconds per request outside the worker's steps: its TTFT only, nobody's queue
    # pipeline parallelism (what the planner models; a profiled worker is one stage as measured):
    # each of `stages` stages runs a step in a + (b·n + c·n²) / stages, hands it to the next in
    # `stage_hop`, and takes the next step as soon as it has handed this one on
    stages: int = 1
    stage_hop: float = 0.0

    def stage_seconds(self, n: int) -> float:
        return self.a + (self.b * n + self.c * n * n) / self.stages

    def seconds(self, n: int) -> float:
        """One prompt of n tokens alone in a step, through every stage (the worker's time; no hop)."""
        return self.stages * self.stage_seconds(n) + (self.stages - 1) * self.stage_hop

    def queue_seconds(self, tokens: int, prompts: int = 1, step_tokens: int = 2048) -> float:
        """The worker's time for `tokens` queued tokens of `prompts` prompts, batched into steps of up to
        `step_tokens` tokens (Σn² taken as tokens²/prompts: prompts of equal length); pipelined, a step
        holds the next one up for one stage only."""
        if tokens <= 0:
            return 0.0
        steps = -(-tokens // max(step_tokens, 1))
        return self.a * steps + (self.b * tokens + self.c * tokens * tokens / max(prompts, 1)) / self.stages


@dataclass(frozen=True, order=True)
class DecodeCost:
    base: float = 0.02
    per_seq: float = 0.001
    per_token: float = 1e-6  # per token of context summed over the batch

    def step_seconds(self, batch: int, total_context: int) -> float:
        return self.base + self.per_seq * batch + self.per_token * total_context


@dataclass
class PrefillWorkerState:
    worker_id: str
    cost: PrefillCost = field(default_factory=PrefillCost)
    queued_tokens: int = 0  # prompt tokens waiting or being computed there
    healthy: bool = True  # False: suspect (missed heartbeats) or draining: no new work
    transfer_s_per_token: float = 0.0  # first layer's KV on the wire, per prompt token
    queued_prompts: int = 0  # the prompts those tokens belong to (0 with tokens queued: taken as 1)
    step_tokens: int = 2048  # its token budget per step (the engine's max_num_batched_tokens)


@dataclass
class RunningRequest:
    context: int
    tpot_slo: float


@dataclass
class DecodeWorkerState:
    worker_id: str
    cost: DecodeCost = field(default_factory=DecodeCost)
    running: list[RunningRequest] = field(default_factory=list)
    free_tokens: int = 1 << 30  # KV capacity left
    max_batch: int = 256
    healthy: bool = True

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def total_context(self) -> int:
        return sum(r.context for r in self.running)

    @property
    def tightest_tpot(self) -> float:
        return min((r.tpot_slo for r in self.running), default=float("inf"))


@dataclass(slots=True)
class DecodeLoad:
    """A decode worker's load in aggregate, what a DecodeWorkerState's running list sums to: the live
    view keeps one per worker current for its indexes."""
    worker_id: str
    cost: DecodeCost = field(default_factory=DecodeCost)
    num_running: int = 0
    total_context: int = 0
    tightest_tpot: float = INF
    free_tokens: int = 0
    max_batch: int = 256


@dataclass(frozen=True)
class PlacementRequest:
    prompt_tokens: int
    max_tokens: int
    ttft_slo: float = float("inf")  # seconds
    tpot_slo: float = float("inf")
    # prompt tokens each worker already holds in its prefix cache (the KV index's leading blocks)
    cached: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Placement:
    prefill: str
    decode: str
    predicted_ttft: float
    predicted_tpot: float


@dataclass(frozen=True)
class Rejection:
    reason: str
    retry_after: float = 1.0  # seconds
