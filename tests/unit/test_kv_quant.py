"""Quantized KV caches (--kv-cache-dtype int8|fp8_e4m3, engine/kv_quant.py): the round trip's error bounds,
the C kernels' quantization bit for bit torch's, the fused decode kernel against the torch path on every
ISA level this CPU runs, attention reading what the cache holds, and the bytes a block takes."""

import ctypes

import pytest
import torch
from test_decode_attention_kernel import _case

from common.kv_layout import QUANTIZED_KV, KVLayoutSpec
from engine import kernels
from engine.attention import AttentionMetadata, PrefillSpan, paged_attention
from engine.config import KV_CACHE_DTYPES, CacheConfig
from engine.kv_cache import KVCacheSpec, allocate_kv_cache
from engine.kv_quant import STORAGE, cache_format, dequantize, quantize

FORMATS = ["int8", "fp8_e4m3"]
needs_attention = pytest.mark.cpu_kernel("decode_attention")
needs_elementwise = pytest.mark.cpu_kernel("elementwise")


def test_the_option_is_checked_and_its_values_agree_everywhere():
    assert KV_CACHE_DTYPES == ("auto", *QUANTIZED_KV) and tuple(STORAGE) == QUANTIZED_KV
    with pytest.raises(ValueError, match=r"kv_cache_dtype = 'fp8' must be one of \('auto', 'int8', 'fp8_e4m3'\)"):
        CacheConfig(kv_cache_dtype="fp8")


@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip_error_is_within_half_a_code_step(fmt):
    torch.manual_seed(0)
    x = torch.randn(64, 8, 64) * torch.rand(64, 8, 1) * 10  # vectors of many magnitudes
    x[0, 0] = 0  # an all-zero vector: scale 0, codes 0
    x[1, 0, 5] = -x[1, 0].abs().max() * 2  # a negative amax
    rows = quantize(x, fmt)
    assert rows.dtype == STORAGE[fmt] and rows.shape == (64, 8, 68)
    y = dequantize(rows, fmt)
    amax = x.abs().amax(-1, keepdim=True)
    scale = rows[..., 64:].contiguous().view(torch.float32)
    assert torch.equal(scale, amax / (127 if fmt == "int8" else 448))
    assert torch.equal(y[0, 0], torch.zeros(64))
    # (1 + 1e-5): x / scale is rounded before it is, so a tie may come out a hair past half a step
    if fmt == "int8":  # a uniform step of scale: off by half a step at most
        assert ((y - x).abs() <= scale / 2 * (1 + 1e-5)).all()
        assert rows[..., :64].abs().max() == 127
    else:  # 3 mantissa bits: half a step is 1/16 of the value's binade, or 2^-10 (subnormals), times scale
        half_step = torch.maximum(x.abs() / 16, scale * 2.0 ** -10)
        assert ((y - x).abs() <= half_step * (1 + 1e-5)).all()
    assert ((y - x).abs() <= amax * (0.5 / 127 if fmt == "int8" else 16 / 448) * (1 + 1e-5)).all()
    assert torch.equal(dequantize(quantize(y, fmt), fmt), y)  # what the cache holds quantizes to itself


def test_bf16_vectors_dequantize_to_bf16():
    x = torch.randn(3, 64).to(torch.bfloat16)
    y = dequantize(quantize(x, "int8"), "int8", torch.bfloat16)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, dequantize(quantize(x.float(), "int8"), "int8").to(torch.bfloat16))


