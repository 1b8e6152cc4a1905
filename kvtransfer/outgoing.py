"""What one source rank sends for one request: its pages, layer by layer or packed into few messages,
through a `KVTransport` (ZeroMQ frames, the tcp stream, or a torch.distributed pair group)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
import zmq

from kvtransfer.pages import RankCaches, block_runs, page_dtype
from kvtransfer.plan import TransferItem, items_from
from kvtransfer.protocol import MAX_LAYERS, VERSION, Pages

if TYPE_CHECKING:
    from kvtransfer.transport import KVTransport

log = logging.getLogger(__name__)

# layers ready together go as messages of about this many bytes: fewer messages, less per-message work
# on both sides, while the receiver still lands one message as the next arrives (ZeroMQ hands over a
# message only once all its frames are in). Measured at 16 MiB (30 layers): 1 layer a message 8.4-9.8
# ms, 5 layers (2.7 MiB) 7.5-8.2 ms, all 30 in one 9.0 ms.
MESSAGE_BYTES = 4 << 20
MIN_RUN_BLOCKS = 4  # zero-copy frames only when runs average at least this many blocks,
MAX_SHORT_RUNS = 2  # or when there are this few runs (measured: 1 block 5.8 -> 3.9 ms; 23 runs of 1: 17 -> 31)


class OutgoingTransfer:
    """What one source rank sends for one request, layer by layer (call `send_layer` as each layer's
    KV is written: the transfer of layer l overlaps the compute of layer l + 1)."""

    def __init__(self, client: KVTransport, caches: RankCaches, plan: list[TransferItem], src_rank: int,
                 request_id: str, attempt: int, endpoints: list[str], src_block_ids: list[int],
                 dst_block_ids: list[int]):
        if len(src_block_ids) != len(dst_block_ids):
            raise ValueError(f"{len(src_block_ids)} source blocks vs {len(dst_block_ids)} destination blocks")
        self.client, self.caches = client, caches
        self.items = items_from(plan, src_rank)
        self.src_rank, self.request_id, self.attempt = src_rank, request_id, attempt
        self.endpoints = endpoints
        self.src_blocks = torch.tensor(src_block_ids, dtype=torch.long, device=caches.caches[0].device)
        self.src_block_ids = list(src_block_ids)
        self.dst_block_ids = list(dst_block_ids)
        self.layers_sent: set[int] = set()
        # ZeroMQ from a CPU cache: send views of the cache itself (no gather copy)
        self.zero_copy = not client.path.gathers and caches.caches[0].device.type == "cpu"
        self._runs_cache: dict[bool, list[int]] = {}
        self.failed = ""  # why pages could not be handed to the transport (then none go any more)

    def send_layer(self, layer: int) -> int:
        """Sends this rank's pages of `layer` to every destination rank that needs them. Returns messages.
        Never raises for the transport's sake (it runs inside the prefill's forward, for every request
        of the batch): a receiver that cannot be reached fails this transfer only (`failed`), and the
        sender's wait for the Ack tells the rest."""
        return self.send_layers([layer])

    def send_layers(self, layers: list[int]) -> int:
        """Sends this rank's pages of `layers` (all computed) to every destination rank that needs them:
        over ZeroMQ frames, one message per destination rank and run of consecutive layers, so the
        per-message work (header, wake-ups, bookkeeping on both sides) is paid once, not per layer.
        Returns messages."""
        n = 0
        for it in self.items:
            per_message = 1 if self.client.path.gathers else \
                max(1, min(MAX_LAYERS, MESSAGE_BYTES // self._layer_bytes(it)))
            mine = [layer for layer in sorted(layers) if it.layers[0] <= layer < it.layers[1]]
            group: list[int] = []
            for layer in mine:
                if group and (layer != group[-1] + 1 or len(group) == per_message):
                    self._send(it, group)
                    n += 1
                    group = []
                group.append(layer)
            if group:
                self._send(it, group)
                n += 1
        self.layers_sent.update(layers)
        return n

    def _layer_bytes(self, it: TransferItem) -> int:
        """One layer's pages of item `it`: K and V of the request's blocks, the item's heads."""
        _, _, _, bs, hd = self.caches.caches[0].shape
        return self.caches.caches[0].element_size() * 2 * len(self.dst_block_ids) * (it.heads[1] - it.heads[0]) * bs * hd

    def _send(self, it: TransferItem, layers: list[int]) -> None:
        """One Pages message: item `it`'s pages of `layers` (consecutive)."""
        if self.failed:
            return
        cache = self.caches.caches[0]
        nh = it.heads[1] - it.heads[0]
        shape = [2, len(self.dst_block_ids), nh, cache.shape[3], cache.shape[4]]
        dtype = page_dtype(cache)
        runs = self._runs(nh == self.caches.num_heads) if self.zero_copy else []
        owners = None
        if runs:
            payload = [v for layer in layers for v in self.caches.slabs(layer, it.heads, self.src_block_ids, runs)]
            if all(v.base is not None for v in payload):  # views of the cache (a strided cache's are copies)
                owners = [self.caches.byte_view(layer) for layer in layers]
        elif len(layers) > 1:
            payload = [self.caches.extract(layer, it.heads, self.src_blocks) for layer in layers]
        else:
            payload = self.caches.extract(layers[0], it.heads, self.src_blocks)
        header = Pages(VERSION, self.request_id, self.attempt, self.src_rank, layers[0], it.heads,
                       self.dst_block_ids, dtype, shape, self._layer_bytes(it) * len(layers), runs=runs,
                       num_layers=len(layers))
        endpoint = self.endpoints[it.dst_rank]
        try:
            self.client.send_pages(endpoint, header, payload, owners)
        except (OSError, RuntimeError, zmq.ZMQError) as e:  # pairing failed; a GPU staging copy failed
            self.failed = f"{type(e).__name__}: {e}"
            self.client.metrics["transfers_send_failed"] += 1
            log.warning("KV pages of %s (attempt %d) to %s not sent: %s", self.request_id, self.attempt, endpoint,
                        self.failed, exc_info=not isinstance(e, OSError))

    def _runs(self, whole_blocks: bool) -> list[int]:
        """Zero-copy runs when they are few or long enough to beat one gather (each frame costs a
        few us in pyzmq and libzmq); [] means gather into one frame."""
        key = whole_blocks
        if key not in self._runs_cache:
            runs = block_runs(self.src_block_ids, self.dst_block_ids, whole_blocks)
            few = len(runs) <= MAX_SHORT_RUNS or len(runs) * MIN_RUN_BLOCKS <= len(self.src_block_ids)
            self._runs_cache[key] = runs if few else []
        return self._runs_cache[key]

    def send_all(self) -> int:
        """Sends every layer not sent yet (all computed), as few messages as `send_layers` makes."""
        return self.send_layers(sorted({layer for it in self.items for layer in range(*it.layers)} - self.layers_sent))
