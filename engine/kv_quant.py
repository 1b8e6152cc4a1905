"""Quantized KV cache formats (`--kv-cache-dtype int8|fp8_e4m3`): their bytes and their numbers, in torch.

A quantized cache keeps each (token, KV head) vector of head_dim values as one row of its own: the
values' one-byte codes, then the vector's scale. It is quantized on its own when its token is written
(llama.cpp's blocks, taken along head_dim), so a decode's append never requantizes a page, and a page
(one block of one layer) holds its scales inside its K and V slabs: they travel with it.

    row of D + 4 bytes:  [ c_0 c_1 ... c_(D-1) | scale: fp32, little-endian ]

    int8:      scale = amax / 127, c = round_half_even(x / scale)     x' = c * scale
    fp8_e4m3:  scale = amax / 448, c = float8_e4m3fn(x / scale)       x' = float(c) * scale
               (x / scale clamped to [-448, 448], rounded to the nearest, ties to even)

amax is the largest |x| of the vector; an all-zero vector has scale 0 and codes 0. The scale is fp32,
not fp16: fp16 would save 2 bytes a row (3%), but amax / 448 of a small vector (amax < 0.03) falls
into fp16's subnormals and loses the scale's precision, and an fp32 scale is read without conversion.

A layer's cache is then `[2, num_blocks, kv_heads, block_size, head_dim + 4]` of one-byte elements:
torch.int8 for int8, torch.uint8 for fp8_e4m3 (the float8 codes as bytes: torch's CPU float8 tensors
lack index_copy_ and other ops a cache needs; they are viewed as float8 only to convert). The
storage dtype names the format (`cache_format`), so a cache tensor describes itself to attention,
the kernels and KV transfer. The C kernels (engine/kernels/kvquant.h) quantize bit for bit as
`quantize` does here.
"""

from __future__ import annotations

import torch

SCALE_BYTES = 4  # one fp32 scale per row
STORAGE = {"int8": torch.int8, "fp8_e4m3": torch.uint8}
CODE_MAX = {"int8": 127.0, "fp8_e4m3": 448.0}  # the largest code: amax maps to it


def cache_format(cache: torch.Tensor) -> str | None:
    """The quantized format of a cache tensor (`int8`, `fp8_e4m3`), or None for a float cache."""
    if cache.dtype == torch.int8:
        return "int8"
    if cache.dtype == torch.uint8:
        return "fp8_e4m3"
    return None


def row_width(fmt: str | None, head_dim: int) -> int:
    """Elements of one (token, KV head) row of the cache: head_dim, or head_dim + 4 bytes quantized."""
    return head_dim + SCALE_BYTES if fmt else head_dim


def quantize(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """x [..., D] (any float dtype) -> rows [..., D + 4] of the format's storage dtype."""
    xf = x.float()
    scale = xf.abs().amax(-1, keepdim=True) / CODE_MAX[fmt]  # [..., 1]
    y = torch.where(scale > 0, xf / scale, 0.0)
    if fmt == "int8":
        codes = torch.round(y).clamp_(-127, 127).to(torch.int8)
    else:
        codes = y.clamp_(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8)
    return torch.cat([codes, scale.view(STORAGE[fmt])], dim=-1)


def dequantize(rows: torch.Tensor, fmt: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """rows [..., D + 4] -> [..., D] in `dtype`: each code times its row's scale, in fp32, then rounded
    to `dtype` once."""
    codes = rows[..., :-SCALE_BYTES]
    scale = rows[..., -SCALE_BYTES:].contiguous().view(torch.float32)  # [..., 1]
    values = codes.float() if fmt == "int8" else codes.view(torch.float8_e4m3fn).float()
    return (values * scale).to(dtype)
