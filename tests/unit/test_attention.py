"""Decode attention against plain math, on both CPU paths (block-wise matmuls; torch's flash kernel for
half types where the CPU has half-precision arithmetic), and batch invariance (within rounding) on each."""

import pytest
import torch

import engine.attention as attention
from engine.attention import AttentionMetadata

BS, KVH, H, D = 4, 2, 6, 16


def batch(lens: list[int], dtype: torch.dtype, seed: int = 0):
    """A KV cache holding one sequence per length, its metadata as the model runner builds it, and q."""
    g = torch.Generator().manual_seed(seed)
    nb = -(-max(lens) // BS)
    cache = torch.randn(2, 1 + len(lens) * nb, KVH, BS, D, generator=g).to(dtype)
    tables = torch.tensor([[1 + i * nb + j for j in range(nb)] for i in range(len(lens))])
    meta = AttentionMetadata(slot_blocks=torch.empty(0, dtype=torch.long),
                             slot_offsets=torch.empty(0, dtype=torch.long), num_decode=len(lens),
                             decode_block_tables=tables)
    if min(lens) != nb * BS:
        meta.decode_mask = torch.arange(nb * BS).view(1, nb, 1, 1, BS) < torch.tensor(lens).view(-1, 1, 1, 1, 1)
    q = torch.randn(len(lens), H, D, generator=g).to(dtype)
    return q, cache, tables, meta


def reference(q, cache, tables, lens, scale):
    out = []
    for i, n in enumerate(lens):
        k = cache[0][tables[i]].transpose(0, 1).reshape(KVH, -1, D)[:, :n].double()  # [KVH, n, D]
        v = cache[1][tables[i]].transpose(0, 1).reshape(KVH, -1, D)[:, :n].double()
        qi = q[i].double().view(KVH, H // KVH, D)
        p = torch.softmax(qi @ k.transpose(-1, -2) * scale, dim=-1)
        out.append((p @ v).reshape(H, D))
    return torch.stack(out)


PATHS = {"matmuls": lambda d, dev: True, "flash": lambda d, dev: False}


@pytest.fixture(params=[(torch.float32, "matmuls"), (torch.bfloat16, "matmuls"), (torch.bfloat16, "flash")],
                ids=["fp32", "bf16-matmuls", "bf16-flash"])
def path(request, monkeypatch):
    """(dtype, name): `needs_fp32` forced, so each path runs whatever this CPU has."""
    dtype, name = request.param
    if dtype != torch.float32:
        monkeypatch.setattr(attention, "needs_fp32", PATHS[name])
    return dtype, name


@pytest.mark.parametrize("lens", [[1, 5, 13, 8], [8, 8]], ids=["ragged", "full-blocks"])
def test_decode_attention_matches_plain_math(path, lens):
    # ragged: padded slots masked, one sequence ending on a block boundary; full blocks: no mask at all
    dtype, name = path
    q, cache, tables, meta = batch(lens, dtype)
    got = attention._decode_attention(q, cache, meta, 0.25).double()
    want = reference(q, cache, tables, lens, 0.25)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert (got - want).abs().max().item() < tol, name


def test_decode_attention_does_not_depend_on_the_batch(path):
    dtype, name = path
    q, cache, tables, meta = batch([7, 21, 3], dtype, seed=1)
    together = attention._decode_attention(q, cache, meta, 0.25)
    for i, n in enumerate([7, 21, 3]):
        nb = -(-n // BS)
        alone_meta = AttentionMetadata(slot_blocks=meta.slot_blocks, slot_offsets=meta.slot_offsets, num_decode=1,
                                       decode_block_tables=tables[i:i + 1, :nb])
        if n != nb * BS:
            alone_meta.decode_mask = torch.arange(nb * BS).view(1, nb, 1, 1, BS) < n
        alone = attention._decode_attention(q[i:i + 1], cache, alone_meta, 0.25)
        # not bitwise (softmax and sums reduce over the padded length in vector chunks), within rounding
        diff = (alone[0].double() - together[i].double()).abs().max().item()
        assert diff <= (1e-6 if dtype == torch.float32 else 8e-3), (name, i, diff)


@pytest.mark.parametrize("layout", ["back-to-back", "apart"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fresh_prefills_of_one_length_attend_each_alone(layout, dtype):
    """Prompts of equal length go through one batched SDPA call: as views when they lie back to back
    in the step (the usual layout), gathered when something lies between them; either way each prompt
    gets exactly what it gets alone. The new K/V land in their slots (the CPU kernel or index_put)."""
    g = torch.Generator().manual_seed(3)
    L = 5
    starts = [0, L, 2 * L] if layout == "back-to-back" else [0, L + 2, 2 * L + 4]
    T = starts[-1] + L
    q = torch.randn(T, H, D, generator=g).to(dtype)
    k, v = (torch.randn(T, KVH, D, generator=g).to(dtype) for _ in range(2))
    cache = torch.zeros(2, 1 + T // BS + 1, KVH, BS, D, dtype=dtype)
    slots = torch.arange(BS, BS + T)  # from block 1 on
    meta = AttentionMetadata(slot_blocks=slots // BS, slot_offsets=slots % BS, prefill_groups=[(L, starts)])
    out = attention.paged_attention(q, k, v, cache, meta, 0.3)
    for s in starts:
        rows = slice(s, s + L)
        alone = torch.nn.functional.scaled_dot_product_attention(
            q[rows].transpose(0, 1).unsqueeze(0), k[rows].transpose(0, 1).unsqueeze(0),
            v[rows].transpose(0, 1).unsqueeze(0), is_causal=True, scale=0.3, enable_gqa=True)[0].transpose(0, 1)
        torch.testing.assert_close(out[rows], alone, rtol=1e-5, atol=1e-5)
    for t in range(T):  # every token's K and V in its slot
        assert torch.equal(cache[0, slots[t] // BS, :, slots[t] % BS], k[t])
        assert torch.equal(cache[1, slots[t] // BS, :, slots[t] % BS], v[t])
