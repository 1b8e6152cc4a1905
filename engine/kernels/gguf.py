"""Wrappers of the GGUF kernels (engine/kernels/gguf_linear.c, decode_step.c), built per ISA level by the
package's machinery (engine/kernels/__init__.py)."""

from __future__ import annotations

import ctypes
import os

import torch

from engine.kernels import (
    _X86_LEVELS,
    KV_FORMATS,
    _check_contiguous,
    _check_dtype,
    _check_shape,
    _check_stride,
    _wrappers,
    isa_levels,
    load,
)
from engine.kv_quant import cache_format

# ggml's type numbers of the formats engine/kernels/gguf_linear.c multiplies
GGUF_TYPES = {"F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 8, "Q4_K": 12, "Q5_K": 13, "Q6_K": 14, "BF16": 30}


class GGUFLinear:
    """engine/kernels/gguf_linear.c: y = x @ w.T for fp32 rows x and a weight kept in a GGUF block format
    ([N, row_bytes] uint8, rows as the file stores them); `dequantize` gives the fp32 weight."""

    def __init__(self, lib: ctypes.CDLL, isa: str):
        i64, ptr, c_int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
        self.isa = isa
        self._fn = lib.tandem_gguf_linear
        self._fn.restype = c_int
        self._fn.argtypes = [c_int, ptr, i64, i64, i64, ptr, i64, ptr, i64, c_int]
        self._dequant = lib.tandem_gguf_dequant
        self._dequant.restype = c_int
        self._dequant.argtypes = [c_int, ptr, i64, i64, ptr, c_int]
        self._row_bytes = lib.tandem_gguf_row_bytes
        self._row_bytes.restype = i64
        self._row_bytes.argtypes = [c_int, i64]
        self.max_rows = lib.tandem_gguf_max_rows()  # input rows that share one decode of a weight block
        # the panel GEMM takes batches from this many rows on (0: this build has none, as plain C)
        self.gemm_min_rows = lib.tandem_gguf_gemm_min_rows()
        self._q8 = lib.tandem_gguf_linear_q8
        self._q8.restype = c_int
        self._q8.argtypes = self._fn.argtypes
        self._q8_takes = lib.tandem_gguf_q8_takes

    def q8_takes(self, qtype: int) -> bool:
        """Whether ggml type `qtype` has the int8-activation path (`int8=True`)."""
        return bool(self._q8_takes(qtype))

    def row_bytes(self, qtype: int, k: int) -> int:
        """Bytes of a row of k weights of ggml type `qtype`; 0 where the kernel does not take them."""
        return self._row_bytes(qtype, k)

    def _check(self, fn: str, qtype: int, w, k: int) -> int:
        rb = self._row_bytes(qtype, k)
        if rb == 0:
            raise ValueError(f"{fn}: ggml type {qtype} with {k} columns is not supported")
        _check_dtype(fn, "w", w, torch.uint8)
        _check_contiguous(fn, "w", w)
        if w.dim() != 2 or w.shape[1] != rb:
            raise ValueError(f"{fn}: w must be [N, {rb}] bytes, got {tuple(w.shape)}")
        return w.shape[0]

    def __call__(self, qtype: int, x, w, num_threads: int, out=None, int8: bool = False):
        """x: fp32 [M, K] (rows may be strided, elements contiguous); w: [N, row_bytes] -> fp32 [M, N]
        (into `out`, an fp32 [M, N] view with contiguous rows, where given). `int8`: x rounded to int8 per
        32 values first, as llama.cpp does (lossy; Q4_0, Q4_1, Q8_0)."""
        M, K = x.shape
        n = self._check("gguf_linear", qtype, w, K)
        _check_dtype("gguf_linear", "x", x, torch.float32)
        _check_stride("gguf_linear", "x", x, 1, 1)
        if out is None:
            out = torch.empty(M, n, dtype=torch.float32)
        else:
            _check_shape("gguf_linear", "out", out, (M, n))
            _check_dtype("gguf_linear", "out", out, torch.float32)
            _check_stride("gguf_linear", "out", out, 1, 1)
        rc = (self._q8 if int8 else self._fn)(qtype, x.data_ptr(), M, K, x.stride(0), w.data_ptr(), n,
                                              out.data_ptr(), out.stride(0), num_threads)
        if rc == -1:
            raise MemoryError("gguf_linear: out of memory")
        if rc == -2:
            raise ValueError(f"gguf_linear: ggml type {qtype} has no int8-activation path")
        return out

    def dequantize(self, qtype: int, w, k: int, num_threads: int = 1, out=None):
        """w: [N, row_bytes] -> fp32 [N, k], the numbers gguf's numpy dequantizer gives."""
        n = self._check("gguf_dequant", qtype, w, k)
        if out is None:
            out = torch.empty(n, k, dtype=torch.float32)
        else:
            _check_shape("gguf_dequant", "out", out, (n, k))
            _check_dtype("gguf_dequant", "out", out, torch.float32)
            _check_contiguous("gguf_dequant", "out", out)
        self._dequant(qtype, w.data_ptr(), n, k, out.data_ptr(), num_threads)
        return out


def gguf_linear(isa: str | None = None) -> GGUFLinear | None:
    """The GGUF linear kernel built for `isa` (default: `TANDEM_GGUF_ISA` where set, else the best level
    this CPU runs), or None where kernels are off or cannot be built here."""
    if isa is None:
        if (kern := _wrappers.get("gguf_linear")) is not None or "gguf_linear" in _wrappers:
            return kern  # the default, decided once per process
        isa = os.environ.get("TANDEM_GGUF_ISA") or isa_levels()[0]
        _wrappers["gguf_linear"] = kern = gguf_linear(isa)
        return kern
    if isa != "native" and isa not in _X86_LEVELS:
        raise ValueError(f"ISA level {isa!r} is not one of {['native', *_X86_LEVELS]}")
    key = f"gguf_linear:{isa}"
    if key not in _wrappers:
        lib = load("gguf_linear", isa)
        _wrappers[key] = GGUFLinear(lib, isa) if lib is not None else None
    return _wrappers[key]


class _Weight(ctypes.Structure):  # decode_step.c's tandem_weight
    _fields_ = [("n", ctypes.c_int32), ("int8", ctypes.c_int32), ("type", ctypes.c_int32 * 4),
                ("offset", ctypes.c_int64 * 4), ("rows", ctypes.c_int64 * 4), ("data", ctypes.c_void_p * 4)]


class _Layer(ctypes.Structure):  # tandem_layer
    _fields_ = [("input_norm", ctypes.c_void_p), ("post_norm", ctypes.c_void_p), ("qkv", _Weight), ("o", _Weight),
                ("gate_up", _Weight), ("down", _Weight), ("kv_cache", ctypes.c_void_p)]


class _Shape(ctypes.Structure):  # tandem_shape
    _fields_ = [(f, ctypes.c_int64) for f in ("hidden", "inter", "heads", "kv_heads", "head_dim", "num_blocks",
                                               "block_size")] + [("eps", ctypes.c_float), ("scale", ctypes.c_float),
                                                                 ("kv_fmt", ctypes.c_int32)]


class DecodeStep:
    """engine/kernels/decode_step.c: a decode step's decoder layers (fp32, GGUF weights, one TP rank) in
    one call. `plan` binds the layers' weights and caches once; a call passes the step's inputs."""

    MAX_SEGMENTS = 4

    def __init__(self, lib: ctypes.CDLL):
        ptr, i64 = ctypes.c_void_p, ctypes.c_int64
        self._fn = lib.tandem_decode_step
        self._fn.restype = ctypes.c_int
        self._fn.argtypes = [ptr, ctypes.c_int, ptr, ptr, i64, ptr, ptr, ptr, ptr, ptr, i64, ptr, ctypes.c_int]
        self.max_head_dim = lib.tandem_decode_attention_max_head_dim()

    @staticmethod
    def _weight(w) -> _Weight:
        """A GGUFWeight's segments (offset, ggml type, name, [rows, bytes] tensor)."""
        out = _Weight()
        out.n, out.int8 = len(w.segments), w.int8_activations
        for i, (offset, qtype, _, data) in enumerate(w.segments):
            out.type[i], out.offset[i], out.rows[i], out.data[i] = qtype, offset, data.shape[0], data.data_ptr()
        return out

    def plan(self, layers: list[dict], kv_caches: list, hidden: int, inter: int, heads: int, kv_heads: int,
             head_dim: int, eps: float, scale: float):
        """layers: per layer {input_norm, post_norm: fp32 [hidden] tensors; qkv, o, gate_up, down: GGUFWeights
        of at most MAX_SEGMENTS runs}; kv_caches: fp32 [2, blocks, KVH, bs, D] each, or all quantized alike
        (engine/kv_quant.py: rows of D + 4 bytes). The tensors must stay where they are while the plan is used
        (weights and caches are allocated once)."""
        arr = (_Layer * len(layers))()
        for i, (desc, cache) in enumerate(zip(layers, kv_caches)):
            arr[i].input_norm, arr[i].post_norm = desc["input_norm"].data_ptr(), desc["post_norm"].data_ptr()
            for name in ("qkv", "o", "gate_up", "down"):
                setattr(arr[i], name, self._weight(desc[name]))
            arr[i].kv_cache = cache.data_ptr()
        _, num_blocks, _, bs, _ = kv_caches[0].shape
        shape = _Shape(hidden, inter, heads, kv_heads, head_dim, num_blocks, bs, eps, scale,
                       KV_FORMATS[cache_format(kv_caches[0])])
        return arr, shape, (layers, kv_caches)  # the last keeps what the pointers point at alive

    def __call__(self, plan, h, cos, sin, slot_blocks, slot_offsets, block_tables, lens, num_threads: int):
        """h: fp32 [B, hidden] contiguous, updated in place; cos, sin: [B, D]; int64 slots, lens [B] and block
        tables [B, nb], as DecodeAttention takes them."""
        arr, shape, _ = plan
        B = h.shape[0]
        rc = self._fn(arr, len(arr), ctypes.byref(shape), h.data_ptr(), B, cos.data_ptr(), sin.data_ptr(),
                      slot_blocks.data_ptr(), slot_offsets.data_ptr(), block_tables.data_ptr(), block_tables.shape[1],
                      lens.data_ptr(), num_threads)
        if rc == -1:
            raise MemoryError("decode_step: out of memory")
        if rc != 0:
            raise ValueError(f"decode_step: a shape or weight type it does not take (code {rc})")
        return h


def decode_step() -> DecodeStep | None:
    """The fused decode step, built for the ISA level gguf_linear uses, or None where it cannot be built
    (or kernels are off)."""
    if "decode_step" not in _wrappers:
        isa = gguf_linear().isa if gguf_linear() is not None else None
        lib = load("decode_step", isa) if isa is not None else None
        _wrappers["decode_step"] = DecodeStep(lib) if lib is not None else None
    return _wrappers["decode_step"]
