"""Weight quantization behind one interface: a `LinearMethod` owns how a linear layer's weight is
stored and multiplied. Today: `none` (dense: plain `F.linear`, or on CPU weights prepacked for
oneDNN), `int8` (weight-only, symmetric per output channel, quantized at load time from the
checkpoint's weights), and GGUF's block formats (`GGUFWeight`): a GGUF file's weights as stored
(Q4_0, Q4_1, Q8_0, Q4_K, Q5_K, Q6_K, F16, BF16), or an HF checkpoint's quantized at load into
`q8_0` / `q4_0`.

`int8` halves the bytes read per decode step versus bf16; it pays off where decoding is bound by
memory bandwidth (small batches on CPU). On CPU, batches of up to 16 rows go through a hand-written
kernel built for the CPU at hand (`engine/kernels/int8_linear.c`; torch's int8 weight-only matmul
where it cannot be built); larger batches and other devices dequantize per call (correct, not fast).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.config import QUANTIZATIONS
from engine.kernels import GGUF_TYPES, gguf_linear, int8_linear


class LinearMethod:
    name = "none"

    def process_weights_after_loading(self, layer) -> None:
        pass

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, layer.weight, bias)


class Int8WeightOnly(LinearMethod):
    """Symmetric per-output-channel int8 weights, quantized at load time.

    On CPU, where engine/kernels' int8 kernel builds, the int8 weight is stored only in that kernel's
    packed layout (`layer.weight` is then 4-D; `int8_rows` gives the [out, in] rows back) and batches
    of up to 16 rows go through it; larger batches dequantize from it per call. Elsewhere the weight
    stays [out, in] for torch's int8 kernel (bf16, small batches) or per-call dequantization.
    """

    name = "int8"
    max_kernel_rows = 16  # above this, a dense matmul of the dequantized weight is faster

    def process_weights_after_loading(self, layer) -> None:
        w = layer.weight.data.float()
        # round the scales to the compute dtype first, so the int8 values are exact for those scales
        scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-8).to(layer.compute_dtype)  # [out]
        q = torch.round(w / scales.float()[:, None]).clamp(-127, 127).to(torch.int8)
        layer.int8_shape = tuple(q.shape)
        kernel = _int8_kernel() if q.device.type == "cpu" else None
        layer.int8_packed = kernel is not None
        layer.weight = torch.nn.Parameter(kernel.pack(q) if kernel is not None else q, requires_grad=False)
        layer.register_buffer("weight_scale", scales, persistent=False)
        # fp32 copies for the kernel
        layer.weight_scale_f32 = scales.float()
        layer.bias_f32 = layer.bias.data.float() if layer.bias is not None else None

    @staticmethod
    def int8_rows(layer, dtype: torch.dtype = torch.int8) -> torch.Tensor:
        """The [out, in] weight in `dtype` (unscaled int8 values; a copy when packed or converted)."""
        if not layer.int8_packed:
            return layer.weight if dtype == torch.int8 else layer.weight.to(dtype)
        G, Kb, R, KB = layer.weight.shape
        rows = torch.empty(G, R, Kb, KB, dtype=dtype, device=layer.weight.device)
        rows.copy_(layer.weight.permute(0, 2, 1, 3))  # one pass
        n, k = layer.int8_shape
        return rows.view(G * R, Kb * KB)[:n, :k]

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        # the decode fast path (121 calls a token on SmolLM2): as few Python steps as the checks allow
        if layer.int8_packed and x.dim() == 2 and x.shape[0] <= self.max_kernel_rows and \
                (x.dtype is torch.bfloat16 or x.dtype is torch.float32) and (bias is None or bias is layer.bias):
            return _int8_kernel()(x if x.is_contiguous() else x.contiguous(), layer.weight, layer.int8_shape[0],
                                  layer.weight_scale_f32, layer.bias_f32 if bias is not None else None,
                                  torch.get_num_threads())
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        small = x2.device.type == "cpu" and x2.shape[0] <= self.max_kernel_rows
        if layer.int8_packed and small and x2.dtype in (torch.bfloat16, torch.float32):
            kb = None
            if bias is not None:
                kb = layer.bias_f32 if bias is layer.bias else bias.float().contiguous()
            # bias fused in: one call, one pass over the weights
            y = _int8_kernel()(x2.contiguous(), layer.weight, layer.int8_shape[0], layer.weight_scale_f32, kb,
                               torch.get_num_threads())
            return y.reshape(*shape[:-1], y.shape[-1])
        if small and not layer.int8_packed and x2.dtype in (torch.bfloat16, torch.float16):
            y = torch._weight_int8pack_mm(x2.contiguous(), layer.weight, layer.weight_scale)
        elif needs_fp32(x2.dtype, x2.device):
            # no half-precision arithmetic on this CPU: dequantize and multiply in fp32
            y = (F.linear(x2.float(), self.int8_rows(layer, torch.float32)) * layer.weight_scale.float()).to(x2.dtype)
        else:
            # NOTE: the CPU kernel is slow for fp32 and for large batches; dense matmul on the fly
            y = F.linear(x2, self.int8_rows(layer, x2.dtype)) * layer.weight_scale
        if bias is not None:
            y = y + bias
        return y.reshape(*shape[:-1], y.shape[-1])


def _int8_kernel():
    """engine/kernels' int8 linear (CPU), or None (cannot be built here, or turned off)."""
    return int8_linear()


