import pytest
import torch
import torch.nn.functional as F

from engine.layers.linear import ColumnParallelLinear
from engine.layers.quantization import Int8WeightOnly, LinearMethod, PackedDense, get_linear_method, packable


@pytest.mark.parametrize("dtype,rows", [(torch.bfloat16, 1), (torch.bfloat16, 40), (torch.float32, 3)])
def test_int8_weight_only_matches_the_dequantized_weight(dtype, rows):
    torch.manual_seed(0)
    layer = ColumnParallelLinear(64, 96, bias=True, dtype=dtype)
    layer.weight.data.copy_(torch.randn(96, 64))
    w = layer.weight.data.float()
    layer.bias.data.normal_()
    layer.linear_method = Int8WeightOnly()
    layer.linear_method.process_weights_after_loading(layer)
    assert layer.weight.dtype == torch.int8
    deq = Int8WeightOnly.int8_rows(layer).float() * layer.weight_scale.float()[:, None]
    # symmetric rounding: at most half a step per element
    step = layer.weight_scale.float()[:, None]
    assert ((deq - w).abs() <= step * 0.51).all()
    x = torch.randn(rows, 64, dtype=dtype)
    want = F.linear(x.float(), deq, layer.bias.float())
    got = layer(x).float()
    assert torch.allclose(got, want, rtol=2e-2, atol=5e-2)


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="fp4"):
        get_linear_method("fp4")


needs_onednn = pytest.mark.skipif(not packable(torch.float32, torch.device("cpu")),
                                  reason="this CPU's oneDNN cannot pack fp32 weights")


@needs_onednn
@pytest.mark.parametrize("shape", [(1, 64), (40, 64), (3, 5, 64)])
def test_packed_dense_equals_f_linear(shape):
    torch.manual_seed(0)
    layer = ColumnParallelLinear(64, 96, bias=True)
    layer.weight.data.normal_()
    layer.bias.data.normal_()
    w, b = layer.weight.data.clone(), layer.bias.data.clone()
    method = get_linear_method("none", torch.float32, torch.device("cpu"), pack=True)
    assert isinstance(method, PackedDense)
    layer.linear_method = method
    method.process_weights_after_loading(layer)
    assert layer.weight is None  # the packed copy replaces the dense one
    x = torch.randn(*shape)
    got = layer(x)
    assert got.shape == (*shape[:-1], 96)
    torch.testing.assert_close(got, F.linear(x, w, b), rtol=1e-5, atol=1e-5)


def test_packing_is_off_where_it_is_not_asked_for_or_not_cpu():
    assert type(get_linear_method("none", torch.float32, torch.device("cpu"))) is LinearMethod
    assert type(get_linear_method("none", torch.float32, torch.device("meta"), pack=True)) is LinearMethod
    assert isinstance(get_linear_method("int8", torch.float32, torch.device("cpu"), pack=True), Int8WeightOnly)


@needs_onednn
def test_half_weights_without_half_arithmetic_are_packed_upcast():
    """Where oneDNN cannot multiply bf16 here, bf16 layers multiply upcast weights: the result is a bf16
    kernel's (bf16 inputs, fp32 sums, rounded once)."""
    torch.manual_seed(0)
    layer = ColumnParallelLinear(64, 96, bias=True, dtype=torch.bfloat16)
    layer.weight.data.normal_()
    layer.bias.data.normal_()
    w, b = layer.weight.data.float(), layer.bias.data.float()
    chosen = get_linear_method("none", torch.bfloat16, torch.device("cpu"), pack=True)
    assert isinstance(chosen, PackedDense)
    native = packable(torch.bfloat16, torch.device("cpu"))
    assert chosen.compute_dtype == (None if native else torch.float32)
    # the upcast path always, and oneDNN's own bf16 kernel where this CPU has one
    for method in [PackedDense(compute_dtype=torch.float32)] + ([PackedDense()] if native else []):
        layer.weight = torch.nn.Parameter(w.to(torch.bfloat16), requires_grad=False)
        layer.linear_method = method
        method.process_weights_after_loading(layer)
        x = torch.randn(7, 64, dtype=torch.bfloat16)
        got = layer(x)
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got, F.linear(x.float(), w, b).to(torch.bfloat16), rtol=1e-2, atol=1e-2)