def _grid(fmt: str) -> torch.Tensor:
    """[n, 1, 64] vectors whose amax is the largest code (scale 1): every code, every midpoint between two
    codes (the ties), and a fine grid; then the same scaled far down (subnormal codes and scales)."""
    top = 127.0 if fmt == "int8" else 448.0
    codes = torch.arange(128.0) if fmt == "int8" else torch.arange(127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    values = torch.cat([codes, (codes[1:] + codes[:-1]) / 2, torch.linspace(-top, top, 63 * 64)])
    values = torch.cat([values, -values])
    values = torch.cat([values, torch.zeros(-values.numel() % 63)]).view(-1, 63)
    x = torch.cat([torch.full((values.shape[0], 1), top), values], 1)
    return torch.cat([x, x * 1e-3, x * 3e-7]).unsqueeze(1)


def _slots(n: int, bs: int):
    return torch.arange(n) // bs, torch.arange(n) % bs


@needs_elementwise
@pytest.mark.parametrize("fmt", FORMATS)
def test_the_c_write_quantizes_bit_for_bit_as_torch(fmt):
    """elementwise.c's write_kv into a quantized cache: ties, subnormal codes, fp32 and bf16 inputs, rows
    strided as a prefill slices k and v from the projection, one thread and two."""
    ew = kernels.elementwise()
    x = _grid(fmt)
    n, bs = x.shape[0], 16
    blocks, offsets = _slots(n, bs)
    for dtype in (torch.float32, torch.bfloat16):
        xs = x.to(dtype)
        for threads in (1, 2):
            got = torch.zeros(2, n // bs + 1, 1, bs, 68, dtype=STORAGE[fmt])
            want = got.clone()
            assert ew.write_kv(xs, -xs, got, blocks, offsets, threads)
            want[0][blocks, :, offsets] = quantize(xs, fmt)
            want[1][blocks, :, offsets] = quantize(-xs, fmt)
            assert torch.equal(got, want)
    g = torch.Generator().manual_seed(1)
    kv = torch.randn(30, 4 * 2 * 32, generator=g)  # [T, (H + 2 KVH) * D]: k and v are strided slices
    k, v = kv[:, 64:128].view(30, 2, 32), kv[:, 128:192].view(30, 2, 32)
    blocks, offsets = torch.randperm(64, generator=g)[:30].div(8, rounding_mode="floor"), torch.arange(30) % 8
    got = torch.zeros(2, 8, 2, 8, 36, dtype=STORAGE[fmt])
    want = got.clone()
    assert ew.write_kv(k, v, got, blocks, offsets, 1)
    want[0][blocks, :, offsets], want[1][blocks, :, offsets] = quantize(k, fmt), quantize(v, fmt)
    assert torch.equal(got, want)


def _quantized_case(fmt, dtype, lens, H, KVH, D, bs=16, num_blocks=64):
    cache, q, k, v, pos, meta, lens_t, rotary = _case(dtype, lens, H, KVH, D, bs=bs, num_blocks=num_blocks)
    # magnitudes spread over 6 decades: every fp8 code comes up, subnormal ones included
    spread = 10 ** (-6 * torch.rand(cache.shape, generator=torch.Generator().manual_seed(7)))
    return quantize(cache * spread, fmt), q, k, v, pos, meta, lens_t, rotary


def _check_decode(attn, fmt, dtype, lens, H, KVH, D, bs=16, threads=(1, 2)):
    """The fused kernel against RoPE + paged_attention (the torch path, which dequantizes what it gathers):
    the same cache bit for bit; the output within fp32 rounding (bf16: within bf16 rounding)."""
    cache, q, k, v, pos, meta, lens_t, rotary = _quantized_case(fmt, dtype, lens, H, KVH, D, bs=bs, num_blocks=128)
    assert cache_format(cache) == fmt
    cos, sin = rotary.lookup(pos)
    B = len(lens)
    ref_cache = cache.clone()
    want = paged_attention(rotary((cos, sin), q), rotary((cos, sin), k), v.reshape(B, KVH, D), ref_cache, meta,
                           D ** -0.5)
    for n in threads:
        got_cache = cache.clone()
        got = attn(q, k, v, cos.view(B, D), sin.view(B, D), got_cache, meta.slot_blocks, meta.slot_offsets,
                   meta.decode_block_tables, lens_t, D ** -0.5, n)
        assert torch.equal(got_cache, ref_cache)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)


@needs_attention
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lens,H,KVH,D", [([1], 9, 3, 64), ([200], 9, 3, 64), ([5, 33, 17, 64], 4, 2, 32),
                                          ([300, 7], 8, 8, 128), ([129] * 3, 6, 1, 16)])
def test_fused_decode_attention_on_a_quantized_cache_equals_the_torch_path(fmt, dtype, lens, H, KVH, D):
    _check_decode(kernels.decode_attention(), fmt, dtype, lens, H, KVH, D)


@needs_attention
@pytest.mark.parametrize("flush", [False, True])
def test_fp8_subnormal_codes_read_right_even_with_denormals_flushed(flush):
    """One token: the output is its V row as the cache holds it. A row of scale 1 (amax 448) holding every
    subnormal code: the AVX2 path converts fp8 by way of fp16, whose subnormals F16C reads in any mode."""
    cache, q, k, v, pos, meta, lens_t, rotary = _case(torch.float32, [1], 1, 1, 64)
    sub = torch.arange(1, 8) * 2.0 ** -9  # e4m3's subnormals
    row = torch.cat([torch.tensor([448.0]), sub, -sub, torch.linspace(-400, 400, 49)])
    v[0, 0] = row  # (a view of the projection, as k is)
    cache = quantize(cache, "fp8_e4m3")
    cos, sin = rotary.lookup(pos)
    if flush and not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush denormals")
    try:
        out = kernels.decode_attention()(q, k, v, cos.view(1, 64), sin.view(1, 64), cache, meta.slot_blocks,
                                         meta.slot_offsets, meta.decode_block_tables, lens_t, 0.125, 1)
    finally:
        torch.set_flush_denormal(False)
    want = dequantize(quantize(row, "fp8_e4m3"), "fp8_e4m3")
    assert torch.equal(want[1:15], torch.cat([sub, -sub]))
    torch.testing.assert_close(out[0, 0], want, rtol=1e-6, atol=1e-7)


