"""Pages in and out of one rank's KV caches.

A rank holds layers [layer_start, layer_end) and KV heads [head_start, head_end); each layer's cache is
`[2, num_blocks, local_heads, block_size, row]` (engine/attention.py; row = head_dim, or head_dim + 4
bytes in a quantized cache, whose scales thus travel inside the pages). A frame carries one layer's pages
for a list of blocks and a head range: `[2, num_blocks, h1 - h0, block_size, row]`, in the cache's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from engine.kv_quant import STORAGE, cache_format

# a page dtype's name on the wire -> the cache tensor's dtype (a quantized format's storage: engine/kv_quant.py)
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, **STORAGE}


def page_dtype(cache: torch.Tensor) -> str:
    """The name pages of this cache ship under: its float dtype, or its quantized format."""
    return cache_format(cache) or str(cache.dtype).removeprefix("torch.")


@dataclass
class RankCaches:
    caches: list[torch.Tensor]  # one per local layer
    layer_start: int
    head_start: int
    _bytes: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def byte_view(self, layer: int) -> np.ndarray:
        """The layer's CPU cache as bytes, `[2, num_blocks, heads, block_size, row * itemsize]`
        (made once: slicing a numpy array costs ~0.2 us, a torch view ~10 us, per frame)."""
        v = self._bytes.get(layer)
        if v is None:
            v = self._bytes[layer] = self.caches[layer - self.layer_start].view(torch.uint8).numpy()
        return v

    @property
    def num_heads(self) -> int:
        return self.caches[0].shape[2]

    @property
    def num_blocks(self) -> int:
        return self.caches[0].shape[1]

    def extract(self, layer: int, heads: tuple[int, int], block_ids: torch.Tensor) -> torch.Tensor:
        """A contiguous copy of the pages: [2, len(block_ids), h1 - h0, block_size, row]."""
        pages = self.caches[layer - self.layer_start].index_select(1, block_ids)
        h0, h1 = heads[0] - self.head_start, heads[1] - self.head_start
        if h0 == 0 and h1 == self.num_heads:
            return pages
        return pages[:, :, h0:h1].contiguous()

    def insert(self, layer: int, heads: tuple[int, int], block_ids: torch.Tensor, payload: torch.Tensor) -> None:
        cache = self.caches[layer - self.layer_start]
        h0, h1 = heads[0] - self.head_start, heads[1] - self.head_start
        target = cache if (h0 == 0 and h1 == self.num_heads) else cache[:, :, h0:h1]
        # (pages of another float dtype are cast here, as `insert_runs`' copy_ casts them)
        target.index_copy_(1, block_ids, payload.to(cache.device, cache.dtype, non_blocking=True))


    def slabs(self, layer: int, heads: tuple[int, int], src_block_ids: list[int], runs: list[int]) -> list[np.ndarray]:
        """Zero-copy byte views of the pages (CPU cache), K then V, one per run of blocks (see
        `block_runs`): each is contiguous, as a run covers whole blocks or a single block."""
        cache = self.byte_view(layer)
        h0, h1 = heads[0] - self.head_start, heads[1] - self.head_start
        out = []
        for kv in (0, 1):
            i = 0
            for n in runs:
                b = src_block_ids[i]
                out.append(np.ascontiguousarray(cache[kv, b:b + n, h0:h1]))  # a view unless the cache is one
                i += n
        return out

    def insert_runs(self, layer: int, heads: tuple[int, int], dst_block_ids: list[int], runs: list[int],
                    frames: list[torch.Tensor]) -> None:
        cache = self.caches[layer - self.layer_start]
        h0, h1 = heads[0] - self.head_start, heads[1] - self.head_start
        k = 0
        for kv in (0, 1):
            i = 0
            for n in runs:
                b = dst_block_ids[i]
                cache[kv, b:b + n, h0:h1].copy_(frames[k].view(n, h1 - h0, *cache.shape[3:]), non_blocking=True)
                i += n
                k += 1


def block_runs(src_block_ids: list[int], dst_block_ids: list[int], whole_blocks: bool) -> list[int]:
    """Split blocks into runs that are consecutive on both sides, so each run of one layer's K (or V)
    is one contiguous region in both caches. Only with `whole_blocks` (all of the source rank's heads
    go) is a run of several blocks contiguous; otherwise every block is its own run."""
    if not whole_blocks:
        return [1] * len(src_block_ids)
    runs, n = [], 0
    for i in range(len(src_block_ids)):
        if n and src_block_ids[i] == src_block_ids[i - 1] + 1 and dst_block_ids[i] == dst_block_ids[i - 1] + 1:
            n += 1
        else:
            if n:
                runs.append(n)
            n = 1
    if n:
        runs.append(n)
    return runs


def to_bytes_view(t: torch.Tensor | np.ndarray) -> np.ndarray:
    """A zero-copy byte view of a contiguous CPU tensor (any dtype, bf16 included), for ZeroMQ."""
    if isinstance(t, np.ndarray):
        return t
    return t.contiguous().view(torch.uint8).numpy()


def from_buffer(buf, dtype: str, shape: list[int]) -> torch.Tensor:
    """A tensor over a frame's bytes: a buffer (ZeroMQ) or a byte tensor (a staging buffer's slice)."""
    if isinstance(buf, torch.Tensor):
        return buf.view(TORCH_DTYPES[dtype]).view(shape)
    return torch.frombuffer(buf, dtype=TORCH_DTYPES[dtype]).view(shape)
