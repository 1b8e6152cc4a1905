"""KV cache tensors, allocated once from a memory budget."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from engine.config import CacheConfig
from engine.kv_quant import STORAGE, row_width

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KVCacheSpec:
    num_layers: int  # layers held by this rank (its pipeline stage)
    num_kv_heads: int  # KV heads held by this rank (its TP shard)
    head_dim: int
    block_size: int
    dtype: torch.dtype  # the model's
    kv_cache_dtype: str = "auto"  # "auto": the cache holds `dtype`; else a format of engine/kv_quant.py

    @property
    def storage_dtype(self) -> torch.dtype:
        return self.dtype if self.kv_cache_dtype == "auto" else STORAGE[self.kv_cache_dtype]

    @property
    def row_width(self) -> int:
        """Elements of one (token, KV head) row: head_dim, or head_dim + 4 bytes with the scale."""
        return row_width(None if self.kv_cache_dtype == "auto" else self.kv_cache_dtype, self.head_dim)

    @property
    def page_bytes(self) -> int:
        """One block of one layer: K and V (with their scales, quantized)."""
        itemsize = torch.empty((), dtype=self.storage_dtype).element_size()
        return 2 * self.block_size * self.num_kv_heads * self.row_width * itemsize

    @property
    def block_bytes(self) -> int:
        return self.page_bytes * self.num_layers


def available_memory(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def kv_cache_budget(cfg: CacheConfig, device: torch.device) -> int:
    if cfg.kv_cache_memory is not None:
        return cfg.kv_cache_memory
    if device.type == "cuda":
        return int(available_memory(device) * cfg.kv_cache_memory_fraction)
    return min(cfg.cpu_kv_cache_default, int(available_memory(device) * 0.5))


def allocate_kv_cache(spec: KVCacheSpec, num_blocks: int, device: torch.device) -> list[torch.Tensor]:
    # NOTE: zeros, not empty: attention reads padded slots under a mask, and 0 * NaN garbage is NaN.
    return [torch.zeros(2, num_blocks, spec.num_kv_heads, spec.block_size, spec.row_width,
                        dtype=spec.storage_dtype, device=device) for _ in range(spec.num_layers)]
