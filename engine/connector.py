"""The engine's seam for a worker's KV connector (in the spirit of vLLM's KVConnector and SGLang's
KVSender): the engine knows when each layer's KV is written, a worker knows where it must go.

    driver:  schedule() -> SchedulerOutput -> plan(out) -> bytes (the worker's typed plan, encoded)
                                                  │ carried to every rank in the step broadcast
    ranks:   connector.start_forward(rank, runner, plan, seq_ids) -> ForwardHooks | None
               model forward: hooks.on_layer_done(i) after layer i's KV is in the cache
               hooks.finish() once the forward is over

The plan is opaque to the engine (bytes in, bytes out): its schema belongs to the connector
(kvtransfer/connector.py for a prefill worker's shipping), so the engine imports none of ours.
A forward over a micro-batch (pp > 1) calls `start_forward` once per micro-batch with its seq_ids.
"""

from __future__ import annotations

from abc import ABC, abstractmethod


class ForwardHooks(ABC):
    """What a connector does during one forward."""

    @abstractmethod
    def on_layer_done(self, layer: int) -> None:
        """Layer `layer` (local to this rank's stage) has written its KV for every sequence of the
        forward. Runs inside the forward: must not block on a peer, must not raise for a peer's sake."""

    @abstractmethod
    def finish(self) -> None:
        """The forward is over: everything it computed is in the cache."""


class KVConnector(ABC):
    """One per rank process, installed by the worker that owns the engine."""

    @abstractmethod
    def start_forward(self, rank: int, runner, plan: bytes, seq_ids: list[int]) -> ForwardHooks | None:
        """Before a forward over `seq_ids` (this step's plan, never empty): its hooks, or None when the
        plan has nothing for these sequences."""

    def close(self) -> None:  # noqa: B027 (a connector with nothing to release needs no override)
        """The engine is shutting down."""