class PackedDense(LinearMethod):
    """Dense weights reordered once, at load time, into oneDNN's blocked layout (CPU).

    The same arithmetic as `F.linear` (fp32 accumulation, results within rounding), but the weight
    is not re-laid out on every call: measured on a 2-core AVX2 CPU in fp32, 1.3-2.7x the matmul
    rate of `F.linear` for decode-sized batches (8-128 rows) and about the same for prefill. The
    packed tensor replaces the dense weight.

    `compute_dtype=float32` for half-precision weights on a CPU without half-precision arithmetic
    (AVX2: no bf16 instructions, where torch's bf16 matmul runs ~5x slower than fp32): the weights
    are packed upcast, so a matmul is the one a bf16 kernel computes (products of bf16 values are
    exact in fp32, sums accumulate in fp32, the output is rounded back), at twice the weight memory.
    """

    name = "none"

    def __init__(self, compute_dtype: torch.dtype | None = None):
        self.compute_dtype = compute_dtype

    def process_weights_after_loading(self, layer) -> None:
        w = layer.weight.data
        if self.compute_dtype is not None:
            w = w.to(self.compute_dtype)
            if layer.bias is not None:
                layer.packed_bias = layer.bias.data.to(self.compute_dtype)
        layer.packed_weight = torch.ops.mkldnn._reorder_linear_weight(w, None)
        layer.register_parameter("weight", None)  # the packed copy is the only one

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.compute_dtype is None or x.dtype == self.compute_dtype:
            return torch.ops.mkldnn._linear_pointwise(x, layer.packed_weight, bias, "none", [], "")
        if bias is not None:
            bias = layer.packed_bias
        y = torch.ops.mkldnn._linear_pointwise(x.to(self.compute_dtype), layer.packed_weight, bias, "none", [], "")
        return y.to(x.dtype)


_PACKABLE: dict[torch.dtype, bool] = {}


