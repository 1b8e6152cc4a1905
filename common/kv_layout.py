"""The KV cache shape of one worker, as it travels: in its registration, in placements, in a prefill
request's decode target and in KV reservations. One schema; kvtransfer.plan.KVLayout subclasses it
with the arithmetic (which layers and heads each rank holds) and its checks. Torch-free."""

from __future__ import annotations

import msgspec


class KVLayoutSpec(msgspec.Struct, frozen=True):
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: str  # "float32" | "bfloat16" | "float16"
    tp: int = 1
    pp: int = 1
    pp_partition: tuple[int, ...] | None = None  # layers per stage, when not split evenly

    def token_bytes(self) -> int:
        """Bytes of one token's KV over every layer and head (K and V)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * ITEMSIZE.get(self.dtype, 4)

    def block_bytes(self) -> int:
        """Bytes of one block's KV over every layer and head (K and V): what shipping it moves."""
        return self.token_bytes() * self.block_size


ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}
