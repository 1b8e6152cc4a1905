"""Messages on the coordinator's sockets (torch-free; MessagePack through typed msgspec structs).

    worker  --Beat (PUSH)-----------> every coordinator's heartbeat PULL (standbys stay warm)
    worker  --KVEvents (PUSH)-------> the same: its prefix cache's changes, for the cluster's KV index
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

__all__ = ["VERSION", "Beat", "CoordinatorInfo", "KVEvents", "MessageError", "Place", "Placed", "PlacementReply", "Rejected",
           "WorkerAddr", "WorkerEvent", "decode_beat", "decode_event", "decode_place", "decode_reply", "encode"]


class Beat(msgspec.Struct, tag="beat", frozen=True):
    v: int
    seq: int  # per worker incarnation, increasing: a reordered older beat is ignored
    load: Load
    incarnation: int = 0  # the worker agent's start (ns): a restarted worker starts its seq again


# a prefix-cache block hash (engine/block_manager.py: an unsigned 64-bit int; msgspec cannot bound ints
# past int64, and a value out of range only fails to match)
U64 = int
MAX_KV_EVENTS = 1 << 17  # hashes in one KVEvents message (a snapshot of a bigger cache is split)


class KVEvents(msgspec.Struct, tag="kv_events", frozen=True):
    """A worker's prefix-cache changes since its last KVEvents, to every coordinator (on the heartbeat
    socket): block hashes stored and evicted. `snapshot`: `stored` is everything the worker holds
    (a restart of its sequence; `part`/`parts` when split), after a new coordinator appears, an overflow,
    or every so often, so that lost or reordered messages only cost hits until then."""
    v: int
    worker_id: str
    incarnation: int  # the worker agent's start (ns), as in Beat
    seq: int  # per incarnation, increasing
    stored: list[U64] = []
    removed: list[U64] = []
    snapshot: bool = False
    part: int = 0  # of a snapshot split over several messages: this one's index ...
    parts: int = 1  # ... and their number


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
    block_hashes: list[U64] = []  # the prompt's full blocks' prefix-cache hashes (cache-aware placement)
    hash_root: int = 0  # ... chained from this root (WorkerInfo.kv_hash_root), in blocks of
    block_size: int = 0  # this many tokens; 0: no hashes


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

def _check_kv_events(msg) -> None:
    if isinstance(msg, KVEvents):
        if len(msg.stored) + len(msg.removed) > MAX_KV_EVENTS:
            raise MessageError(f"kv events: {len(msg.stored) + len(msg.removed)} hashes (at most {MAX_KV_EVENTS})")
        if not 0 <= msg.part < msg.parts or (msg.parts > 1 and not msg.snapshot):
            raise MessageError(f"kv events: part {msg.part} of {msg.parts}")


_beat_dec: Decoder[Beat | KVEvents] = Decoder(Beat | KVEvents, "heartbeat", check=_check_kv_events)
_place_dec: Decoder[Place] = Decoder(Place, "placement request")
_reply_dec: Decoder[PlacementReply] = Decoder(PlacementReply, "placement reply")
_event_dec: Decoder[WorkerEvent] = Decoder(WorkerEvent, "worker event")


def decode_beat(data: bytes) -> Beat | KVEvents:
    return _beat_dec.decode(data)


def decode_place(data: bytes) -> Place:
    return _place_dec.decode(data)


def decode_reply(data: bytes) -> Placed | Rejected:
    return _reply_dec.decode(data)


def decode_event(data: bytes) -> WorkerEvent:
    return _event_dec.decode(data)
