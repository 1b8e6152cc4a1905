"""Pages in and out of one rank's KV caches.

A rank holds layers [layer_start, layer_end) and KV heads [head_start, head_end); each layer's cache is
`[2, num_blocks, local_heads, block_size, head_dim]` (engine/attention.py). A frame carries one layer's
pages for a list of blocks and a head range: `[2, num_blocks, h1 - h0, block_size, head_dim]`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class RankCaches:
    caches: list[torch.Tensor]  # one per local layer
    layer_start: int
    head_start: int

    @property
    def num_heads(self) -> int:
        return self.caches[0].shape[2]

    @property
    def num_blocks(self) -> int:
        return self.caches[0].shape[1]

    def holds(self, layer: int, heads: tuple[int, int]) -> bool:
        return (self.layer_start <= layer < self.layer_start + len(self.caches)
                and self.head_start <= heads[0] < heads[1] <= self.head_start + self.num_heads)

    def extract(self, layer: int, heads: tuple[int, int], block_ids: torch.Tensor) -> torch.Tensor:
        """A contiguous copy of the pages: [2, len(block_ids), h1 - h0, block_size, head_dim]."""
        pages = self.caches[layer - self.layer_start].index_select(1, block_ids)
        h0, h1 = heads[0] - self.head_start, heads[1] - self.head_start
        if h0 == 0 and h1 == self.num_heads:
            return pages
        return pages[:, :, h0:h1].contiguous()

    def insert(self, layer: int, heads: tuple[int, int], block_ids: torch.Tensor, payload: torch.Tensor) -> None:
        cache = self.caches[layer - self.layer_start]
        h0, h1 = heads[0] - self.head_start, heads[1] - self.head_start
        target = cache if (h0 == 0 and h1 == self.num_heads) else cache[:, :, h0:h1]
        target.index_copy_(1, block_ids, payload.to(cache.device, non_blocking=True))


def to_bytes_view(t: torch.Tensor):
    """A zero-copy byte view of a contiguous CPU tensor (any dtype, bf16 included), for ZeroMQ."""
    return t.contiguous().view(torch.uint8).numpy()


def from_buffer(buf, dtype: str, shape: list[int]) -> torch.Tensor:
    return torch.frombuffer(buf, dtype=TORCH_DTYPES[dtype]).view(shape)
