"""Paged attention over ragged batches, in pure torch (one function to swap for a faster kernel).

KV cache of one layer: `[2, num_blocks, num_kv_heads, block_size, head_dim]` (K cache, V cache). One
block of one layer (a *page*, the unit kvtransfer ships) is two contiguous slabs, `cache[0, b]` and
`cache[1, b]`; inside each, a KV head's tokens are contiguous, so a TP head range is contiguous too.
K-outer (as vLLM lays it out) lets decode gather a batch's blocks with one `index_select` per K/V,
already in the layout the matmuls want.

A step's tokens are laid out decode-first:

    tokens:  [d0 d1 ... d(B-1) | p0 p0 p0 p0 | p1 p1 ... ]
              one per decoding    each prefill sequence's new tokens (a whole prompt or a chunk)

Decodes are attended together, block by block (see `_decode_attention`); prefill sequences that
start at position 0 are attended against their own fresh K/V (equal lengths batched together), and
those with cached context (chunked prefill, prefix hit) against the gathered context.

A quantized cache (engine/kv_quant.py: rows of head_dim one-byte codes and an fp32 scale) keeps this
layout with rows of head_dim + 4 bytes, so a page's scales sit inside its slabs. Every attention
then reads K and V as the cache holds them, dequantized: a fresh prefill too, which reads its new
tokens' rows back after writing them. A prefix hit, a later chunk, a recomputed preemption or a
decode worker that received the pages reads exactly the numbers the run that computed them attended to.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from engine.kernels import decode_attention, elementwise
from engine.kv_quant import cache_format, dequantize, quantize
from engine.layers.quantization import needs_fp32


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
    decode_block_tables: torch.Tensor | None = None  # [B, nb] (padded with block 0)
    decode_mask: torch.Tensor | None = None  # [B, nb, 1, 1, bs] bool, True = attend; None: no padding
    decode_lens: torch.Tensor | None = None  # [B] long: each decoding sequence's context, its new token included
    prefills: list[PrefillSpan] = field(default_factory=list)
    # fresh prefills grouped by length: (q_len, [q_start, ...]) -> one batched SDPA call each
    prefill_groups: list[tuple[int, list[int]]] = field(default_factory=list)


def write_kv(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> None:
    # on CPU one copy (or one row's quantization) per token and head (a prefill's index_put is 2-4x slower)
    if kv_cache.device.type == "cpu" and (kernels := elementwise()) is not None and \
            kernels.write_kv(k, v, kv_cache, meta.slot_blocks, meta.slot_offsets, torch.get_num_threads()):
        return
    if (fmt := cache_format(kv_cache)) is not None:
        k, v = quantize(k, fmt), quantize(v, fmt)
    # advanced indices around a slice: the indexed shape is [T, KVH, row], matching k and v
    kv_cache[0][meta.slot_blocks, :, meta.slot_offsets] = k
    kv_cache[1][meta.slot_blocks, :, meta.slot_offsets] = v


def read_kv(kv_cache: torch.Tensor, meta: AttentionMetadata, dtype: torch.dtype):
    """The step's new tokens' K, V as a quantized cache holds them: [T, KVH, D] each, in `dtype`."""
    fmt = cache_format(kv_cache)
    return tuple(dequantize(kv_cache[i][meta.slot_blocks, :, meta.slot_offsets], fmt, dtype) for i in (0, 1))


def gather_kv(kv_cache: torch.Tensor, block_table: torch.Tensor, length: int, dtype: torch.dtype):
    """K, V of one sequence's first `length` tokens: [num_kv_heads, length, head_dim] each (a quantized
    cache's dequantized to `dtype`)."""
    pages = kv_cache.index_select(1, block_table)  # [2, nb, KVH, bs, row]
    _, nb, kvh, bs, row = pages.shape
    kv = pages.transpose(1, 2).reshape(2, kvh, nb * bs, row)[:, :, :length]
    if (fmt := cache_format(kv_cache)) is not None:
        kv = dequantize(kv, fmt, dtype)
    return kv[0], kv[1]


def fused_decode_kernel(dtype: torch.dtype, device: torch.device, head_dim: int, kv_cache: torch.Tensor):
    """engine/kernels' decode attention (RoPE + cache write + paged attention in one call) where it
    applies: CPU, fp32 or bf16, a head size it takes, a cache of that dtype or a quantized one, and the
    kernel built here. Else None."""
    kernel = decode_attention() if device.type == "cpu" else None
    return kernel if kernel is not None and kernel.supports(head_dim, dtype, cache_format(kv_cache)) else None