def packable(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether this CPU's oneDNN build can pack and multiply weights of `dtype` (bf16 needs
    avx512bw/vl/dq or avx_ne_convert; fp32 works wherever oneDNN does)."""
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if dtype not in _PACKABLE:
        try:
            w = torch.ops.mkldnn._reorder_linear_weight(torch.zeros(8, 8, dtype=dtype), None)
            torch.ops.mkldnn._linear_pointwise(torch.zeros(2, 8, dtype=dtype), w, None, "none", [], "")
            _PACKABLE[dtype] = True
        except RuntimeError:
            _PACKABLE[dtype] = False
    return _PACKABLE[dtype]


def needs_fp32(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether arithmetic in `dtype` runs in fp32 here: a half-precision type on a CPU whose oneDNN
    cannot multiply it (AVX2: torch's bf16 matmul runs ~5x slower than fp32 there, its bf16 batched
    matmul is a per-matrix loop). The one place that decides it for linear layers and attention."""
    return device.type == "cpu" and dtype in (torch.bfloat16, torch.float16) and not packable(dtype, device)


# ---- GGUF block formats ---------------------------------------------------------------------------
_SUPER_BLOCK = {"Q4_K": 256, "Q5_K": 256, "Q6_K": 256}  # weights per block; the others: 32
# without the kernel's panel GEMM (its plain-C build), inputs of more rows than this go to oneDNN as
# dequantized tiles
GEMV_ROWS = 32
_TILE_BYTES = 8 << 20  # fp32 weights dequantized at a time for the large-batch path
_scratch = torch.empty(0)  # their buffer: the forward runs on one thread per process


def _scratch_rows(rows: int, k: int) -> torch.Tensor:
    """An fp32 [rows, k] view of the tile buffer, grown as needed."""
    global _scratch
    if _scratch.numel() < rows * k:
        _scratch = torch.empty(rows * k)
    return _scratch[:rows * k].view(rows, k)


def block_elems(qtype: str) -> int:
    return _SUPER_BLOCK.get(qtype, 32)


