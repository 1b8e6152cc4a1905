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
    dtype: str  # the model's: "float32" | "bfloat16" | "float16"
    tp: int = 1
    pp: int = 1
    pp_partition: tuple[int, ...] | None = None  # layers per stage, when not split evenly
    # what the cache stores (--kv-cache-dtype): "auto" = `dtype`; "int8" | "fp8_e4m3" = quantized rows of
    # head_dim one-byte codes and an fp32 scale (engine/kv_quant.py)
    kv_cache_dtype: str = "auto"
    # a digest of the model's config (engine ModelConfig.identity: every field but the path, LongRoPE's
    # factor set included): KV of one model is no use to another; "" = not told (an older worker)
    model_id: str = ""

    @property
    def page_dtype(self) -> str:
        """The dtype pages are stored and shipped in: `dtype`, or the quantized format."""
        return self.dtype if self.kv_cache_dtype == "auto" else self.kv_cache_dtype

    @property
    def row_width(self) -> int:
        """Elements of one (token, KV head) row of a page: head_dim, or quantized head_dim + 4 one-byte
        elements (the codes, then the fp32 scale's bytes)."""
        return self.head_dim if self.kv_cache_dtype == "auto" else self.head_dim + SCALE_BYTES

    def token_bytes(self) -> int:
        """Bytes of one token's KV over every layer and head (K and V, with their scales)."""
        return 2 * self.num_layers * self.num_kv_heads * self.row_width * ITEMSIZE.get(self.page_dtype, 4)

    def block_bytes(self) -> int:
        """Bytes of one block's KV over every layer and head (K and V): what shipping it moves."""
        return self.token_bytes() * self.block_size


ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1, "fp8_e4m3": 1}  # of a page's elements
QUANTIZED_KV = ("int8", "fp8_e4m3")  # engine/config.py's KV_CACHE_DTYPES but "auto"
SCALE_BYTES = 4
