"""Paged attention over ragged batches, in pure torch (one function to swap for a faster kernel).

KV cache of one layer: `[num_blocks, 2, block_size, num_kv_heads, head_dim]` (K at index 0, V at 1), so
one block of one layer (a *page*, the unit that kvtransfer ships) is one contiguous slab.

A step's tokens are laid out decode-first:

    tokens:  [d0 d1 ... d(B-1) | p0 p0 p0 p0 | p1 p1 ... ]
              one per decoding    each prefill sequence's new tokens (a whole prompt or a chunk)

Decodes are attended together through a padded gather of their block tables; each prefill sequence
is attended alone (no padding), against its cached context when it has one (chunked prefill, prefix
hit) or against its own fresh K/V when it starts at position 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class PrefillSpan:
    q_start: int  # row of its first new token in the step's token layout
    q_len: int
    start: int  # position of its first new token (= tokens already computed)
    block_table: torch.Tensor | None  # [num_blocks] long, only when start > 0


@dataclass
class AttentionMetadata:
    slot_blocks: torch.Tensor  # [T] block id of each new token's slot
    slot_offsets: torch.Tensor  # [T] offset inside the block
    num_decode: int = 0
    decode_block_tables: torch.Tensor | None = None  # [B, max_blocks] (padded with block 0)
    decode_mask: torch.Tensor | None = None  # [B, 1, 1, max_blocks*block_size] bool; None: no padding
    decode_len: int = 0  # keys to attend (max context over the decode batch)
    prefills: list[PrefillSpan] = field(default_factory=list)


def write_kv(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> None:
    kv_cache[meta.slot_blocks, 0, meta.slot_offsets] = k
    kv_cache[meta.slot_blocks, 1, meta.slot_offsets] = v


def gather_kv(kv_cache: torch.Tensor, block_table: torch.Tensor, length: int):
    """K, V of one sequence's first `length` tokens: [num_kv_heads, length, head_dim] each."""
    pages = kv_cache[block_table]  # [nb, 2, bs, KVH, D]
    nb, _, bs, kvh, d = pages.shape
    k = pages[:, 0].reshape(nb * bs, kvh, d)[:length].transpose(0, 1)
    v = pages[:, 1].reshape(nb * bs, kvh, d)[:length].transpose(0, 1)
    return k, v


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q [T, H, D], k/v [T, KVH, D] (new tokens) -> [T, H, D]. Writes the new K/V into the cache."""
    write_kv(kv_cache, k, v, meta)
    T, H, D = q.shape
    gqa = H != k.shape[1]
    nd = meta.num_decode
    parts = []
    if nd:
        bt = meta.decode_block_tables  # [B, nb]
        pages = kv_cache[bt]  # [B, nb, 2, bs, KVH, D]
        B, nb, _, bs, kvh, _ = pages.shape
        kd = pages[:, :, 0].reshape(B, nb * bs, kvh, D)[:, :meta.decode_len].transpose(1, 2)
        vd = pages[:, :, 1].reshape(B, nb * bs, kvh, D)[:, :meta.decode_len].transpose(1, 2)
        qd = q[:nd].unsqueeze(2)  # [B, H, 1, D]
        od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=meta.decode_mask, scale=scale,
                                            enable_gqa=gqa)
        parts.append(od.squeeze(2))  # [B, H, D]
    for p in meta.prefills:
        qp = q[p.q_start:p.q_start + p.q_len].transpose(0, 1)  # [H, q_len, D]
        if p.start == 0:
            kp = k[p.q_start:p.q_start + p.q_len].transpose(0, 1)
            vp = v[p.q_start:p.q_start + p.q_len].transpose(0, 1)
            op = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, scale=scale, enable_gqa=gqa)
        else:
            ctx_len = p.start + p.q_len
            kp, vp = gather_kv(kv_cache, p.block_table, ctx_len)
            qpos = torch.arange(p.start, ctx_len, device=q.device).unsqueeze(1)
            mask = torch.arange(ctx_len, device=q.device).unsqueeze(0) <= qpos  # [q_len, ctx_len]
            op = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask, scale=scale, enable_gqa=gqa)
        parts.append(op.transpose(0, 1))  # [q_len, H, D]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
