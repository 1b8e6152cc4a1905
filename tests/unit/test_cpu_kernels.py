"""The hand-written CPU kernels (engine/kernels), against torch on the same inputs."""

import shutil

import pytest
import torch
import torch.nn.functional as F

from engine import kernels
from engine.layers import quantization
from engine.layers.linear import ColumnParallelLinear
from engine.layers.quantization import Int8WeightOnly

int8_linear = kernels.int8_linear()
needs_kernel = pytest.mark.cpu_kernel("int8_linear")  # skipped without a C compiler, else built


@needs_kernel
@pytest.mark.parametrize("M,K,N", [(1, 576, 1728), (3, 1536, 576), (16, 64, 96), (5, 577, 13), (2, 5, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_int8_linear_equals_the_dequantized_product(M, K, N, dtype, with_bias):
    """K not a multiple of the k block (padding), N not a multiple of the row group, 1-16 rows (whole
    and partial row blocks), one thread or two."""
    torch.manual_seed(M * 1000 + K + N)
    x = torch.randn(M, K).to(dtype)
    w = torch.randint(-127, 128, (N, K), dtype=torch.int8)
    packed = int8_linear.pack(w)
    assert torch.equal(int8_linear.unpack(packed, N, K), w)
    scale = torch.rand(N) * 0.01 + 1e-3
    bias = torch.randn(N) if with_bias else None
    want = (x.float() @ w.float().T) * scale + (bias if with_bias else 0)
    for threads in (1, 2):
        got = int8_linear(x, packed, N, scale, bias, threads)
        assert got.dtype == dtype and got.shape == (M, N)
        if dtype == torch.float32:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
        else:  # fp32 sums rounded once to bf16: within one bf16 step of the fp32 result
            assert ((got.float() - want).abs() <= want.abs() * 2 ** -8 + 1e-3).all()


@needs_kernel
@pytest.mark.parametrize("isa", ["avx512", "avx2", "generic"])
def test_every_instruction_set_computes_the_same(isa, tmp_path, monkeypatch):
    """The AVX-512, AVX2 and plain-C paths, built for each x86 level this CPU runs."""
    import ctypes

    if isa not in kernels.isa_levels():
        pytest.skip(f"this CPU does not run the {isa} level")
    # the shared kernel cache: a level's build is keyed by source, compiler, flags and CPU, so each is built once a run
    lib = kernels.Int8Linear(ctypes.CDLL(str(kernels._build("int8_linear", kernels._HERE / "int8_linear.c", isa))))
    torch.manual_seed(1)
    for M, K, N in [(1, 576, 100), (3, 77, 9), (16, 64, 96)]:
        x = torch.randn(M, K)
        w = torch.randint(-127, 128, (N, K), dtype=torch.int8)
        scale, bias = torch.rand(N) * 0.01, torch.randn(N)
        got = lib(x, lib.pack(w), N, scale, bias, 2)
        torch.testing.assert_close(got, (x @ w.float().T) * scale + bias, rtol=1e-5, atol=1e-4)


@needs_kernel
def test_bf16_rounding_is_to_nearest_even_like_torch():
    """x = 1 and w = 1 make y = scale exactly in fp32; scales whose low 16 bits are 0x8000 are halfway
    between two bf16 values (ties go to the even one), the others on either side."""
    torch.manual_seed(0)
    bits = torch.randint(0x3C000000, 0x42000000, (256,), dtype=torch.int32)
    bits[:128] = (bits[:128] & ~0xFFFF) | 0x8000
    scale = bits.view(torch.float32)
    x = torch.ones(1, 1, dtype=torch.bfloat16)
    w = int8_linear.pack(torch.ones(256, 1, dtype=torch.int8))
    got = int8_linear(x, w, 256, scale, None, 1)
    assert torch.equal(got[0], scale.to(torch.bfloat16))


def _int8_layer(dtype):
    torch.manual_seed(0)
    layer = ColumnParallelLinear(64, 96, bias=True, dtype=dtype)
    layer.weight.data.normal_()
    layer.bias.data.normal_()
    layer.linear_method = Int8WeightOnly()
    layer.linear_method.process_weights_after_loading(layer)
    return layer


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [4, 40])
def test_an_int8_layer_stores_the_packed_weight_and_agrees_with_torch(dtype, rows, monkeypatch):
    """Small batches go through the kernel, large ones dequantize the packed weight; both equal torch's
    product of the dequantized weight, as does the torch-only layer where nothing can be built."""
    layer = _int8_layer(dtype)
    assert layer.int8_packed and layer.weight.dim() == 4
    x = torch.randn(rows, 64).to(dtype)
    calls = []
    real = quantization._int8_kernel()

    class Spy:
        def __call__(self, *a):
            calls.append(1)
            return real(*a)

    spy = Spy()
    monkeypatch.setattr(quantization, "_int8_kernel", lambda: spy)
    got = layer(x)
    assert calls == ([1] if rows <= Int8WeightOnly.max_kernel_rows else [])
    deq = Int8WeightOnly.int8_rows(layer).float() * layer.weight_scale.float()[:, None]
    want = F.linear(x.float(), deq, layer.bias.float())
    assert got.dtype == dtype
    assert torch.allclose(got.float(), want, rtol=1e-2, atol=5e-2)
    monkeypatch.setattr(quantization, "_int8_kernel", lambda: None)  # nothing built: [out, in] weights, torch's kernels
    plain = _int8_layer(dtype)
    assert not plain.int8_packed and plain.weight.shape == (96, 64)
    assert torch.equal(Int8WeightOnly.int8_rows(plain), Int8WeightOnly.int8_rows(layer))
    assert torch.allclose(plain(x).float(), want, rtol=1e-2, atol=5e-2)


def test_kernels_can_be_turned_off_and_a_failed_build_falls_back(monkeypatch, tmp_path):
    monkeypatch.setattr(kernels, "_loaded", {})
    monkeypatch.setenv("TANDEM_CPU_KERNELS", "0")
    assert kernels.load("int8_linear") is None
    monkeypatch.setattr(kernels, "_loaded", {})
    monkeypatch.setenv("TANDEM_CPU_KERNELS", "1")
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("TANDEM_CACHE_DIR", str(tmp_path))
    assert kernels.load("int8_linear") is None  # logged, not raised


def test_a_failed_build_fails_the_kernel_tests_and_no_compiler_skips_them(monkeypatch, tmp_path):
    from helpers import check_cpu_kernel

    monkeypatch.setenv("TANDEM_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("TANDEM_CPU_KERNELS", "1")
    false = shutil.which("false")
    if false is None:
        pytest.skip("no `false` program to stand in for a broken compiler")
    monkeypatch.setattr(kernels, "_loaded", {})
    monkeypatch.setenv("CC", false)  # a compiler that fails every build
    assert kernels.compiler() == false
    with pytest.raises(pytest.fail.Exception, match=f"int8_linear did not build .*{false}.*failed building int8_linear.c"):
        check_cpu_kernel("int8_linear")
    assert "failed building" in kernels.build_error("int8_linear")
    monkeypatch.setattr(kernels, "_loaded", {})
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    assert kernels.compiler() is None
    with pytest.raises(pytest.skip.Exception, match="no C compiler here"):
        check_cpu_kernel("int8_linear")
    assert "no C compiler" in kernels.build_error("int8_linear")
    monkeypatch.setattr(kernels, "_loaded", {})
    monkeypatch.setenv("TANDEM_CPU_KERNELS", "0")
    with pytest.raises(pytest.skip.Exception, match="turned off"):
        check_cpu_kernel("int8_linear")
    assert kernels.build_error("int8_linear") is None


def test_kernels_can_be_chosen_one_by_one(monkeypatch):
    monkeypatch.setenv("TANDEM_CPU_KERNELS", "int8_linear, elementwise")
    assert kernels.enabled("int8_linear") and kernels.enabled("elementwise")
    assert not kernels.enabled("decode_attention")
    for on in ("1", "", "all", "yes"):
        monkeypatch.setenv("TANDEM_CPU_KERNELS", on)
        assert kernels.enabled("decode_attention")
    for off in ("0", "off", "none"):
        monkeypatch.setenv("TANDEM_CPU_KERNELS", off)
        assert not kernels.enabled("int8_linear")


@needs_kernel
def test_the_build_is_cached_per_source_and_cpu(monkeypatch, tmp_path):
    monkeypatch.setenv("TANDEM_CACHE_DIR", str(tmp_path))
    first = kernels._build("int8_linear", kernels._HERE / "int8_linear.c")
    assert first.parent == tmp_path / "kernels" and first.exists()
    assert kernels._build("int8_linear", kernels._HERE / "int8_linear.c") == first
    monkeypatch.setattr(kernels, "cpu_flags", lambda: "flags : some other cpu")
    assert kernels._build("int8_linear", kernels._HERE / "int8_linear.c") != first


ew = kernels.elementwise()
needs_elementwise = pytest.mark.cpu_kernel("elementwise")


@needs_elementwise
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_elementwise_ops_equal_torch(dtype):
    """RoPE bit for bit (strided rows, as sliced from the fused qkv projection); silu(gate) * up bit
    for bit in bf16 and within a few ulps in fp32 (its exp is not torch's); large and negative gates."""
    from engine.config import RopeScaling
    from engine.layers.rotary import RotaryEmbedding

    torch.manual_seed(0)
    qkv = torch.randn(37, 7 * 64).to(dtype)
    x = qkv[:, :5 * 64].view(37, 5, 64)
    rotary = RotaryEmbedding(64, 1024, 10000.0, RopeScaling(), dtype)
    cos, sin = rotary.lookup(torch.randint(0, 1024, (37,)))
    assert torch.equal(ew.rope(x, cos.view(37, 64), sin.view(37, 64), 2), rotary((cos, sin), x.clone()))
    special = [-200.0, 200.0, 0.0, -0.0, -87.0, -88.0, -1e30, float("nan")]
    gu = torch.cat([torch.randn(37, 96) * 8, torch.tensor([special * 12] * 37)], 1).to(dtype)
    g, u = gu[:, 48:144], torch.randn(37, 96).to(dtype)  # half random, half the special values
    got, want = ew.silu_mul(g, u, 2), F.silu(g) * u
    if dtype == torch.bfloat16:
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    else:
        torch.testing.assert_close(got, want, rtol=5e-7, atol=1e-30, equal_nan=True)  # a few ulps


@needs_elementwise
def test_the_model_uses_the_fused_elementwise_ops_only_where_they_apply():
    from engine.layers.rotary import fused_elementwise

    assert fused_elementwise(torch.zeros(2, 64)) is ew
    assert fused_elementwise(torch.zeros(2, 64, dtype=torch.bfloat16)) is ew
    assert fused_elementwise(torch.zeros(2, 40)) is None  # not a multiple of 16
    assert fused_elementwise(torch.zeros(2, 64, dtype=torch.float16)) is None
    assert fused_elementwise(torch.zeros(2, 64, device="meta")) is None


@needs_elementwise
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_kv_puts_every_token_in_its_slot_as_index_put_does(dtype):
    torch.manual_seed(0)
    T, KVH, D = 300, 3, 64
    cache = torch.randn(2, 40, KVH, 16, D).to(dtype)
    slots = torch.randperm(40 * 16)[:T]
    blocks, offsets = slots // 16, slots % 16
    kv = torch.randn(T, 8 * D).to(dtype)  # k and v sliced from a fused projection: strided rows
    k, v = kv[:, 2 * D:5 * D].view(T, KVH, D), kv[:, 5 * D:].view(T, KVH, D)
    want = cache.clone()
    want[0][blocks, :, offsets] = k
    want[1][blocks, :, offsets] = v
    assert ew.write_kv(k, v, cache, blocks, offsets, 2)
    assert torch.equal(cache, want)
    assert not ew.write_kv(k.float() if dtype == torch.bfloat16 else k.double(), v, cache, blocks, offsets, 2)
    # as a prefill has them: k a slice of the rotated q|k ([T, 12 heads]), v one of the projection
    qk = torch.randn(T, 12 * D).to(dtype)
    k2 = qk[:, 9 * D:].view(T, KVH, D)
    want[0][blocks, :, offsets] = k2
    assert ew.write_kv(k2, v, cache, blocks, offsets, 2)
    assert torch.equal(cache, want)


@needs_elementwise
def test_bad_arguments_raise_real_exceptions_naming_them():
    """ValueError for a shape or stride, TypeError for a dtype (an `assert` is gone under `python -O`)."""
    g = torch.randn(4, 32)
    with pytest.raises(TypeError, match="silu_mul: up must be torch.float32, got torch.bfloat16"):
        ew.silu_mul(g, g.to(torch.bfloat16), 1)
    with pytest.raises(ValueError, match=r"silu_mul: up must have shape \(4, 32\), got \(4, 16\)"):
        ew.silu_mul(g, g[:, :16], 1)
    with pytest.raises(ValueError, match="silu_mul: gate needs stride 1 in dim 1"):
        ew.silu_mul(g.t(), g.t(), 1)
    x, cs = torch.randn(4, 2, 16), torch.randn(16, 4)
    with pytest.raises(ValueError, match=r"rope: cos must be contiguous, got strides \(1, 4\)"):
        ew.rope(x, cs.t(), cs.t().contiguous(), 1)
    h = torch.randn(4, 32, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="add_rms_norm: h must be bfloat16 or float32, got torch.float16"):
        ew.add_rms_norm(h.half(), torch.ones(32, dtype=torch.float16), 1e-5, 1)
    with pytest.raises(TypeError, match="add_rms_norm: weight must be torch.float32, got torch.bfloat16"):
        ew.add_rms_norm(h.float(), torch.ones(32, dtype=torch.bfloat16), 1e-5, 1)
    with pytest.raises(ValueError, match="add_rms_norm: weight must have 32 elements .*, got 16"):
        ew.add_rms_norm(h, torch.ones(16, dtype=torch.bfloat16), 1e-5, 1)
    with pytest.raises(ValueError, match=r"add_rms_norm: a must have shape \(4, 32\), got \(2, 32\)"):
        ew.add_rms_norm(h, torch.ones(32, dtype=torch.bfloat16), 1e-5, 1, h[:2])


@needs_elementwise
def test_add_rms_norm_bf16_matches_transformers_rounding():
    """The residual add bit for bit; the norm as transformers rounds it (fp32 inside, rounded to bf16,
    times the weight), its sum of squares in another order: at most one bf16 step off, and rarely."""
    from engine.layers.norm import RMSNorm

    torch.manual_seed(0)
    norm = RMSNorm(576, 1e-5, torch.bfloat16)
    norm.weight.data = torch.randn(576).to(torch.bfloat16)
    big = torch.randn(300, 2 * 576).to(torch.bfloat16) * 3
    h, a = big[:, :576], torch.randn(300, 576).to(torch.bfloat16)  # h: strided rows
    out, x = ew.add_rms_norm(h, norm.weight, 1e-5, 2, a)
    assert torch.equal(x, h + a)
    want = norm.torch_forward(h + a)
    diff = (out.float() - want.float()).abs()
    ulp = want.float().abs().clamp_min(1e-30) * 2.0 ** -7
    assert (diff <= ulp).all() and (out != want).float().mean() < 1e-3
    alone, none = ew.add_rms_norm(h, norm.weight, 1e-5, 2)
    assert none is None
    assert ((alone.float() - norm.torch_forward(h).float()).abs() <= norm.torch_forward(h).float().abs() * 2.0 ** -7).all()
    # the module takes the kernel for bf16 rows on CPU
    assert torch.equal(norm(h), alone)
    h2, normed = norm.add_forward(h, a)
    assert torch.equal(h2, x) and torch.equal(normed, out)


@needs_elementwise
def test_add_rms_norm_fp32_matches_torch_within_rounding():
    """fp32: the residual add bit for bit, the norm within a few fp32 ulps of torch's (the sum of
    squares in another order), for one row (a decode step) and for many."""
    from engine.layers.norm import RMSNorm

    torch.manual_seed(1)
    norm = RMSNorm(576, 1e-5, torch.float32)
    norm.weight.data = torch.randn(576)
    for rows in (1, 300):
        big = torch.randn(rows, 2 * 576) * 3
        h, a = big[:, :576], torch.randn(rows, 576)
        h2, normed = norm.add_forward(h, a)
        assert torch.equal(h2, h + a)
        want = norm.torch_forward(h + a)
        torch.testing.assert_close(normed, want, rtol=4e-7, atol=1e-6)
        torch.testing.assert_close(norm(h), norm.torch_forward(h), rtol=4e-7, atol=1e-6)