@needs_attention
@pytest.mark.parametrize("isa", ["avx512", "avx2", "generic"])
def test_every_instruction_set_reads_a_quantized_cache_alike(isa, tmp_path, monkeypatch):
    """decode_attention.c and elementwise.c built for each x86 level this CPU runs: the AVX2 path
    (attend_quant_avx2) and the vector-extension one (attend_quant: plain x86-64 here, AVX-512 elsewhere)."""
    if isa not in kernels.isa_levels():
        pytest.skip(f"this CPU does not run the {isa} level")
    # the shared kernel cache: a level's build is keyed by source, compiler, flags and CPU, so each is built once a run
    attn = kernels.DecodeAttention(ctypes.CDLL(str(kernels._build("decode_attention",
                                                                  kernels._HERE / "decode_attention.c", isa))))
    ew = kernels.Elementwise(ctypes.CDLL(str(kernels._build("elementwise", kernels._HERE / "elementwise.c", isa))))
    for fmt in FORMATS:
        for dtype in (torch.float32, torch.bfloat16):
            _check_decode(attn, fmt, dtype, [40, 7, 100], 6, 2, 64, bs=8, threads=(2,))
        x = _grid(fmt)
        blocks, offsets = _slots(x.shape[0], 16)
        got = torch.zeros(2, x.shape[0] // 16 + 1, 1, 16, 68, dtype=STORAGE[fmt])
        assert ew.write_kv(x, x, got, blocks, offsets, 2)
        assert torch.equal(got[0][blocks, :, offsets], quantize(x, fmt))


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_fresh_prefill_attends_to_what_the_cache_holds(fmt, monkeypatch):
    """Prompt tokens attended in one fresh prefill, and the same tokens as a cached first half and a
    second chunk (a prefix hit), see the same K and V (dequantized) and give the same output; both equal
    plain attention over the dequantized K and V. Torch's write and the C kernel's alike."""
    torch.manual_seed(3)
    T, H, KVH, D, bs = 12, 4, 2, 16, 4
    q, k, v = torch.randn(T, H, D), torch.randn(T, KVH, D), torch.randn(T, KVH, D)
    table = torch.tensor([5, 2, 7])
    blocks, offsets = table[torch.arange(T) // bs], torch.arange(T) % bs
    kq, vq = (dequantize(quantize(t, fmt), fmt) for t in (k, v))
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    want = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), kq.transpose(0, 1), vq.transpose(0, 1), attn_mask=causal, scale=0.3, enable_gqa=True)
    for kernel in ("c", "torch"):
        if kernel == "torch":
            monkeypatch.setattr("engine.attention.elementwise", lambda: None)
        cache = torch.zeros(2, 8, KVH, bs, D + 4, dtype=STORAGE[fmt])
        fresh = paged_attention(q, k, v, cache, AttentionMetadata(blocks, offsets, prefills=[
            PrefillSpan(0, T, 0, None)], prefill_groups=[(T, [0])]), 0.3)
        torch.testing.assert_close(fresh, want.transpose(0, 1), rtol=1e-5, atol=1e-5)
        cache.zero_()
        h = 8
        paged_attention(q[:h], k[:h], v[:h], cache, AttentionMetadata(blocks[:h], offsets[:h], prefills=[
            PrefillSpan(0, h, 0, None)], prefill_groups=[(h, [0])]), 0.3)
        chunk = paged_attention(q[h:], k[h:], v[h:], cache, AttentionMetadata(blocks[h:], offsets[h:], prefills=[
            PrefillSpan(0, T - h, h, table)]), 0.3)
        torch.testing.assert_close(chunk, fresh[h:], rtol=1e-5, atol=1e-5)


def test_blocks_and_page_bytes_count_the_scales():
    fp32 = KVCacheSpec(num_layers=30, num_kv_heads=3, head_dim=64, block_size=16, dtype=torch.float32)
    int8 = KVCacheSpec(30, 3, 64, 16, torch.float32, kv_cache_dtype="int8")
    fp8 = KVCacheSpec(30, 3, 64, 16, torch.bfloat16, kv_cache_dtype="fp8_e4m3")
    assert fp32.page_bytes == 2 * 16 * 3 * 64 * 4
    assert int8.page_bytes == fp8.page_bytes == 2 * 16 * 3 * (64 + 4)
    budget = 1 << 30
    ratio = (budget // int8.block_bytes) / (budget // fp32.block_bytes)
    assert 3.75 < ratio < 3.77  # 256 bytes a row against 68
    caches = allocate_kv_cache(KVCacheSpec(2, 3, 64, 16, torch.float32, kv_cache_dtype="fp8_e4m3"), 5,
                               torch.device("cpu"))
    assert [(c.dtype, tuple(c.shape)) for c in caches] == [(torch.uint8, (2, 5, 3, 16, 68))] * 2
    assert caches[0].numel() * 2 == 5 * KVCacheSpec(2, 3, 64, 16, torch.float32, kv_cache_dtype="fp8_e4m3").block_bytes
    # the wire's layout counts the same bytes
    for spec, dtype in ((fp32, "float32"), (int8, "float32"), (fp8, "bfloat16")):
        layout = KVLayoutSpec(30, 3, 64, 16, dtype, kv_cache_dtype=spec.kv_cache_dtype)
        assert layout.block_bytes() == spec.block_bytes
