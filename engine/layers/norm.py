from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.kernels import MAX_NORM_WIDTH, elementwise


class RMSNorm(nn.Module):
    """RMSNorm with Hugging Face's rounding: half types are normalised in fp32, rounded back, then
    scaled by the weight in their own dtype (`F.rms_norm` with the weight scales before it rounds,
    one bf16 ulp away from transformers on ~1 value in 10; it is also ~1.35x slower at prefill sizes
    in bf16 on CPU, 2,048 x 576: 4.7 vs 3.5 ms).

    bf16 and fp32 rows on CPU go through engine/kernels' fused norm (one pass and one call instead of
    ~9 torch ops, ~60 us a call inside a decode step on 2 cores, with `add_forward` the residual add
    before it too): the same roundings, its fp32 sum of squares in another order than torch's, so a
    rare element may differ from transformers' by one step in its last place (the matmuls block
    differently from transformers' anyway)."""

    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernels = _fused_norm(x)
        if kernels is not None:
            return kernels.add_rms_norm(x, self.weight, self.eps, torch.get_num_threads())[0]
        return self.torch_forward(x)

    def torch_forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        return F.rms_norm(x.float(), self.weight.shape, None, self.eps).to(x.dtype) * self.weight

    def add_forward(self, h: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(h + a, RMSNorm(h + a)): the residual add and the norm after it, in one pass where the fused
        kernel takes them."""
        kernels = _fused_norm(h)
        if kernels is not None and a.dtype == h.dtype and a.shape == h.shape and a.stride(-1) == 1:
            normed, x = kernels.add_rms_norm(h, self.weight, self.eps, torch.get_num_threads(), a)
            return x, normed
        x = h + a
        return x, self(x)


def _fused_norm(x: torch.Tensor):
    """engine/kernels' elementwise ops where the fused norm takes `x`: [rows, N] bf16 or fp32 on CPU
    with contiguous rows of a multiple of 16 elements. Else None."""
    if x.dtype not in (torch.bfloat16, torch.float32) or x.dim() != 2 or x.device.type != "cpu" or x.stride(1) != 1 or \
            x.shape[1] > MAX_NORM_WIDTH:
        return None
    kernels = elementwise()
    return kernels if kernels is not None and kernels.takes(x, x.shape[-1]) else None
