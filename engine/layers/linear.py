"""Linear layers behind one interface, tensor-parallel aware.

Every layer owns its parameters and a `weight_loader(param, loaded, shard_id)` that copies this
rank's slice of a checkpoint tensor into place. `loaded` may be a lazy safetensors slice, so each rank
reads only the bytes it keeps. Quantized variants (INT8/FP8) will replace `LinearBase.create_weights`
and `LinearBase.apply` without touching the model.

    Column parallel: W [out, in] split on out (dim 0); output stays sharded.
    Row parallel:    W [out, in] split on in (dim 1); outputs are all-reduced.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.layers.quantization import DENSE as _DENSE
from engine.layers.quantization import LinearMethod
from engine.parallel import SINGLE, ParallelContext
from engine.partition import check_tp, kv_head_range


def narrow(loaded, dim: int, start: int, size: int) -> torch.Tensor:
    """Slice of a tensor or a safetensors lazy slice, read from disk only for that range."""
    if isinstance(loaded, torch.Tensor):
        return loaded.narrow(dim, start, size)
    index = tuple([slice(None)] * dim + [slice(start, start + size)])
    return loaded[index]


class RowSection:
    """Rows [start, start + size) of a tensor or a safetensors lazy slice, read lazily too: one projection's
    part of a fused checkpoint tensor (Phi-3's qkv_proj, gate_up_proj), of which a TP rank reads only its
    own rows."""

    def __init__(self, loaded, start: int, size: int):
        self.loaded, self.start, self.size = loaded, start, size

    def __getitem__(self, index) -> torch.Tensor:
        index = index if isinstance(index, tuple) else (index,)
        lo, hi, step = index[0].indices(self.size)
        if step != 1:
            raise ValueError("a RowSection is read by contiguous rows only")
        return self.loaded[(slice(self.start + lo, self.start + hi), *index[1:])]


def materialize(loaded) -> torch.Tensor:
    return loaded if isinstance(loaded, torch.Tensor) else loaded[:]


def _check_shape(param: torch.Tensor, t: torch.Tensor, what: str) -> None:
    if tuple(param.shape) != tuple(t.shape):
        raise ValueError(f"{what}: checkpoint shape {tuple(t.shape)} does not fit parameter "
                         f"{tuple(param.shape)}")


class LinearBase(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, ctx: ParallelContext,
                 dtype: torch.dtype):
        super().__init__()
        self.ctx = ctx
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = dtype
        self.linear_method: LinearMethod = _DENSE  # replaced after loading when quantized
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def apply_linear(self, x: torch.Tensor, with_bias: bool = True) -> torch.Tensor:
        return self.linear_method.apply(self, x, self.bias if with_bias else None)

    def placement(self, shard_id=None) -> tuple[int, int, int, int]:
        """Where this rank's part of checkpoint tensor `shard_id` goes: (dim, start, size, offset), `size`
        rows (dim 0) or columns (dim 1) of the tensor from `start`, at `offset` in the same dim of the
        weight. (The same for a bias, except a dim-1 split: a row-parallel bias is whole on every rank.)"""
        return 0, 0, self.out_features, 0

    def weight_loader(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        dim, start, size, offset = self.placement(shard_id)
        if dim >= param.dim():
            t, dst = materialize(loaded), param.data
        else:
            t, dst = narrow(loaded, dim, start, size), param.data.narrow(dim, offset, size)
        _check_shape(dst, t, type(self).__name__ if shard_id is None else f"{type(self).__name__}[{shard_id}]")
        dst.copy_(t)


class ReplicatedLinear(LinearBase):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.apply_linear(x)


class ColumnParallelLinear(LinearBase):
    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 ctx: ParallelContext = SINGLE, dtype: torch.dtype = torch.float32):
        if out_features % ctx.tp_size:
            raise ValueError(f"output size {out_features} is not divisible by tp_size {ctx.tp_size}")
        super().__init__(in_features, out_features // ctx.tp_size, bias, ctx, dtype)

    def placement(self, shard_id=None) -> tuple[int, int, int, int]:
        return 0, self.ctx.tp_rank * self.out_features, self.out_features, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.apply_linear(x)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs in one weight (gate and up; q, k and v).

    `forward_split` returns the outputs separately: one fused matmul split into views, or, for fp32 on
    CPU, one matmul per output on row slices of the weight (measured ~15% faster for prefill-sized
    inputs there, and the outputs come out contiguous).
    """

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool = False,
                 ctx: ParallelContext = SINGLE, dtype: torch.dtype = torch.float32):
        self.output_sizes = output_sizes
        super().__init__(in_features, sum(output_sizes), bias, ctx, dtype)
        self.local_sizes = [n // ctx.tp_size for n in output_sizes]
        self.split_gemm = dtype == torch.float32

    def split_here(self, x: torch.Tensor) -> bool:
        """Whether `forward_split` runs one matmul per output for this input."""
        return self.split_gemm and self.linear_method is _DENSE and x.device.type == "cpu"

    def forward_split(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.split_here(x):
            outs, off = [], 0
            for n in self.local_sizes:
                bias = None if self.bias is None else self.bias[off:off + n]
                outs.append(F.linear(x, self.weight[off:off + n], bias))
                off += n
            return outs
        return list(self(x).split(self.local_sizes, dim=-1))

    def checkpoint_sections(self) -> list[tuple[int | str, int]]:
        """(shard id, rows) of each output in a checkpoint tensor that holds them all, in order (fused)."""
        return list(enumerate(self.output_sizes))

    def placement(self, shard_id: int = 0) -> tuple[int, int, int, int]:
        tp = self.ctx.tp_size
        size = self.output_sizes[shard_id] // tp
        return 0, self.ctx.tp_rank * size, size, sum(self.output_sizes[:shard_id]) // tp


class QKVParallelLinear(MergedColumnParallelLinear):
    """q, k and v projections in one matmul. KV heads are replicated when tp_size > num_kv_heads."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int,
                 bias: bool = False, ctx: ParallelContext = SINGLE, dtype: torch.dtype = torch.float32):
        tp = ctx.tp_size
        check_tp(num_heads, num_kv_heads, tp)
        self.head_dim = head_dim
        self.num_heads = num_heads // tp
        self.num_kv_heads = max(1, num_kv_heads // tp)
        self.total_kv_heads = num_kv_heads
        q, kv = self.num_heads * head_dim * tp, self.num_kv_heads * head_dim * tp
        super().__init__(hidden_size, [q, kv, kv], bias, ctx, dtype)

    def checkpoint_sections(self) -> list[tuple[int | str, int]]:
        # the checkpoint's KV heads, not this layer's (which are replicated when tp > num_kv_heads)
        hd = self.head_dim
        return [("q", self.num_heads * self.ctx.tp_size * hd), ("k", self.total_kv_heads * hd),
                ("v", self.total_kv_heads * hd)]

    def kv_head_start(self) -> int:
        """First global KV head held by this rank (replicas share it when tp > num_kv_heads)."""
        return kv_head_range(self.total_kv_heads, self.ctx.tp_size, self.ctx.tp_rank)[0]

    def placement(self, shard_id: str = "q") -> tuple[int, int, int, int]:
        hd = self.head_dim
        if shard_id == "q":
            return 0, self.ctx.tp_rank * self.num_heads * hd, self.num_heads * hd, 0
        size = self.num_kv_heads * hd
        return 0, self.kv_head_start() * hd, size, self.num_heads * hd + (size if shard_id == "v" else 0)


class RowParallelLinear(LinearBase):
    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 ctx: ParallelContext = SINGLE, dtype: torch.dtype = torch.float32):
        if in_features % ctx.tp_size:
            raise ValueError(f"input size {in_features} is not divisible by tp_size {ctx.tp_size}")
        super().__init__(in_features // ctx.tp_size, out_features, bias, ctx, dtype)

    def placement(self, shard_id=None) -> tuple[int, int, int, int]:
        # the bias is whole on every rank: added once, after the reduction
        return 1, self.ctx.tp_rank * self.in_features, self.in_features, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.ctx.tp_size == 1:
            return self.apply_linear(x)
        y = self.ctx.all_reduce(self.apply_linear(x, with_bias=False))
        return y + self.bias if self.bias is not None else y
