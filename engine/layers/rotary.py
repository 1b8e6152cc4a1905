"""Rotary position embedding (the Hugging Face "rotate half" layout), with Llama-3, linear and LongRoPE
(Phi-3) scaling."""

from __future__ import annotations

import math

import torch
from torch import nn

from engine.config import RopeScaling
from engine.kernels import elementwise


def inv_frequencies(head_dim: int, base: float, scaling: RopeScaling) -> torch.Tensor:
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    if scaling.rope_type == "longrope":  # the operations in transformers' order: the same float32 values
        ext = torch.tensor(scaling.long_factor if scaling.use_long_factor else scaling.short_factor,
                           dtype=torch.float32)
        return 1.0 / (ext * base ** exponents)
    inv_freq = 1.0 / (base ** exponents)
    if scaling.rope_type == "linear":
        inv_freq = inv_freq / scaling.factor
    elif scaling.rope_type == "llama3":
        low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
        high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
        smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
            scaling.high_freq_factor - scaling.low_freq_factor)
        smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_position: int, base: float, scaling: RopeScaling,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        inv_freq = inv_frequencies(head_dim, base, scaling)
        t = torch.arange(max_position, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)  # [max_pos, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [max_pos, D]
        # LongRoPE's attention factor scales cos and sin (1.0 elsewhere: no rounding changes)
        scale = scaling.attention_factor if scaling.rope_type == "longrope" else 1.0
        self.register_buffer("cos", (emb.cos() * scale).to(dtype), persistent=False)
        self.register_buffer("sin", (emb.sin() * scale).to(dtype), persistent=False)
        self.half = head_dim // 2

    def lookup(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for a step's positions [T] -> [T, 1, D] each; computed once, used by every layer."""
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)

    def forward(self, rope: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """x [T, heads, D] (q and k heads side by side: rotated in one pass) -> rotated copy."""
        cos, sin = rope
        T, _, D = x.shape
        kernels = fused_elementwise(x)
        if kernels is not None and D <= 256 and x.stride(2) == 1 and x.stride(1) == D:
            return kernels.rope(x, cos.view(T, D), sin.view(T, D), torch.get_num_threads())  # bit for bit the same
        x1, x2 = x[..., :self.half], x[..., self.half:]
        return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def fused_elementwise(x: torch.Tensor):
    """engine/kernels' fused elementwise ops (RoPE, SwiGLU's silu * up) where they take `x`: a CPU
    tensor of fp32 or bf16 whose last dimension is a multiple of 16, the kernels built here. Else None."""
    kernels = elementwise()
    return kernels if kernels is not None and kernels.takes(x, x.shape[-1]) else None
