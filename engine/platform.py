"""Process-level settings for the model loop: threads, the CPU memory allocator, and what this host's
CPU or GPU computes natively (the dtype `auto` means here)."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import platform
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.config import DeviceConfig

log = logging.getLogger(__name__)

# CPU features that compute bf16 in hardware (AVX-512 bf16 dot products, AMX tiles): `auto` means bf16
# only there. Elsewhere bf16 arithmetic is emulated, or done in fp32 between conversions (AVX2: `needs_fp32`
# in engine/layers/quantization.py), so fp32 is the default
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_tuned = False


def cpu_flags() -> str:
    """This CPU's feature flags as /proc/cpuinfo lists them (its `flags` or, on Arm, `Features` line);
    the processor's name where there is no such file."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def resolve_dtype(dtype: str, device: str) -> str:
    """The dtype a worker computes in on `device` of this host: `dtype` itself, or for `auto` bfloat16
    on a CUDA device that supports it (else float16), bfloat16 on a CPU with native bf16 arithmetic
    (`NATIVE_BF16_FLAGS`), float32 on any other CPU. Each worker resolves it on its own host, since
    hosts differ; the KV of different float dtypes still interoperates (kvtransfer/plan.py)."""
    if dtype != "auto":
        return dtype
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ValueError(f"dtype = 'auto' on device {device!r}: CUDA is not available on this host")
        # bf16 arithmetic from compute capability 8.0 (Ampere) on, and on every ROCm GPU; older GPUs only
        # emulate it (torch.cuda.is_bf16_supported counts those, and looks at the current device only)
        native = bool(torch.version.hip) or torch.cuda.get_device_capability(torch.device(device)) >= (8, 0)
        return "bfloat16" if native else "float16"
    have = set(cpu_flags().split())
    return "bfloat16" if any(f in have for f in NATIVE_BF16_FLAGS) else "float32"


def resolve_device(config: DeviceConfig) -> DeviceConfig:
    """`config` with `auto` replaced by the dtype it means on this host's device (the same object
    where it names one). The engine resolves once, at start, so everything after it (the model, the KV
    cache, the KV layout a worker registers, prefix-cache hashes) sees a real dtype."""
    dtype = resolve_dtype(config.dtype, config.device)
    return config if dtype == config.dtype else replace(config, dtype=dtype)


def tune_cpu_allocator() -> bool:
    """Keep freed memory in glibc's heap instead of returning it to the OS.

    NOTE: activations of a prefill are tens of MB; glibc serves such sizes with fresh mmaps and unmaps
    them on free, so every step page-faults its buffers again (measured: ~25% of prefill time on a
    135M model). Raising the mmap and trim thresholds makes the heap keep and reuse them, as tcmalloc
    or jemalloc would. The price: the process keeps its peak heap size.
    """
    global _tuned
    if _tuned:
        return True
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    except (OSError, AttributeError):  # not glibc
        ok = False
    if not ok:
        log.info("malloc tuning unavailable (not glibc); continuing with the default allocator")
    _tuned = ok
    return ok


def setup_process(device: str, num_threads: int, tune_malloc: bool) -> None:
    import torch

    torch.set_num_threads(num_threads)
    if tune_malloc and device == "cpu":
        tune_cpu_allocator()