def fused_decode_attention(kernel, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope, kv_cache: torch.Tensor,
                           meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """A step of decodes only: q [B, H, D], k/v [B, KVH, D] *before* RoPE (rows may be slices of the
    fused projection) -> [B, H, D]; rotates q and k, writes k/v into the cache and attends, in one call.
    The same results as RoPE + `paged_attention` (the cache bit for bit; tests/unit/
    test_decode_attention_kernel.py)."""
    cos, sin = rope
    B, _, D = q.shape
    return kernel(q, k, v, cos.view(B, D), sin.view(B, D), kv_cache, meta.slot_blocks, meta.slot_offsets,
                  meta.decode_block_tables, meta.decode_lens, scale, torch.get_num_threads())


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q [T, H, D], k/v [T, KVH, D] (new tokens) -> [T, H, D]. Writes the new K/V into the cache."""
    write_kv(kv_cache, k, v, meta)
    T, H, D = q.shape
    gqa = H != k.shape[1]
    nd = meta.num_decode
    if nd == T:
        return _decode_attention(q, kv_cache, meta, scale)
    if meta.prefill_groups and cache_format(kv_cache) is not None:
        k, v = read_kv(kv_cache, meta, q.dtype)  # fresh prefills attend to what the cache holds
    out = torch.empty_like(q)
    if nd:
        out[:nd] = _decode_attention(q[:nd], kv_cache, meta, scale)
    for q_len, starts in meta.prefill_groups:
        # 4-D inputs: torch's CPU flash kernel takes only those (3-D falls back to the math path)
        n = len(starts)
        if n == 1 or starts == list(range(starts[0], starts[0] + n * q_len, q_len)):
            # one prompt, or prompts back to back (the usual layout): views, no gather
            rows = slice(starts[0], starts[0] + n * q_len)
            qp, kp, vp = (t[rows].unflatten(0, (n, q_len)).transpose(1, 2) for t in (q, k, v))  # [n, heads, L, D]
        else:
            rows = torch.tensor([list(range(s, s + q_len)) for s in starts], device=q.device)  # [n, L]
            qp, kp, vp = (t[rows].transpose(1, 2) for t in (q, k, v))  # [n, heads, L, D]
        op = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, scale=scale, enable_gqa=gqa)
        res = op.transpose(1, 2)  # [n, L, heads, D]
        if isinstance(rows, slice):
            out[rows] = res.flatten(0, 1)
        else:
            out[rows] = res
    for p in meta.prefills:
        if p.start == 0:
            continue  # done above
        qp = q[p.q_start:p.q_start + p.q_len].transpose(0, 1).unsqueeze(0)  # [1, H, q_len, D]
        ctx_len = p.start + p.q_len
        kp, vp = gather_kv(kv_cache, p.block_table, ctx_len, q.dtype)
        qpos = torch.arange(p.start, ctx_len, device=q.device).unsqueeze(1)
        mask = torch.arange(ctx_len, device=q.device).unsqueeze(0) <= qpos  # [q_len, ctx_len]
        op = F.scaled_dot_product_attention(qp, kp.unsqueeze(0), vp.unsqueeze(0), attn_mask=mask, scale=scale,
                                            enable_gqa=gqa)[0]
        out[p.q_start:p.q_start + p.q_len] = op.transpose(0, 1)
    return out


def _decode_attention(q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
                      scale: float) -> torch.Tensor:
    """One query per sequence, attended block by block: q [B, H, D] -> [B, H, D].

    K and V are gathered once each, straight into `[B, nb, KVH, bs, D]` (contiguous), and used
    without re-layout: scores per block are one batched matmul over (B, nb, KVH), softmax runs over
    all blocks' scores together, and the per-block outputs are summed.

    In fp32 (and half types computed in fp32) plain matmuls; with native half-precision arithmetic on
    CPU (AVX-512 bf16, AMX), `_decode_sdpa`.
    """
    B, H, D = q.shape
    bt = meta.decode_block_tables  # [B, nb]
    nb = bt.shape[1]
    flat = bt.view(-1)
    k = kv_cache[0].index_select(0, flat).view(B, nb, *kv_cache.shape[2:])  # [B, nb, KVH, bs, D]
    v = kv_cache[1].index_select(0, flat).view(B, nb, *kv_cache.shape[2:])
    if (fmt := cache_format(kv_cache)) is not None:  # rows of D + 4 bytes
        k, v = dequantize(k, fmt, q.dtype), dequantize(v, fmt, q.dtype)
    out_dtype = q.dtype
    if q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16):
        if not needs_fp32(q.dtype, q.device):
            return _decode_sdpa(q, k, v, meta, scale)
        q, k, v = q.float(), k.float(), v.float()  # torch's half bmm without half arithmetic: a per-matrix loop
    kvh, bs = k.shape[2], k.shape[3]
    g = H // kvh
    qg = q.view(B, 1, kvh, g, D)
    scores = torch.matmul(qg, k.transpose(-1, -2)).float() * scale  # [B, nb, KVH, G, bs]
    if meta.decode_mask is not None:
        scores = scores.masked_fill(~meta.decode_mask, float("-inf"))
    scores = scores.permute(0, 2, 3, 1, 4).reshape(B, kvh, g, nb * bs)
    probs = torch.softmax(scores, dim=-1).to(q.dtype).view(B, kvh, g, nb, bs).permute(0, 3, 1, 2, 4)
    out = torch.matmul(probs, v).sum(dim=1)  # [B, KVH, G, D]
    return out.reshape(B, H, D).to(out_dtype)


def _decode_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata,
                 scale: float) -> torch.Tensor:
    """Decode attention through torch's CPU flash kernel (fp32 softmax and sums), K/V [B, nb, KVH, bs, D]
    re-laid out to [B, KVH, nb * bs, D]. Measured on a 2-core AMX CPU in bf16 (SmolLM2's heads, 200-600
    tokens of context): 2x the block-wise matmuls at 1-4 sequences, 1.3x at 8, equal at 32; in fp32 it
    is not faster, so fp32 keeps the matmuls. Padding blocks are masked."""
    B, H, D = q.shape
    nb, kvh, bs = k.shape[1], k.shape[2], k.shape[3]
    k = k.transpose(1, 2).reshape(B, kvh, nb * bs, D)
    v = v.transpose(1, 2).reshape(B, kvh, nb * bs, D)
    mask = None if meta.decode_mask is None else meta.decode_mask.view(B, 1, 1, nb * bs)
    out = F.scaled_dot_product_attention(q.view(B, H, 1, D), k, v, attn_mask=mask, scale=scale,
                                         enable_gqa=kvh != H)
    return out.view(B, H, D)
