"""Hand-written CPU kernels, compiled on first use for the CPU at hand.

A kernel is a C file next to this module, built with the system C compiler (`cc`, `-O3 -march=native
-fopenmp`) into a shared library under the cache directory (`$TANDEM_CACHE_DIR/kernels`), keyed by a
hash of the source, the compiler and this CPU's feature flags, so a cache shared between machines
never hands one CPU another's instructions. It is loaded with ctypes (plain C: no torch headers, a
build takes about a second) and called on tensors' data pointers. Where no compiler is found or the
build fails, `load()` returns None once, logs why (`build_error()` keeps it), and callers keep torch's
kernels. `TANDEM_CPU_KERNELS=0` turns them off.

OpenMP: the library links `libgomp.so.1`, which torch has already loaded, so its parallel regions run
on torch's own thread pool (no second pool spinning against it).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import re
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch  # first: its libgomp.so.1 is the OpenMP runtime the kernels link

from engine.kv_quant import cache_format, row_width
from engine.platform import cpu_flags

log = logging.getLogger(__name__)

# a cache's format (engine/kv_quant.py; None: the activations' dtype) -> kvquant.h's number for it
KV_FORMATS = {None: 0, "int8": 1, "fp8_e4m3": 2}

_HERE = Path(__file__).resolve().parent
_lock = threading.Lock()
_loaded: dict[str, ctypes.CDLL | None] = {}
_errors: dict[str, str] = {}  # name -> why it did not build


def _cache_dir() -> Path:
    root = os.environ.get("TANDEM_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "tandem")
    return Path(root) / "kernels"


def enabled(name: str) -> bool:
    """`TANDEM_CPU_KERNELS`: unset or 1 = all, 0 = none, else a comma-separated list of the kernels
    to use (`int8_linear,elementwise`), the rest falling back to torch (A/B comparisons)."""
    value = os.environ.get("TANDEM_CPU_KERNELS", "1").strip().lower()
    if value in ("1", "true", "yes", "on", "all", ""):
        return True
    if value in ("0", "false", "no", "off", "none"):
        return False
    return name in {v.strip() for v in value.split(",")}


_versions: dict[str, str] = {}


def _compiler_version(cc: str) -> str:
    if cc not in _versions:  # once per process: a subprocess costs milliseconds
        _versions[cc] = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    return _versions[cc]


def compiler() -> str | None:
    """The C compiler kernels are built with: `$CC` where set, else `cc` or `gcc` on PATH; None where
    there is none (then no kernel is built, and that is not an error)."""
    cc = os.environ.get("CC")
    if cc:
        return shutil.which(cc)
    return shutil.which("cc") or shutil.which("gcc")


# x86 levels a kernel may be built for besides the CPU at hand (`-march=native`): kernels whose source
# is ISA-neutral are built once per level this CPU runs and picked at run time (`isa_levels`)
_X86_LEVELS = {
    "avx512": ("x86-64-v4", ("avx512f", "avx512bw", "avx512dq", "avx512vl", "avx2", "fma", "f16c")),
    "avx2": ("x86-64-v3", ("avx2", "fma", "f16c", "bmi2")),
    "generic": ("x86-64", ()),
}


def isa_levels() -> list[str]:
    """The ISA levels this CPU runs, best first: `avx512`, `avx2`, `generic` on x86-64; `native`
    elsewhere (the compiler's own target)."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return ["native"]
    have = set(cpu_flags().split())
    return [name for name, (_, need) in _X86_LEVELS.items() if all(f in have for f in need)]


def _build(name: str, src: Path, isa: str = "native") -> Path:
    cc = compiler()
    if cc is None:
        where = f"$CC = {os.environ['CC']!r} is not found" if os.environ.get("CC") else "no cc/gcc on PATH"
        raise RuntimeError(f"no C compiler ({where})")
    version = _compiler_version(cc)
    march = ["-march=native"] if isa == "native" else [f"-march={_X86_LEVELS[isa][0]}", "-mtune=generic"]
    flags = ["-O3", *march, "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC", "-std=gnu11"]
    # what the source may include: the headers here, and sources it includes whole (decode_step.c)
    headers = [h.read_text() for h in sorted(src.parent.glob("*.h"))]
    headers += [(src.parent / f).read_text() for f in re.findall(r'^#include "(\w+\.c)"', src.read_text(), re.M)]
    key = hashlib.sha256("\0".join([src.read_text(), *headers, version, " ".join(flags), cpu_flags()]).encode())
    out = _cache_dir() / f"{name}{'' if isa == 'native' else '-' + isa}-{key.hexdigest()[:16]}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # build beside the target and rename: workers starting together may build at once
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        r = subprocess.run([cc, *flags, str(src), "-o", tmp], capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            raise RuntimeError(f"{cc} failed building {src.name}: {r.stderr.strip()[-2000:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def load(name: str, isa: str = "native") -> ctypes.CDLL | None:
    """The built library `name` (from `name.c` here) for ISA level `isa` (`native`: the CPU at hand),
    or None where kernels are off or cannot be built. Built and loaded once per process."""
    key = name if isa == "native" else f"{name}:{isa}"
    with _lock:
        if key in _loaded:
            return _loaded[key]
        lib = None
        _errors.pop(key, None)
        if enabled(name):
            try:
                lib = ctypes.CDLL(str(_build(name, _HERE / f"{name}.c", isa)))
            except Exception as e:  # no compiler, a compile error, a read-only cache
                log.warning("CPU kernel %s unavailable, using torch's instead: %s", key, e)
                _errors[key] = f"{type(e).__name__}: {e}"
        _loaded[key] = lib
        return lib


def build_error(name: str) -> str | None:
    """Why `load(name)` gave None though kernels are on (no compiler, a compile error, a failed load),
    or None: it loaded, is turned off, or has not been tried in this process."""
    with _lock:
        return _errors.get(name) if name in _loaded and _loaded[name] is None else None


_wrappers: dict[str, object] = {}


# Argument checks of the wrappers below: the C code trusts every shape, stride and dtype it is given, so
# a wrong one would read or write out of bounds. Real exceptions, not `assert` (gone under `python -O`).
def _check_stride(fn: str, name: str, t, dim: int, expected: int) -> None:
    if t.stride(dim) != expected:
        raise ValueError(f"{fn}: {name} needs stride {expected} in dim {dim}, got strides {tuple(t.stride())} "
                         f"(shape {tuple(t.shape)})")


def _check_contiguous(fn: str, name: str, t) -> None:
    if not t.is_contiguous():
        raise ValueError(f"{fn}: {name} must be contiguous, got strides {tuple(t.stride())} "
                         f"(shape {tuple(t.shape)})")


def _check_shape(fn: str, name: str, t, expected) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{fn}: {name} must have shape {tuple(expected)}, got {tuple(t.shape)}")


def _check_dtype(fn: str, name: str, t, expected) -> None:
    if t.dtype != expected:
        raise TypeError(f"{fn}: {name} must be {expected}, got {t.dtype}")


def _wrapped(name: str, cls):
    """`cls` around library `name`, made once per process; None where it is not built."""
    if name not in _wrappers:
        lib = load(name)
        _wrappers[name] = cls(lib) if lib is not None else None
    return _wrappers[name]


class Int8Linear:
    """engine/kernels/int8_linear.c: y = (x @ w.T) * scale + bias for a few rows of x (fp32 or bf16)
    and an int8 weight in the kernel's packed layout (`pack`)."""

    def __init__(self, lib: ctypes.CDLL):
        self._fn = fn = lib.tandem_int8_linear
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                       ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
        self.rows = lib.tandem_int8_rows_per_group()
        self.k_block = lib.tandem_int8_k_block()

    def pack(self, w):
        """[N, K] int8 -> [ceil(N / R), Kp / KB, R, KB], zero-padded: the order the kernel reads."""
        N, K = w.shape
        R, KB = self.rows, self.k_block
        Np, Kp = -(-N // R) * R, -(-K // KB) * KB
        w = torch.nn.functional.pad(w, (0, Kp - K, 0, Np - N))
        return w.reshape(Np // R, R, Kp // KB, KB).permute(0, 2, 1, 3).contiguous()

    def unpack(self, packed, n: int, k: int):
        """The [n, k] int8 rows of a packed weight (a copy)."""
        G, Kb, R, KB = packed.shape
        return packed.permute(0, 2, 1, 3).reshape(G * R, Kb * KB)[:n, :k].contiguous()

    def __call__(self, x, packed, n: int, scale, bias, num_threads: int):
        """x: contiguous [M, K]; scale, bias: contiguous fp32 [n] (bias may be None). Pointers are taken
        at each call (never cached: a tensor may move)."""
        M, K = x.shape
        y = torch.empty((M, n), dtype=x.dtype)
        if self._fn(x.data_ptr(), x.dtype is torch.bfloat16, M, K, packed.data_ptr(), n, scale.data_ptr(),
                    None if bias is None else bias.data_ptr(), y.data_ptr(), num_threads):
            raise MemoryError("int8_linear: out of memory")
        return y


def int8_linear() -> Int8Linear | None:
    """The int8 linear kernel, or None where kernels are off or cannot be built here."""
    return _wrapped("int8_linear", Int8Linear)


class DecodeAttention:
    """engine/kernels/decode_attention.c: RoPE, the KV cache write and paged attention of a step in
    which every sequence adds one token, in one call per layer (see `engine.attention`)."""

    def __init__(self, lib: ctypes.CDLL):
        self._fn = fn = lib.tandem_decode_attention
        fn.restype = ctypes.c_int
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        fn.argtypes = [ptr, ptr, ptr, i64, i64, ptr, ptr, ptr, i64, i64, ptr, ptr, ptr, i64, ptr, i64, i64, i64,
                       i64, ctypes.c_float, ctypes.c_int, ctypes.c_int, ptr, ctypes.c_int]
        self.max_head_dim = lib.tandem_decode_attention_max_head_dim()

    def supports(self, head_dim: int, dtype, kv_format: str | None = None) -> bool:
        """Activations of `dtype`; a cache of that dtype, or quantized (`kv_format`: engine/kv_quant.py)."""
        return head_dim % 16 == 0 and head_dim <= self.max_head_dim and dtype in (torch.float32, torch.bfloat16) \
            and kv_format in KV_FORMATS

    def __call__(self, q, k, v, cos, sin, kv_cache, slot_blocks, slot_offsets, block_tables, lens, scale: float,
                 num_threads: int):
        """q [B, H, D], k/v [B, KVH, D] (rows may be strided slices), cos/sin [B, D] contiguous, kv_cache
        [2, blocks, KVH, bs, D] contiguous (rows of D + 4 bytes quantized), int64 slot_blocks/slot_offsets/lens
        [B], block_tables [B, nb] -> out [B, H, D]. Writes the rotated k and v into the cache."""
        B, H, D = q.shape
        KVH = k.shape[1]
        _, num_blocks, _, bs, row = kv_cache.shape
        fn = "decode_attention"
        fmt = cache_format(kv_cache)
        if kv_cache.dtype != q.dtype and fmt is None:
            raise TypeError(f"{fn}: kv_cache must be {q.dtype} or quantized, got {kv_cache.dtype}")
        _check_contiguous(fn, "kv_cache", kv_cache)
        if row != row_width(fmt, D):
            raise ValueError(f"{fn}: kv_cache rows of {row} elements, expected {row_width(fmt, D)} for head size {D}")
        _check_stride(fn, "q", q, 1, D)
        _check_stride(fn, "q", q, 2, 1)
        if k.stride() != v.stride():
            raise ValueError(f"{fn}: k and v must have the same strides, got {tuple(k.stride())} and "
                             f"{tuple(v.stride())}")
        _check_stride(fn, "k", k, 1, D)
        out = torch.empty(B, H, D, dtype=q.dtype)
        rc = self._fn(q.data_ptr(), k.data_ptr(), v.data_ptr(), q.stride(0), k.stride(0), cos.data_ptr(),
                      sin.data_ptr(), kv_cache.data_ptr(), num_blocks, bs, slot_blocks.data_ptr(),
                      slot_offsets.data_ptr(), block_tables.data_ptr(), block_tables.shape[1], lens.data_ptr(), B,
                      H, KVH, D, scale, q.dtype == torch.bfloat16, KV_FORMATS[fmt], out.data_ptr(), num_threads)
        if rc == -1:
            raise MemoryError("decode_attention: out of memory")
        if rc != 0:
            raise ValueError(f"decode_attention: head size {D} is not supported")
        return out


def decode_attention() -> DecodeAttention | None:
    """The fused decode attention kernel, or None where kernels are off or cannot be built here."""
    return _wrapped("decode_attention", DecodeAttention)


MAX_NORM_WIDTH = 1 << 16  # elementwise.c's add_rms_norm


class Elementwise:
    """engine/kernels/elementwise.c: SwiGLU's silu(gate) * up, RoPE and the KV cache write of a step's
    new tokens, one pass each."""

    def __init__(self, lib: ctypes.CDLL):
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        self._silu_mul = lib.tandem_silu_mul
        self._silu_mul.restype = ctypes.c_int
        self._silu_mul.argtypes = [ptr, i64, ptr, i64, i64, i64, ptr, ctypes.c_int, ctypes.c_int]
        self._rope = lib.tandem_rope
        self._rope.restype = ctypes.c_int
        self._rope.argtypes = [ptr, i64, i64, i64, i64, ptr, ptr, ptr, ctypes.c_int, ctypes.c_int]
        self._write_kv = lib.tandem_write_kv
        self._write_kv.restype = ctypes.c_int
        self._write_kv.argtypes = [ptr, i64, ptr, i64, i64, i64, i64, ptr, i64, i64, ptr, ptr, i64, ctypes.c_int]
        self._write_kv_quant = lib.tandem_write_kv_quant
        self._write_kv_quant.restype = ctypes.c_int
        self._write_kv_quant.argtypes = [ptr, i64, ptr, i64, i64, i64, i64, ptr, i64, i64, ptr, ptr, ctypes.c_int,
                                         ctypes.c_int, ctypes.c_int]
        self._add_rms_norm = lib.tandem_add_rms_norm
        self._add_rms_norm.restype = ctypes.c_int
        self._add_rms_norm.argtypes = [ptr, i64, ptr, i64, ptr, ptr, i64, i64, ctypes.c_float, ptr, ctypes.c_int,
                                       ctypes.c_int]

    @staticmethod
    def takes(t, width: int) -> bool:
        """Whether a [rows, ...] CPU tensor of fp32/bf16 with `width`-element vectors can go through."""
        return t.device.type == "cpu" and t.dtype in (torch.float32, torch.bfloat16) and width % 16 == 0

    def silu_mul(self, gate, up, num_threads: int):
        """gate, up: [T, I] (rows may be strided, elements contiguous) -> silu(gate) * up, contiguous."""
        T, inter = gate.shape
        _check_stride("silu_mul", "gate", gate, 1, 1)
        _check_stride("silu_mul", "up", up, 1, 1)
        _check_shape("silu_mul", "up", up, gate.shape)
        _check_dtype("silu_mul", "up", up, gate.dtype)
        out = torch.empty(T, inter, dtype=gate.dtype)
        rc = self._silu_mul(gate.data_ptr(), gate.stride(0), up.data_ptr(), up.stride(0), T, inter, out.data_ptr(),
                            gate.dtype == torch.bfloat16, num_threads)
        if rc != 0:
            raise ValueError(f"silu_mul: width {inter} is not a multiple of 16")
        return out

    def rope(self, x, cos, sin, num_threads: int):
        """x: [T, heads, D] (rows may be strided, heads contiguous in a row); cos, sin: [T, D]
        contiguous -> rotated copy [T, heads, D], contiguous."""
        T, heads, D = x.shape
        _check_stride("rope", "x", x, 2, 1)
        _check_stride("rope", "x", x, 1, D)
        _check_contiguous("rope", "cos", cos)
        _check_contiguous("rope", "sin", sin)
        out = torch.empty(T, heads, D, dtype=x.dtype)
        rc = self._rope(x.data_ptr(), x.stride(0), T, heads, D, cos.data_ptr(), sin.data_ptr(), out.data_ptr(),
                        x.dtype == torch.bfloat16, num_threads)
        if rc != 0:
            raise ValueError(f"rope: head size {D} is not supported")
        return out

    def add_rms_norm(self, h, weight, eps: float, num_threads: int, a=None):
        """bf16 or fp32 [T, N] rows (strided rows allowed, elements contiguous): RMSNorm(h + a) with
        transformers' roundings -> (normed, h + a) (h + a is None when `a` is; see elementwise.c for the
        numerics)."""
        T, N = h.shape
        fn = "add_rms_norm"
        if h.dtype not in (torch.bfloat16, torch.float32):
            raise TypeError(f"{fn}: h must be bfloat16 or float32, got {h.dtype}")
        _check_dtype(fn, "weight", weight, h.dtype)
        _check_stride(fn, "h", h, 1, 1)
        _check_contiguous(fn, "weight", weight)
        if weight.numel() != N:
            raise ValueError(f"{fn}: weight must have {N} elements (the width of h), got {weight.numel()}")
        if a is not None:
            _check_shape(fn, "a", a, h.shape)
            _check_dtype(fn, "a", a, h.dtype)
            _check_stride(fn, "a", a, 1, 1)
        out = torch.empty(T, N, dtype=h.dtype)
        x = torch.empty(T, N, dtype=h.dtype) if a is not None else None
        rc = self._add_rms_norm(h.data_ptr(), h.stride(0), a.data_ptr() if a is not None else None,
                                a.stride(0) if a is not None else 0, x.data_ptr() if x is not None else None,
                                weight.data_ptr(), T, N, eps, out.data_ptr(), h.dtype == torch.bfloat16, num_threads)
        if rc != 0:
            raise ValueError(f"add_rms_norm: width {N} is not a multiple of 16 up to {MAX_NORM_WIDTH}")
        return out, x

    def write_kv(self, k, v, kv_cache, slot_blocks, slot_offsets, num_threads: int) -> bool:
        """k, v [T, KVH, D] into their slots of kv_cache [2, blocks, KVH, bs, D] (contiguous, same
        dtype, CPU; int64 slots), or quantized into a quantized cache's rows of D + 4 bytes (k, v fp32
        or bf16, D a multiple of 16). False (nothing written) where the tensors do not fit that."""
        T, KVH, D = k.shape
        fmt = cache_format(kv_cache)
        if not (kv_cache.is_contiguous() and k.dtype == v.dtype and k.shape == v.shape
                and (kv_cache.dtype == k.dtype if fmt is None else self.takes(k, D))
                and k.stride(2) == v.stride(2) == 1 and k.stride(1) == v.stride(1) == D
                and kv_cache.shape[2] == KVH and kv_cache.shape[4] == row_width(fmt, D)
                and slot_blocks.dtype == slot_offsets.dtype == torch.long and slot_blocks.is_contiguous()
                and slot_offsets.is_contiguous() and kv_cache.device.type == k.device.type == "cpu"):
            return False
        _, num_blocks, _, bs, _ = kv_cache.shape
        if fmt is not None:
            return self._write_kv_quant(k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0), T, KVH, D,
                                        kv_cache.data_ptr(), num_blocks, bs, slot_blocks.data_ptr(),
                                        slot_offsets.data_ptr(), k.dtype == torch.bfloat16, KV_FORMATS[fmt],
                                        num_threads) == 0
        self._write_kv(k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0), T, KVH, D, kv_cache.data_ptr(), num_blocks, bs,
                       slot_blocks.data_ptr(), slot_offsets.data_ptr(), k.element_size(), num_threads)
        return True


def elementwise() -> Elementwise | None:
    """The fused elementwise kernels, or None where kernels are off or cannot be built here."""
    return _wrapped("elementwise", Elementwise)


def load_all() -> None:
    """Builds (first time on this machine) and loads every kernel now: at engine start-up, so that no
    compile or library load lands inside a timed step (the start-up cost profile, a first request)."""
    int8_linear()
    decode_attention()
    elementwise()
    gguf_linear()
    decode_step()


# the GGUF kernels' wrappers live in their own module, on the machinery above
from engine.kernels.gguf import GGUF_TYPES, DecodeStep, GGUFLinear, decode_step, gguf_linear  # noqa: E402

__all__ = ["GGUF_TYPES", "DecodeAttention", "DecodeStep", "Elementwise", "GGUFLinear", "Int8Linear", "build_error",
           "compiler", "decode_attention", "decode_step", "elementwise", "enabled", "gguf_linear", "int8_linear",
           "isa_levels", "load", "load_all"]
