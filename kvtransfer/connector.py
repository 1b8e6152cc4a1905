"""A prefill worker's KV connector plan (engine/connector.py's seam, typed): which sequence's pages go
to which decode ranks' blocks, and how they travel. The driver's scheduler side builds one per step,
the engine carries it encoded to every rank, each rank's connector (prefill/shipping.py) decodes it.

    ShipPlan(path, items) ── items: one per prompt this step completes
        ShipItem(seq_id, request_id, attempt, dst_layout, dst_endpoints, src_block_ids, dst_block_ids)
"""

from __future__ import annotations

import msgspec

from common.kv_layout import KVLayoutSpec


class DataPath(msgspec.Struct, frozen=True):
    """How this worker's pages travel (engine KVTransferConfig, resolved for its device)."""
    backend: str | None = None  # torch.distributed pair groups ("gloo" | "nccl"); None: ZeroMQ control
    device: str = "cpu"  # where the pair group's payloads live
    timeout_s: float = 30.0  # a stalled pairing or stream write fails after this long
    stream: bool = False  # the "tcp" transport: pages on each receiver's page stream


class ShipItem(msgspec.Struct, frozen=True):
    seq_id: int  # the engine's sequence whose prompt completes in this step
    request_id: str
    attempt: int
    dst_layout: KVLayoutSpec  # the decode worker's
    dst_endpoints: list[str]  # one per decode rank
    src_block_ids: list[int]  # this worker's blocks, pinned until the decode worker acknowledges
    dst_block_ids: list[int]  # the blocks the decode worker reserved, in the same order


class ShipPlan(msgspec.Struct, frozen=True):
    path: DataPath
    items: list[ShipItem]


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(ShipPlan)


def encode_plan(plan: ShipPlan) -> bytes:
    return _encoder.encode(plan)


def decode_plan(data: bytes) -> ShipPlan:
    """The plan the driver encoded (ranks of one worker trust each other: a bad plan is a bug)."""
    return _decoder.decode(data)