class GGUFWeight:
    """A [n, k] weight kept in GGUF block formats, as the file stores it: runs of output rows, each of one
    ggml type (a merged projection may mix them: Q4_K_M files store v as Q6_K beside Q4_K q and k).
    Multiplied by engine/kernels/gguf_linear.c: fp32 activations, fp32 accumulation."""

    def __init__(self, k: int, segments: list[tuple[int, str, torch.Tensor]]):
        merged: list[list] = []
        for offset, qtype, rows in sorted(segments, key=lambda s: s[0]):
            if merged and merged[-1][1] == qtype and merged[-1][0] + merged[-1][2].shape[0] == offset:
                merged[-1][2] = torch.cat([merged[-1][2], rows])
            else:
                merged.append([offset, qtype, rows])
        self.k = k
        self.n = sum(rows.shape[0] for _, _, rows in merged)
        if [m[0] for m in merged] != [sum(r.shape[0] for _, _, r in merged[:i]) for i in range(len(merged))]:
            raise ValueError("GGUF rows do not cover the weight once each")
        self.segments = [(offset, GGUF_TYPES[qtype], qtype, rows.contiguous()) for offset, qtype, rows in merged]
        self.types = sorted({qtype for _, qtype, _ in merged})
        self.nbytes = sum(rows.numel() for _, _, _, rows in self.segments)
        # small batches' activations rounded to int8 per 32 values, as llama.cpp does (lossy; opt-in:
        # DeviceConfig.int8_activations), for the types that have that path
        self.int8_activations = False

    def dequantize(self) -> torch.Tensor:
        """The fp32 weight, as gguf's numpy dequantizer gives it."""
        kern = gguf_linear()
        out = torch.empty(self.n, self.k)
        for offset, qt, _, data in self.segments:
            kern.dequantize(qt, data, self.k, torch.get_num_threads(), out=out[offset:offset + data.shape[0]])
        return out

    def take(self, ids: torch.Tensor) -> torch.Tensor:
        """fp32 rows `ids` (an embedding lookup; a single-type weight)."""
        (_, qt, _, data), = self.segments
        return gguf_linear().dequantize(qt, data.index_select(0, ids.reshape(-1)), self.k, 1).view(*ids.shape, self.k)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x: fp32 [M, k], elements contiguous -> fp32 [M, n]."""
        kern, threads, M = gguf_linear(), torch.get_num_threads(), x.shape[0]
        tiles = M > GEMV_ROWS and not kern.gemm_min_rows
        if tiles and len(self.segments) == 1 and self.n * self.k * 4 <= _TILE_BYTES:
            _, qt, _, data = self.segments[0]  # one tile: the product is the output
            return F.linear(x, kern.dequantize(qt, data, self.k, threads, out=_scratch_rows(self.n, self.k)))
        y = torch.empty(M, self.n)
        for offset, qt, _, data in self.segments:
            n = data.shape[0]
            if not tiles:  # the kernel keeps large batches exact even with int8 activations on
                int8 = self.int8_activations and kern.q8_takes(qt)
                kern(qt, x, data, threads, out=y[:, offset:offset + n], int8=int8)
                continue
            step = max(1, _TILE_BYTES // (4 * self.k))
            for a in range(0, n, step):
                b = min(n, a + step)
                w = kern.dequantize(qt, data[a:b], self.k, threads, out=_scratch_rows(b - a, self.k))
                y[:, offset + a:offset + b] = F.linear(x, w)
        return y


def gguf_takes(qtype: str, k: int, device: torch.device) -> bool:
    """Whether a weight of ggml type `qtype` with k columns can stay in its format here (a CPU whose
    kernel builds; whole blocks)."""
    if qtype not in GGUF_TYPES or device.type != "cpu":
        return False
    kern = gguf_linear()
    return kern is not None and kern.row_bytes(GGUF_TYPES[qtype], k) > 0


def gguf_placeable(owner, param, shard, qtype: str, k: int) -> bool:
    """Whether GGUF tensor data (shard `shard`) for `param` of module `owner` can be kept in its format:
    the weight of a linear layer or of an embedding (LM head), this rank's columns whole blocks."""
    from engine.layers.embedding import VocabParallelEmbedding
    from engine.layers.linear import LinearBase

    if param is not getattr(owner, "weight", None) or not gguf_takes(qtype, k, param.device):
        return False
    if isinstance(owner, VocabParallelEmbedding):
        return True
    if not isinstance(owner, LinearBase):
        return False
    dim, start, size, _ = owner.placement(shard)
    return dim == 0 or (start % block_elems(qtype) == 0 and size % block_elems(qtype) == 0)


