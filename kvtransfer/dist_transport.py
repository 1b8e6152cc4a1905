"""The torch.distributed data path: KV payloads through pairwise process groups (gloo on CPU, NCCL on GPU).

No global world: each (sender rank, receiver rank) pair gets its own 2-rank group, created on demand
from the receiver's TCPStore, whose address travels over the ZeroMQ control plane (`PairHello` ->
`PairInfo`). A worker that joins or leaves touches no other pair. Headers, reservations and acks stay
on ZeroMQ; only payloads take this path, so gloo (tested on CPU) and NCCL share every line but the
backend name.

NCCL memory: each pair group is an NCCL communicator of 2 ranks; NCCL allocates its buffers per
communicator and peer (by default on the order of 4-10 MiB of device memory per P2P channel, more with
NCCL_BUFFSIZE), so a decode worker paired with N prefill ranks pays N of those; keep pools bounded.
"""

from __future__ import annotations

import threading
from datetime import timedelta

import torch
import torch.distributed as dist

BACKENDS = ("gloo", "nccl")


def _check(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"dist backend {backend!r} must be one of {BACKENDS}")


def make_pair_group(store, pair: str, rank: int, backend: str, timeout: float, device: torch.device):
    """A 2-rank group (0 = sender, 1 = receiver) over `store`, without init_process_group."""
    _check(backend)
    prefixed = dist.PrefixStore(f"pair/{pair}/", store)
    td = timedelta(seconds=timeout)
    if backend == "gloo":
        return dist.ProcessGroupGloo(prefixed, rank, 2, td)
    opts = dist.ProcessGroupNCCL.Options()
    opts._timeout = td
    torch.cuda.set_device(device)
    return dist.ProcessGroupNCCL(prefixed, rank, 2, opts)


class PairHost:
    """The receiver rank's side: its rendezvous store and the groups of the senders that paired."""

    def __init__(self, host: str, backend: str, timeout: float = 30.0, device: str = "cpu"):
        _check(backend)
        self.backend, self.timeout = backend, timeout
        self.device = torch.device(device)
        self.store = dist.TCPStore(host, 0, is_master=True, wait_for_workers=False,
                                   timeout=timedelta(seconds=timeout))
        self.host, self.port = host, self.store.port
        self._groups: dict[str, object] = {}
        self._ready: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def accept(self, pair: str) -> None:
        """Joins the pair's group in the background (it completes when the sender joins too)."""
        with self._lock:
            if pair in self._ready:
                return
            ev = self._ready[pair] = threading.Event()

        def join():
            try:
                self._groups[pair] = make_pair_group(self.store, pair, 1, self.backend, self.timeout, self.device)
            finally:
                ev.set()
        threading.Thread(target=join, name=f"kv-pair-{pair}", daemon=True).start()

    def recv(self, pair: str, tag: int, dtype: torch.dtype, shape: list[int], timeout: float) -> torch.Tensor | None:
        ev = self._ready.get(pair)
        if ev is None or not ev.wait(timeout) or pair not in self._groups:
            return None
        buf = torch.empty(shape, dtype=dtype, device=self.device)
        self._groups[pair].recv([buf], 0, tag).wait(timedelta(seconds=timeout))
        return buf


class PairClient:
    """The sender rank's side: one group per receiver endpoint, joined on first use."""

    def __init__(self, backend: str, timeout: float = 30.0, device: str = "cpu"):
        _check(backend)
        self.backend, self.timeout = backend, timeout
        self.device = torch.device(device)
        self._groups: dict[str, tuple[object, object]] = {}  # endpoint -> (store, group)
        self._tags: dict[str, int] = {}

    def has(self, endpoint: str) -> bool:
        return endpoint in self._groups

    def join(self, endpoint: str, pair: str, host: str, port: int) -> None:
        store = dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=self.timeout))
        group = make_pair_group(store, pair, 0, self.backend, self.timeout, self.device)
        self._groups[endpoint] = (store, group)

    def drop(self, endpoint: str) -> None:
        self._groups.pop(endpoint, None)

    def next_tag(self, endpoint: str) -> int:
        self._tags[endpoint] = self._tags.get(endpoint, 0) + 1
        return self._tags[endpoint]

    def send(self, endpoint: str, tensor: torch.Tensor, tag: int) -> None:
        _, group = self._groups[endpoint]
        group.send([tensor.to(self.device)], 1, tag).wait(timedelta(seconds=self.timeout))
