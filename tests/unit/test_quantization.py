import pytest
import torch
import torch.nn.functional as F

from engine.layers.linear import ColumnParallelLinear
from engine.layers.quantization import Int8WeightOnly, get_linear_method


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
    deq = layer.weight.float() * layer.weight_scale.float()[:, None]
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
