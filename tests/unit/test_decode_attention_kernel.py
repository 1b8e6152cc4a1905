"""engine/kernels/decode_attention.c against the torch path it replaces (engine/attention.py + RoPE)."""

import pytest
import torch

from engine import kernels
from engine.attention import AttentionMetadata, paged_attention
from engine.config import RopeScaling
from engine.layers.rotary import RotaryEmbedding

attn = kernels.decode_attention()
needs_kernel = pytest.mark.cpu_kernel("decode_attention")  # skipped without a C compiler, else built


def _case(dtype, lens, H, KVH, D, bs=16, num_blocks=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    B = len(lens)
    cache = torch.randn(2, num_blocks, KVH, bs, D, generator=g).to(dtype)
    # distinct blocks per sequence, in a shuffled order
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables = []
    for n in lens:
        nb = -(-n // bs)
        tables.append([perm.pop() for _ in range(nb)])
    nb = max(len(t) for t in tables)
    bt = torch.tensor([t + [0] * (nb - len(t)) for t in tables], dtype=torch.long)
    pos = torch.tensor([n - 1 for n in lens])
    qkv = torch.randn(B, (H + 2 * KVH) * D, generator=g).to(dtype)
    q = qkv[:, :H * D].view(B, H, D)
    k = qkv[:, H * D:(H + KVH) * D].view(B, KVH, D)
    v = qkv[:, (H + KVH) * D:].view(B, KVH, D)
    meta = AttentionMetadata(slot_blocks=bt[torch.arange(B), pos // bs].contiguous(), slot_offsets=pos % bs,
                             num_decode=B, decode_block_tables=bt)
    lens_t = torch.tensor(lens)
    if min(lens) != nb * bs:
        meta.decode_mask = torch.arange(nb * bs).view(1, nb, 1, 1, bs) < lens_t.view(-1, 1, 1, 1, 1)
    rotary = RotaryEmbedding(D, 4096, 10000.0, RopeScaling(), dtype)
    return cache, q, k, v, pos, meta, lens_t, rotary


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lens,H,KVH,D", [([1], 9, 3, 64), ([200], 9, 3, 64), ([5, 33, 17, 64], 4, 2, 32),
                                          ([300, 7], 8, 8, 128), ([129] * 3, 6, 1, 16)])
def test_fused_decode_attention_equals_the_torch_path(dtype, lens, H, KVH, D):
    """Same cache afterwards, bit for bit (RoPE rounds as torch does); same output within fp32 rounding
    (bf16: within bf16 rounding of the probabilities, which torch's flash kernel rounds and we don't)."""
    cache, q, k, v, pos, meta, lens_t, rotary = _case(dtype, lens, H, KVH, D)
    scale = D ** -0.5
    cos, sin = rotary.lookup(pos)
    ref_cache = cache.clone()
    B = len(lens)
    rq, rk = rotary((cos, sin), q), rotary((cos, sin), k)
    want = paged_attention(rq, rk, v.reshape(B, KVH, D), ref_cache, meta, scale)
    for threads in (1, 2):
        got_cache = cache.clone()
        got = attn(q, k, v, cos.view(B, D), sin.view(B, D), got_cache, meta.slot_blocks, meta.slot_offsets,
                   meta.decode_block_tables, lens_t, scale, threads)
        assert torch.equal(got_cache, ref_cache)
        if dtype == torch.float32:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        else:
            torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


@needs_kernel
@pytest.mark.parametrize("bs", [8, 32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_sizes_other_than_16_and_partial_blocks(bs, dtype):
    """The bf16 path reduces 16 tokens' scores at a time: blocks of 8 (two blocks a vector) and 32 (two
    vectors a block), contexts ending mid-block, one sequence (a task per head) and several."""
    for lens, H, KVH, D in (([45, 3, 77, 16, 17], 9, 3, 64), ([61], 8, 2, 128)):
        cache, q, k, v, pos, meta, lens_t, rotary = _case(dtype, lens, H, KVH, D, bs=bs, num_blocks=128)
        cos, sin = rotary.lookup(pos)
        ref_cache = cache.clone()
        B = len(lens)
        want = paged_attention(rotary((cos, sin), q), rotary((cos, sin), k), v.reshape(B, KVH, D), ref_cache, meta,
                               D ** -0.5)
        got = attn(q, k, v, cos.view(B, D), sin.view(B, D), cache, meta.slot_blocks, meta.slot_offsets,
                   meta.decode_block_tables, lens_t, D ** -0.5, 2)
        assert torch.equal(cache, ref_cache)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)


@needs_kernel
def test_a_long_context_and_large_scores_keep_the_softmax_stable():
    cache, q, k, v, pos, meta, lens_t, rotary = _case(torch.float32, [2000], 2, 1, 64, num_blocks=200)
    q = q * 30  # scores in the hundreds: exp overflows without the max subtracted
    cos, sin = rotary.lookup(pos)
    ref_cache = cache.clone()
    want = paged_attention(rotary((cos, sin), q), rotary((cos, sin), k), v, ref_cache, meta, 0.125)
    got = attn(q, k, v, cos.view(1, 64), sin.view(1, 64), cache, meta.slot_blocks, meta.slot_offsets,
               meta.decode_block_tables, lens_t, 0.125, 2)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@needs_kernel
def test_head_sizes_it_does_not_take_are_refused():
    assert attn.supports(64, torch.bfloat16) and attn.supports(128, torch.float32)
    assert not attn.supports(80 + 4, torch.float32)
    assert not attn.supports(64, torch.float16)


@needs_kernel
def test_bad_strides_raise_before_the_kernel_runs():
    """Real exceptions that name the argument and the strides (an `assert` is gone under `python -O`)."""
    cache, q, k, v, pos, meta, lens, rotary = _case(torch.float32, [5, 9], 4, 2, 16)
    cos, sin = (t.view(2, 16) for t in rotary.lookup(pos))
    rest = (cos, sin, cache, meta.slot_blocks, meta.slot_offsets, meta.decode_block_tables, lens, 0.25, 1)
    heads_last = q.transpose(1, 2).contiguous().transpose(1, 2)  # [B, H, D] with stride 1 between heads
    with pytest.raises(ValueError, match=r"decode_attention: q needs stride 16 in dim 1, got strides \(64, 1, 4\)"):
        attn(heads_last, k, v, *rest)
    with pytest.raises(ValueError, match="k and v must have the same strides"):
        attn(q, k, v.contiguous(), *rest)


@needs_kernel
@pytest.mark.parametrize("isa", ["avx512", "avx2", "generic"])
def test_every_instruction_set_writes_the_same_cache(isa, tmp_path, monkeypatch):
    """decode_attention.c and elementwise.c built for each x86 level this CPU runs (AVX-512 without its
    bf16 conversion instruction, AVX2, plain x86-64): the same RoPE bits in the cache and the same
    rotated rows, the same attention and silu * up within rounding."""
    import ctypes

    import torch.nn.functional as F

    if isa not in kernels.isa_levels():
        pytest.skip(f"this CPU does not run the {isa} level")
    # the shared kernel cache: a level's build is keyed by source, compiler, flags and CPU, so each is built once a run
    lib = ctypes.CDLL(str(kernels._build("decode_attention", kernels._HERE / "decode_attention.c", isa)))
    narrow = kernels.DecodeAttention(lib)
    ew = kernels.Elementwise(ctypes.CDLL(str(kernels._build("elementwise", kernels._HERE / "elementwise.c", isa))))
    for dtype in (torch.float32, torch.bfloat16):
        cache, q, k, v, pos, meta, lens_t, rotary = _case(dtype, [40, 7], 4, 2, 32)
        cos, sin = rotary.lookup(pos)
        args = (cos.view(2, 32), sin.view(2, 32))
        want_cache, got_cache = cache.clone(), cache.clone()
        want = attn(q, k, v, *args, want_cache, meta.slot_blocks, meta.slot_offsets, meta.decode_block_tables,
                    lens_t, 0.2, 2)
        got = narrow(q, k, v, *args, got_cache, meta.slot_blocks, meta.slot_offsets, meta.decode_block_tables,
                     lens_t, 0.2, 2)
        assert torch.equal(got_cache, want_cache)
        torch.testing.assert_close(got.float(), want.float(), rtol=1e-5, atol=1e-5)
        assert torch.equal(ew.rope(q, *args, 2), rotary((cos, sin), q))
        g, u = (torch.randn(3, 64) * 4).to(dtype), torch.randn(3, 64).to(dtype)
        torch.testing.assert_close(ew.silu_mul(g, u, 2).float(), (F.silu(g) * u).float(), rtol=1e-5, atol=1e-5)
