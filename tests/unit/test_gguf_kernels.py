"""engine/kernels/gguf_linear.c against gguf's numpy dequantizer, on every ISA level this CPU runs, and
the GGUFWeight that serves a layer from it (mixed types, the large-batch path, embedding rows)."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize
from helpers import check_cpu_kernel, random_gguf_rows

from engine import kernels
from engine.layers import quantization as q

TYPES = ["Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K", "F16", "BF16"]
SUPER = {"Q4_K", "Q5_K", "Q6_K"}


@pytest.fixture(scope="module", params=kernels.isa_levels())
def kern(request):
    check_cpu_kernel("gguf_linear")
    k = kernels.gguf_linear(request.param)
    assert k is not None, kernels.build_error(f"gguf_linear:{request.param}")
    return k


def reference(qtype, raw, n, k):
    return dequantize(raw, GGMLQuantizationType[qtype]).reshape(n, k).astype(np.float32)


def close(y, x, w):
    """fp32 summation-order differences only: within a few ulps of sum |x| |w| per output."""
    want = x.astype(np.float64) @ w.astype(np.float64).T
    bound = np.abs(x).astype(np.float64) @ np.abs(w).astype(np.float64).T * 1e-6 + 1e-30
    assert (np.abs(y - want) <= bound).all(), float((np.abs(y - want) / bound).max())


@pytest.mark.parametrize("qtype", TYPES)
def test_dequantize_is_numpys_exactly_and_products_match(kern, qtype):
    rng = np.random.default_rng(1)
    k = 768 if qtype in SUPER else 96  # several blocks
    n = 37  # odd: threads split it unevenly
    raw = random_gguf_rows(qtype, n, k, rng)
    w = reference(qtype, raw, n, k)
    t = torch.from_numpy(raw)
    qt = kernels.GGUF_TYPES[qtype]
    assert torch.equal(kern.dequantize(qt, t, k, 2), torch.from_numpy(w))
    for m in (1, 2, 3, 5, 8, 9, 15, 16, 17, 34):  # the row kernel's tile sizes and tails; the panel GEMM's
        x = torch.randn(m, k)
        close(kern(qt, x, t, 2).numpy(), x.numpy(), w)


def test_strided_rows_in_and_out(kern):
    rng = np.random.default_rng(2)
    raw = random_gguf_rows("Q4_1", 19, 64, rng)
    w = reference("Q4_1", raw, 19, 64)
    x = torch.randn(3, 100)[:, 10:74]  # rows 100 apart
    y = torch.full((3, 30), 7.0)
    kern(kernels.GGUF_TYPES["Q4_1"], x, torch.from_numpy(raw), 1, out=y[:, 5:24])
    close(y[:, 5:24].numpy(), x.numpy(), w)
    assert (y[:, :5] == 7).all() and (y[:, 24:] == 7).all()  # nothing written outside the slice


def test_partial_blocks_and_bad_arguments_are_refused(kern):
    qt = kernels.GGUF_TYPES["Q4_K"]
    assert kern.row_bytes(qt, 256) == 144
    assert kern.row_bytes(qt, 288) == 0  # not whole 256-weight blocks
    assert kern.row_bytes(kernels.GGUF_TYPES["Q8_0"], 40) == 0
    assert kern.row_bytes(0, 64) == 0  # F32: a dense weight, not this kernel's
    raw = torch.zeros(4, 144, dtype=torch.uint8)
    with pytest.raises(ValueError, match="not supported"):
        kern(qt, torch.zeros(1, 288), raw, 1)
    with pytest.raises(ValueError, match="bytes"):
        kern(qt, torch.zeros(1, 512), raw, 1)  # a row of 512 is 288 bytes
    with pytest.raises(TypeError):
        kern(qt, torch.zeros(1, 256, dtype=torch.float64), raw, 1)
    assert not q.gguf_takes("Q8_0", 40, torch.device("cpu"))  # the loader keeps such a tensor dense
    assert not q.gguf_takes("Q5_0", 64, torch.device("cpu"))  # a format without a kernel


def test_mixed_types_tiles_and_rows():
    check_cpu_kernel("gguf_linear")
    rng = np.random.default_rng(3)
    k = 512
    parts = [("Q4_K", 64), ("Q4_K", 32), ("Q6_K", 32), ("Q8_0", 40)]
    segments, dense, off = [], [], 0
    for qtype, n in parts:
        raw = random_gguf_rows(qtype, n, k, rng)
        segments.append((off, qtype, torch.from_numpy(raw)))
        dense.append(reference(qtype, raw, n, k))
        off += n
    w = q.GGUFWeight(k, segments[::-1])  # any order
    assert [s[2] for s in w.segments] == ["Q4_K", "Q6_K", "Q8_0"]  # runs of one type merged
    full = np.concatenate(dense)
    assert torch.equal(w.dequantize(), torch.from_numpy(full))
    for m in (1, 7, q.GEMV_ROWS + 1, 70):  # the row kernel, then the panel GEMM (or oneDNN tiles)
        x = torch.randn(m, k)
        close(w.matmul(x).numpy(), x.numpy(), full)
    emb = q.GGUFWeight(k, [(0, "Q8_0", segments[3][2])])
    ids = torch.tensor([[3, 0], [39, 3]])
    assert torch.equal(emb.take(ids), torch.from_numpy(dense[3])[ids])
    with pytest.raises(ValueError, match="cover"):
        q.GGUFWeight(k, [(0, "Q8_0", segments[3][2]), (50, "Q8_0", segments[3][2])])


def test_large_batch_path_in_several_tiles(monkeypatch):
    """Where the kernel has no panel GEMM (its plain-C build): dequantized tiles into oneDNN."""
    check_cpu_kernel("gguf_linear")
    monkeypatch.setattr(kernels.gguf_linear(), "gemm_min_rows", 0)
    monkeypatch.setattr(q, "_TILE_BYTES", 64 * 96 * 4)  # 64-row tiles of a 150-row weight
    raw = random_gguf_rows("Q4_0", 150, 96, np.random.default_rng(4))
    w = q.GGUFWeight(96, [(0, "Q4_0", torch.from_numpy(raw))])
    x = torch.randn(q.GEMV_ROWS + 3, 96)
    close(w.matmul(x).numpy(), x.numpy(), reference("Q4_0", raw, 150, 96))


@pytest.mark.parametrize("name", ["q8_0", "q4_0"])
def test_quantization_at_load_is_ggufs(name):
    """`--quantization q8_0|q4_0` on a dense layer: gguf's quantizer's blocks, served by the kernel."""
    check_cpu_kernel("gguf_linear")
    from engine.layers.linear import ReplicatedLinear
    from engine.parallel import SINGLE

    layer = ReplicatedLinear(64, 24, True, SINGLE, torch.float32)
    layer.weight.data.normal_(0, 0.1)
    layer.bias.data.normal_()
    w = layer.weight.data.numpy().copy()
    method = q.get_linear_method(name)
    layer.linear_method = method
    method.process_weights_after_loading(layer)
    assert layer.weight is None and layer.gguf.types == [name.upper()]
    qtype = GGMLQuantizationType[name.upper()]
    assert torch.equal(layer.gguf.segments[0][3], torch.from_numpy(quantize(w, qtype)))
    x = torch.randn(5, 64)
    wq = dequantize(quantize(w, qtype), qtype)
    y = layer(x)
    close((y - layer.bias).detach().numpy(), x.numpy(), wq)
    odd = ReplicatedLinear(40, 8, False, SINGLE, torch.float32)  # 40 columns: not whole blocks, stays dense
    odd.linear_method = method
    method.process_weights_after_loading(odd)
    assert odd.weight is not None and type(odd.linear_method) is q.LinearMethod


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0"])
def test_int8_activations_compute_llama_cpps_integer_dot(kern, qtype):
    """The opt-in int8 path: x rounded per 32 values to int8 with scale max|x| / 127 (numpy here), then
    integer block dots scaled once; equal to that reference within fp32 rounding, and within the
    rounding of x (lossy) of the exact product."""
    rng = np.random.default_rng(5)
    k, n = 96, 37
    raw = random_gguf_rows(qtype, n, k, rng)
    qt = kernels.GGUF_TYPES[qtype]
    assert kern.q8_takes(qt) and not kern.q8_takes(kernels.GGUF_TYPES["Q4_K"])
    blocks = dequantize(raw, GGMLQuantizationType[qtype]).reshape(n, k // 32, 32).astype(np.float64)
    for m in (1, 3, 9):
        x = torch.randn(m, k)
        xb = x.numpy().reshape(m, k // 32, 32).astype(np.float32)
        d = np.abs(xb).max(-1, keepdims=True) / np.float32(127)
        q = np.rint(xb * np.where(d > 0, 1 / d, 0)).astype(np.float64)
        want = np.einsum("mbl,nbl->mn", q * d.astype(np.float64), blocks)
        got = kern(qt, x, torch.from_numpy(raw), 2, int8=True).numpy()
        bound = np.einsum("mbl,nbl->mn", np.abs(q * d), np.abs(blocks)) * 1e-5 + 1e-30
        assert (np.abs(got - want) <= bound).all(), float((np.abs(got - want) / bound).max())
        exact = x.numpy().astype(np.float64) @ blocks.reshape(n, k).T
        assert np.abs(got - exact).max() < 0.02 * np.abs(exact).max()  # lossy, but close
    with pytest.raises(ValueError, match="int8"):
        kern(kernels.GGUF_TYPES["Q6_K"], torch.zeros(1, 256), torch.zeros(1, 210, dtype=torch.uint8), 1, int8=True)
