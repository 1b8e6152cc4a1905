"""`KVTransport`: what a source rank's transfer code (SendTransfer, OutgoingTransfer, the prefill's
Shipper) asks of a transport. Implementations:

- `zmq_transport.KVClient`: control messages on ZeroMQ; pages as ZeroMQ frames (`zmq`), on a plain
  stream socket (`tcp`, `stream=True`), or through torch.distributed pair groups (`gloo` on CPU,
  `nccl` on GPU: `dist_backend=`). One class, the data path a parameter, so the paths share every
  line of control code and gloo (tested on CPU) cannot drift from NCCL. Which one a worker uses is
  one setting, `KVTransferConfig.transport` (engine/config.py: auto, tcp, zmq, gloo, nccl).
- `fake.FakeKVClient`: in memory, for unit tests of other modules.

`tests/unit/test_kv_transport_interface.py` checks both against this protocol, signatures included.
"""

from __future__ import annotations

from collections import Counter
from concurrent.futures import Future
from typing import Protocol, runtime_checkable

import torch

from kvtransfer.plan import KVLayout
from kvtransfer.protocol import Pages, Reserved


@runtime_checkable
class KVTransport(Protocol):
    metrics: Counter
    path: object  # its data path (kvtransfer/paths.py); `path.gathers`: one gathered tensor per message

    def start(self) -> None: ...

    def stop(self, timeout: float = 5.0) -> None:
        """Stops the I/O (waits at most `timeout` for its thread)."""

    def reserve(self, endpoint: str, request_id: str, attempt: int, num_tokens: int, layout: KVLayout,
                timeout: float = 5.0, block_hashes: list[int] = (), hash_root: int = 0,
                wait_s: float = 0.0) -> Reserved:
        """Asks the receiver's driver for blocks; waits at most `timeout` for its answer. `block_hashes`
        (chained from `hash_root`): the prompt's full blocks, for the receiver to link what it holds;
        `wait_s`: how long the receiver should wait for the pages (Reserve.wait_s)."""

    def reserve_async(self, endpoint: str, request_id: str, attempt: int, num_tokens: int,
                      layout: KVLayout, block_hashes: list[int] = (), hash_root: int = 0,
                      wait_s: float = 0.0) -> Future:
        """The same, answered in a future (the caller keeps the deadline)."""

    def forget_reserve(self, request_id: str, attempt: int) -> None: ...

    def expect_ack(self, request_id: str, attempt: int) -> Future:
        """A future for the receiver's Ack (register before the last pages are sent)."""

    def send_pages(self, endpoint: str, header: Pages, payload: torch.Tensor | list,
                   cache: list | None = None) -> None:
        """Queues one message of pages (returns before they are on the wire)."""

    def abort(self, endpoint: str, request_id: str, attempt: int, reason: str = "") -> None: ...

    def flush(self, timeout: float = 5.0) -> None:
        """Returns once every page queued before the call has been handed over."""
