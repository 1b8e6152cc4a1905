"""Messages on the coordinator's sockets (torch-free; MessagePack through typed msgspec structs).

    worker  --Beat (PUSH)-----------> every coordinator's heartbeat PULL (standbys stay warm)
    gateway --Place (DEALER)--------> the leader's placement ROUTER --> Placed | Rejected
    coordinator --WorkerEvent (PUB)-> gateways (SUB): a worker turned suspect, dead, draining or live

The envelope is common/wire.py's: decoding is validation, a malformed or unknown message raises
MessageError, which the receiver counts and drops.
"""

from __future__ import annotations

import msgspec

from common.kv_layout import KVLayoutSpec
from common.registry import Load
from common.wire import VERSION, Decoder, MessageError, encode

__all__ = ["VERSION", "Beat", "CoordinatorInfo", "MessageError", "Place", "Placed", "PlacementReply", "Rejected",
           "WorkerAddr", "WorkerEvent", "decode_beat", "decode_event", "decode_place", "decode_reply", "encode"]


class Beat(msgspec.Struct, tag="beat", frozen=True):
    v: int
    seq: int  # per worker incarnation, increasing: a reordered older beat is ignored
    load: Load
    incarnation: int = 0  # the worker agent's start (ns): a restarted worker starts its seq again


class Place(msgspec.Struct, tag="place", frozen=True):
    v: int
    request_id: str
    model: str  # served model name ("" = any)
    prompt_tokens: int
    max_tokens: int
    ttft_ms: float | None = None  # SLOs of this request (None: the cluster's defaults)
    tpot_ms: float | None = None
    exclude: list[str] = []  # workers not to use (the ones that just failed this request)
    slo_class: str = ""  # a named class of SLOs the coordinator knows (explicit ttft/tpot_ms win)


class WorkerAddr(msgspec.Struct, frozen=True):
    worker_id: str
    role: str
    endpoint: str  # request socket
    kv_endpoints: list[str]
    layout: KVLayoutSpec


class Placed(msgspec.Struct, tag="placed", frozen=True):
    v: int
    request_id: str
    prefill: WorkerAddr
    decode: WorkerAddr | None  # None: the prefill worker is colocated and decodes too
    predicted_ttft_ms: float
    predicted_tpot_ms: float
    ttft_ms: float | None = None  # the SLOs the decision used (the request's, its class's or the defaults)
    tpot_ms: float | None = None


class Rejected(msgspec.Struct, tag="rejected", frozen=True):
    v: int
    request_id: str
    code: str  # "overloaded" | "no_workers" | "unknown_model" | "not_leader" | "bad_request"
    reason: str
    retry_after_s: float = 1.0


class WorkerEvent(msgspec.Struct, tag="event", frozen=True):
    v: int
    worker_id: str
    role: str
    state: str  # "suspect" | "dead" | "draining" | "live"
    reason: str
    ts: float


class CoordinatorInfo(msgspec.Struct, frozen=True):
    """What a coordinator publishes under coordinators/<id> (and, while it leads, coordinator/leader)."""
    coordinator_id: str
    placement: str  # ROUTER endpoint
    heartbeats: str  # PULL endpoint
    events: str  # PUB endpoint
    admin: str  # http://host:port
    pid: int


PlacementReply = Placed | Rejected

_beat_dec: Decoder[Beat] = Decoder(Beat, "heartbeat")
_place_dec: Decoder[Place] = Decoder(Place, "placement request")
_reply_dec: Decoder[PlacementReply] = Decoder(PlacementReply, "placement reply")
_event_dec: Decoder[WorkerEvent] = Decoder(WorkerEvent, "worker event")


def decode_beat(data: bytes) -> Beat:
    return _beat_dec.decode(data)


def decode_place(data: bytes) -> Place:
    return _place_dec.decode(data)


def decode_reply(data: bytes) -> Placed | Rejected:
    return _reply_dec.decode(data)


def decode_event(data: bytes) -> WorkerEvent:
    return _event_dec.decode(data)
