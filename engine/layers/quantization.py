"""Weight quantization behind one interface: a `LinearMethod` owns how a linear layer's weight is
stored and multiplied. Today: `none` (dense) and `int8` (weight-only, symmetric per output channel,
quantized at load time from the checkpoint's weights). FP8 and pre-quantized checkpoints plug in here.

`int8` halves the bytes read per decode step versus bf16; it pays off where decoding is bound by
memory bandwidth (small batches on CPU). On CPU it uses torch's int8 weight-only matmul kernel;
elsewhere it dequantizes per call (correct, not fast).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.config import QUANTIZATIONS


class LinearMethod:
    name = "none"

    def process_weights_after_loading(self, layer) -> None:
        pass

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, layer.weight, bias)


class Int8WeightOnly(LinearMethod):
    name = "int8"

    def process_weights_after_loading(self, layer) -> None:
        w = layer.weight.data.float()
        # round the scales to the compute dtype first, so the int8 values are exact for those scales
        scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-8).to(layer.compute_dtype)  # [out]
        q = torch.round(w / scales.float()[:, None]).clamp(-127, 127).to(torch.int8)
        layer.weight = torch.nn.Parameter(q, requires_grad=False)
        layer.register_buffer("weight_scale", scales, persistent=False)

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x2.device.type == "cpu" and x2.dtype in (torch.bfloat16, torch.float16) and x2.shape[0] <= 16:
            y = torch._weight_int8pack_mm(x2.contiguous(), layer.weight, layer.weight_scale)
        else:
            # NOTE: the CPU kernel is slow for fp32 and for large batches; dense matmul on the fly
            y = F.linear(x2, layer.weight.to(x2.dtype)) * layer.weight_scale
        if bias is not None:
            y = y + bias
        return y.reshape(*shape[:-1], y.shape[-1])


def get_linear_method(name: str | None) -> LinearMethod:
    if name in (None, "none"):
        return LinearMethod()
    if name == "int8":
        return Int8WeightOnly()
    raise ValueError(f"quantization = {name!r} is not supported (supported: {QUANTIZATIONS})")


def quantize_model(model: torch.nn.Module, method: LinearMethod) -> None:
    """Converts every linear layer (and the LM head) after the checkpoint is loaded."""
    if method.name == "none":
        return
    from engine.layers.embedding import VocabParallelEmbedding
    from engine.layers.linear import LinearBase

    for module in model.modules():
        if isinstance(module, LinearBase):
            module.linear_method = method
            method.process_weights_after_loading(module)
    head = model.lm_head if model.lm_head is not None else model.embed_tokens
    if isinstance(head, VocabParallelEmbedding):
        head.quantize_lm_head(method)
