"""The transfer plan: which source rank sends which (layers, KV heads) to which destination rank.

Pure function of the two sides' KV layouts. Prefill worker P and decode worker D may differ in TP and
PP. A destination rank needs every (layer, head) it holds, exactly once; when a head is replicated
on several source ranks (tp > num_kv_heads), the copies are spread over the destination ranks.

    P: tp=2, pp=1 (heads 0-1 | 2-3)          D: tp=1, pp=2 (layers 0-1 | 2-3)
        src (0,0) -> dst (0,0): layers [0,2) heads [0,2)
        src (1,0) -> dst (0,0): layers [0,2) heads [2,4)
        src (0,0) -> dst (0,1): layers [2,4) heads [0,2)
        src (1,0) -> dst (0,1): layers [2,4) heads [2,4)
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from common.kv_layout import QUANTIZED_KV, KVLayoutSpec
from engine.partition import check_kv_tp, kv_head_range, stage_layers


class IncompatibleLayouts(ValueError):
    """P and D cannot exchange KV (different model shape, block size, KV cache dtype, or dtypes that do not
    convert). Raised before any page moves: by the sender's plan and by the receiver's reservation."""


# KV dtypes that interoperate: pages travel in the sender's cache dtype and the receiver casts them into
# its own on insert (round to nearest even), so workers that resolved `--dtype auto` differently on their
# hosts (bf16 with AMX, fp32 on AVX2; engine/platform.py) still pair up
FLOAT_KV_DTYPES = ("float32", "bfloat16", "float16")


def kv_dtypes_compatible(src: str, dst: str) -> bool:
    """Whether pages of cache dtype `src` can go into a cache of dtype `dst`."""
    return src == dst or (src in FLOAT_KV_DTYPES and dst in FLOAT_KV_DTYPES)


class KVLayout(KVLayoutSpec, frozen=True):
    """The KV cache shape of one worker (all its ranks): common.kv_layout's wire schema, checked, with
    the arithmetic of which rank holds which layers and heads. Decoding into it (KV messages) checks
    it too: a bad layout is a malformed message."""

    @classmethod
    def from_spec(cls, spec: KVLayoutSpec) -> KVLayout:
        """A layout that came in a message typed by the schema alone (raises ValueError if it is bad)."""
        return spec if isinstance(spec, KVLayout) else cls(*(getattr(spec, f) for f in spec.__struct_fields__))

    @classmethod
    def of(cls, model_cfg, config) -> KVLayout:
        """The layout of a worker serving `model_cfg` (engine ModelConfig) with `config` (EngineConfig)."""
        par = config.parallel
        return cls(model_cfg.num_hidden_layers, model_cfg.num_key_value_heads, model_cfg.head_dim,
                   config.cache.block_size, config.device.dtype, par.tp, par.pp,
                   kv_cache_dtype=config.cache.kv_cache_dtype, model_id=model_digest(model_cfg))

    def __post_init__(self):
        if self.tp < 1 or self.pp < 1:
            raise ValueError(f"tp = {self.tp}, pp = {self.pp} must be positive")
        if self.kv_cache_dtype not in ("auto", *QUANTIZED_KV):
            raise ValueError(f"kv_cache_dtype = {self.kv_cache_dtype!r} must be 'auto' or one of {QUANTIZED_KV}")
        if self.pp > self.num_layers:
            raise ValueError(f"pp = {self.pp} exceeds num_layers = {self.num_layers}")
        check_kv_tp(self.num_kv_heads, self.tp)

    @property
    def num_ranks(self) -> int:
        return self.tp * self.pp

    def layers(self, pp_rank: int) -> tuple[int, int]:
        return stage_layers(self.num_layers, self.pp, pp_rank, self.pp_partition)

    def heads(self, tp_rank: int) -> tuple[int, int]:
        return kv_head_range(self.num_kv_heads, self.tp, tp_rank)

    def rank(self, tp_rank: int, pp_rank: int) -> int:
        """Flat rank of (tp_rank, pp_rank): pp-major, like torch.distributed worlds of TP groups."""
        return pp_rank * self.tp + tp_rank

    def coords(self, rank: int) -> tuple[int, int]:
        return rank % self.tp, rank // self.tp


@dataclass(frozen=True)
class TransferItem:
    src_rank: int
    dst_rank: int
    layers: tuple[int, int]  # [start, end) global layer ids
    heads: tuple[int, int]  # [start, end) global KV head ids


def model_digest(model_cfg) -> str:
    """KVLayoutSpec.model_id of a model: 16 hex digits of its identity."""
    return hashlib.blake2b(model_cfg.identity().encode(), digest_size=8).hexdigest()


def check_compatible(src: KVLayout, dst: KVLayout) -> None:
    if src.model_id and dst.model_id and src.model_id != dst.model_id:
        raise IncompatibleLayouts(f"KV of different models: prefill serves model {src.model_id}, decode serves "
                                  f"{dst.model_id} (the digest of each one's config: its weights' shapes, RoPE and "
                                  "its LongRoPE factor set; pair workers of one model, with one --max-model-len "
                                  "for LongRoPE models)")
    # a quantized page is codes and scales: only a cache of the same format can take it, and a float cache's
    # pages cannot land in a quantized one (nothing here quantizes or dequantizes pages in flight)
    if src.kv_cache_dtype != dst.kv_cache_dtype:
        raise IncompatibleLayouts(f"KV cache dtypes differ: prefill stores {src.page_dtype!r} "
                                  f"(--kv-cache-dtype {src.kv_cache_dtype}), decode stores {dst.page_dtype!r} "
                                  f"(--kv-cache-dtype {dst.kv_cache_dtype}); a quantized KV cache pairs only with "
                                  "the same --kv-cache-dtype")
    for name in ("num_layers", "num_kv_heads", "head_dim", "block_size"):
        a, b = getattr(src, name), getattr(dst, name)
        if a != b:
            raise IncompatibleLayouts(f"KV layouts differ in {name}: prefill has {a!r}, decode has {b!r}"
                                      + (" (block sizes must match; configure both workers alike)"
                                         if name == "block_size" else ""))
    if not kv_dtypes_compatible(src.dtype, dst.dtype):
        raise IncompatibleLayouts(f"KV layouts differ in dtype: prefill has {src.dtype!r}, decode has {dst.dtype!r} "
                                  f"(only the float dtypes {FLOAT_KV_DTYPES} convert into each other)")


def plan_transfer(src: KVLayout, dst: KVLayout) -> list[TransferItem]:
    check_compatible(src, dst)
    items: list[TransferItem] = []
    uses: dict[tuple[int, int], int] = {}  # (source stage, head) -> destinations served so far
    for d in range(dst.num_ranks):
        d_tp, d_pp = dst.coords(d)
        dl0, dl1 = dst.layers(d_pp)
        dh0, dh1 = dst.heads(d_tp)
        for s_pp in range(src.pp):
            sl0, sl1 = src.layers(s_pp)
            l0, l1 = max(dl0, sl0), min(dl1, sl1)
            if l0 >= l1:
                continue
            # per head, the source TP rank that sends it; consecutive heads from one rank form a range
            owners = []
            for h in range(dh0, dh1):
                holders = [t for t in range(src.tp) if src.heads(t)[0] <= h < src.heads(t)[1]]
                n = uses.get((s_pp, h), 0)
                uses[(s_pp, h)] = n + 1
                owners.append(holders[n % len(holders)])  # round-robin over the replicas
            start = dh0
            for i in range(1, len(owners) + 1):
                if i == len(owners) or owners[i] != owners[i - 1]:
                    items.append(TransferItem(src.rank(owners[i - 1], s_pp), d, (l0, l1), (start, dh0 + i)))
                    start = dh0 + i
    return items


def items_from(items: list[TransferItem], src_rank: int) -> list[TransferItem]:
    return [it for it in items if it.src_rank == src_rank]


def items_to(items: list[TransferItem], dst_rank: int) -> list[TransferItem]:
    return [it for it in items if it.dst_rank == dst_rank]
