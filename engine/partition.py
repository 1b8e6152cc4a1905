"""How a model is split across ranks: layers over pipeline stages, KV heads over tensor ranks.

Pure functions (no torch), shared by the model (what a rank holds) and kvtransfer's transfer plan
(what a rank must send or receive), so the two cannot disagree.
"""

from __future__ import annotations


def split_evenly(total: int, parts: int, index: int) -> tuple[int, int]:
    """[start, end) of part `index` when `total` items are split into `parts` nearly equal ranges."""
    base, extra = divmod(total, parts)
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)


def stage_layers(num_layers: int, pp_size: int, pp_rank: int,
                 partition: list[int] | tuple[int, ...] | None = None) -> tuple[int, int]:
    """[start, end) of the layers of pipeline stage `pp_rank` (even split unless `partition` given)."""
    if partition is None:
        return split_evenly(num_layers, pp_size, pp_rank)
    if len(partition) != pp_size or sum(partition) != num_layers or min(partition) <= 0:
        raise ValueError(f"pipeline partition {list(partition)} must be {pp_size} positive layer counts "
                         f"summing to {num_layers}")
    start = sum(partition[:pp_rank])
    return start, start + partition[pp_rank]


def check_tp(num_heads: int, num_kv_heads: int, tp_size: int) -> None:
    """A TP size that cannot shard the attention heads is refused here, at start-up."""
    if num_heads % tp_size:
        raise ValueError(f"num_attention_heads = {num_heads} is not divisible by tp_size = {tp_size}")
    check_kv_tp(num_kv_heads, tp_size)


def check_kv_tp(num_kv_heads: int, tp_size: int) -> None:
    if (tp_size % num_kv_heads) if tp_size >= num_kv_heads else (num_kv_heads % tp_size):
        raise ValueError(f"num_key_value_heads = {num_kv_heads} and tp_size = {tp_size}: one must divide "
                         "the other")


def kv_head_range(num_kv_heads: int, tp_size: int, tp_rank: int) -> tuple[int, int]:
    """[start, end) of the global KV heads held by a TP rank.

    With tp_size > num_kv_heads each head is replicated on tp_size / num_kv_heads consecutive ranks.
    """
    if tp_size >= num_kv_heads:
        h = tp_rank * num_kv_heads // tp_size
        return h, h + 1
    n = num_kv_heads // tp_size
    return tp_rank * n, (tp_rank + 1) * n