def place_gguf(owner, shard, qtype: str, raw: torch.Tensor, shape: list[int]) -> None:
    """This rank's part of a GGUF tensor ([rows, row bytes], the whole [out, in] weight) into `owner`,
    kept in its format; `finish_gguf` assembles each layer once every tensor is placed."""
    from engine.layers.embedding import VocabParallelEmbedding

    if isinstance(owner, VocabParallelEmbedding):
        owner.gguf = GGUFWeight(shape[1], [(0, qtype, raw[owner.vocab_start:owner.vocab_end])])
        return
    dim, start, size, offset = owner.placement(shard)
    if dim == 0:
        part, k = raw[start:start + size], shape[1]
    else:  # a row-parallel split of the columns, on block boundaries
        per = raw.shape[1] // (shape[1] // block_elems(qtype))
        part, k = raw[:, start // block_elems(qtype) * per:(start + size) // block_elems(qtype) * per], size
    if not hasattr(owner, "_gguf_parts"):
        owner._gguf_parts = []
    owner._gguf_parts.append((offset, qtype, part.contiguous(), k))


def finish_gguf(model: torch.nn.Module) -> None:
    """Every layer given GGUF parts gets its `GGUFWeight` (and drops its dense weight), or, where some
    of its tensors were loaded dense, the parts dequantized into that weight."""
    from engine.layers.linear import LinearBase

    for module in model.modules():
        parts = module.__dict__.pop("_gguf_parts", None)
        if parts is not None and isinstance(module, LinearBase):
            if sum(p[2].shape[0] for p in parts) == module.out_features:
                module.gguf = GGUFWeight(module.in_features, [p[:3] for p in parts])
                module.linear_method = GGUF_METHOD
                module.register_parameter("weight", None)
            else:
                for offset, qtype, rows, k in parts:
                    w = GGUFWeight(k, [(0, qtype, rows)]).dequantize()
                    module.weight.data[offset:offset + rows.shape[0]] = w
        elif getattr(module, "gguf", None) is not None and isinstance(getattr(module, "weight", None), torch.nn.Parameter):
            module.register_parameter("weight", None)  # an embedding kept in its format


def set_int8_activations(model: torch.nn.Module, on: bool) -> int:
    """Every GGUF weight's `int8_activations`; returns how many weights there are."""
    weights = [m.gguf for m in model.modules() if getattr(m, "gguf", None) is not None]
    for w in weights:
        w.int8_activations = on
    return len(weights)


class GGUFMethod(LinearMethod):
    """Linear layers on `layer.gguf` (a GGUFWeight). With `qtype` (q8_0 or q4_0), a dense checkpoint's
    weights are quantized into it at load (gguf's quantizer: llama.cpp's numbers), where its width is
    whole blocks; other layers stay dense."""

    def __init__(self, qtype: str | None = None):
        self.qtype = qtype
        self.name = qtype.lower() if qtype else "gguf"

    def process_weights_after_loading(self, layer) -> None:
        from gguf import GGMLQuantizationType
        from gguf.quants import quantize

        w = layer.weight.data
        if self.qtype is None or not gguf_takes(self.qtype, w.shape[1], w.device):
            layer.linear_method = DENSE
            return
        raw = quantize(w.float().numpy(), GGMLQuantizationType[self.qtype])
        layer.gguf = GGUFWeight(w.shape[1], [(0, self.qtype, torch.from_numpy(raw))])
        layer.register_parameter("weight", None)

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x2.dtype is not torch.float32 or x2.stride(-1) != 1:
            x2 = x2.float().contiguous()
        y = layer.gguf.matmul(x2)
        if bias is not None:
            y += bias
        if x.dtype is not torch.float32:
            y = y.to(x.dtype)
        return y.view(*shape[:-1], y.shape[-1])


GGUF_METHOD = GGUFMethod()
DENSE = LinearMethod()  # every layer's method until it is quantized


def get_linear_method(name: str | None, dtype: torch.dtype | None = None, device: torch.device | None = None,
                      pack: bool = False) -> LinearMethod:
    """The method for `quantization = name`; dense weights are packed for oneDNN when `pack` and this
    CPU supports `dtype`."""
    if name in (None, "none"):
        if pack and dtype is not None and device is not None:
            if packable(dtype, device):
                return PackedDense()
            if needs_fp32(dtype, device) and packable(torch.float32, device):
                return PackedDense(compute_dtype=torch.float32)
        return LinearMethod()
    if name == "int8":
        return Int8WeightOnly()
    if name in ("q8_0", "q4_0"):
        return GGUFMethod(name.upper())
    raise ValueError(f"quantization = {name!r} is not supported (supported: {QUANTIZATIONS})")


def quantize_model(model: torch.nn.Module, method: LinearMethod) -> None:
    """Converts every linear layer (and the LM head) after the checkpoint is loaded."""
    if type(method) is LinearMethod:
        return
    from engine.layers.embedding import VocabParallelEmbedding
    from engine.layers.linear import LinearBase

    for module in model.modules():
        if isinstance(module, LinearBase) and type(module.linear_method) is LinearMethod:  # not loaded quantized
            module.linear_method = method
            method.process_weights_after_loading(module)
    head = model.lm_head if model.lm_head is not None else model.embed_tokens
    if isinstance(head, VocabParallelEmbedding) and getattr(head, "gguf", None) is None:
        head.quantize_lm_head(method)
