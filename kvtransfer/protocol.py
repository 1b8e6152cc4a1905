"""The KV transfer wire protocol: typed msgspec messages, MessagePack-encoded, tensors as raw frames.

Every ZeroMQ message is `[header]` or `[header, payload]`; the header is one of the tagged structs
below, each carrying the protocol version and the (request_id, attempt) it belongs to, so a late frame
from a failed attempt is recognised and dropped. Decoding is validation: anything malformed raises
`MessageError`, which the caller counts and drops. Pickle is never used.

    P driver --Reserve-->  D driver            (D reserves blocks for num_tokens, or says why not)
    P driver <--Reserved-- D driver
    P rank s --Pages + payload--> D rank d      (per plan item and run of layers: heads [h0, h1), dst blocks;
                                                 the "tcp" transport sends these on a stream: stream.py)
    P driver <--Ack-------- D driver            (every D rank has every frame: ok; or failed + reason)
    either   --Abort----->  the other           (give up; both sides free)
"""

from __future__ import annotations

import msgspec

from common.kv_layout import ITEMSIZE, KVLayoutSpec
from common.wire import VERSION, Decoder, MessageError, encode

__all__ = ["VERSION", "MessageError", "decode", "encode"]  # and the message types below

MAX_HEADER_BYTES = 1 << 20
DTYPES = tuple(ITEMSIZE)  # of pages: the float dtypes, and the quantized formats (one-byte elements)
MAX_LAYERS = 1024  # layers in one Pages message


class Reserve(msgspec.Struct, tag="reserve", frozen=True):
    v: int
    request_id: str
    attempt: int
    num_tokens: int
    layout: KVLayoutSpec  # the sender's KV layout (checked by the receiver): it derives the plan and the frames to expect
    reply_to: str = ""  # the sender driver's endpoint, for the Ack
    # the prompt's full blocks' prefix-cache hashes, chained from hash_root (engine/block_manager.py):
    # the receiver links the leading blocks its own cache holds instead of receiving them
    block_hashes: list[int] = []
    hash_root: int = 0
    # how long the receiver should wait for the pages (0: its own timeout): the sender's estimate of the
    # prompts ahead of this one in its queue, so a long queue at the sender does not time the
    # reservation out before the first page is computed (the receiver caps it: MAX_WAIT_S)
    wait_s: float = 0.0


class Reserved(msgspec.Struct, tag="reserved", frozen=True):
    v: int
    request_id: str
    attempt: int
    ok: bool
    block_ids: list[int] = []
    reason: str = ""  # why not: "no room", "incompatible layout: ...", "duplicate"
    held: int = 0  # the first `held` of block_ids already hold the prompt's KV there: not sent


class Pages(msgspec.Struct, tag="pages", frozen=True):
    v: int
    request_id: str
    attempt: int
    src_rank: int
    layer: int  # global layer id (the first of `num_layers` consecutive ones)
    heads: tuple[int, int]  # global KV heads [h0, h1)
    block_ids: list[int]  # destination blocks, in token order
    dtype: str
    # one layer's pages: [2, num_blocks, h1 - h0, block_size, row]; row = head_dim, or for a quantized dtype
    # head_dim + 4 one-byte elements (the codes, then the fp32 scale: KVLayoutSpec.row_width)
    shape: list[int]
    nbytes: int  # all layers' bytes
    pair: str = ""  # torch.distributed transport: the pair group the payload comes through
    tag: int = 0  # ... and its send/recv tag; "" means the payload is the next ZeroMQ frame
    # ZeroMQ, zero-copy: each layer's payload is 2 x len(runs) frames, K then V, each holding the next
    # `run` blocks ([run, h1 - h0, block_size, head_dim]); empty: one frame of `shape` per layer
    runs: list[int] = []
    # ZeroMQ frames only: layers [layer, layer + num_layers) in one message, their frames one layer after
    # the other (a sender that has several layers ready at once pays the per-message work once)
    num_layers: int = 1


class PairHello(msgspec.Struct, tag="pair_hello", frozen=True):
    """torch.distributed transport: a sender rank asks a receiver rank for its rendezvous store."""
    v: int
    pair: str


class PairInfo(msgspec.Struct, tag="pair_info", frozen=True):
    v: int
    pair: str
    host: str
    port: int
    backend: str


class StreamHello(msgspec.Struct, tag="stream_hello", frozen=True):
    """The "tcp" transport: a sender rank asks a receiver rank where its page stream is (kvtransfer/stream.py)."""
    v: int
    nonce: str


class StreamInfo(msgspec.Struct, tag="stream_info", frozen=True):
    v: int
    nonce: str
    address: str  # tcp://host:port or ipc://path; "" = no stream here, send ZeroMQ frames
    token: bytes = b""  # the first bytes of a connection


class Ack(msgspec.Struct, tag="ack", frozen=True):
    v: int
    request_id: str
    attempt: int
    ok: bool
    reason: str = ""


class Abort(msgspec.Struct, tag="abort", frozen=True):
    v: int
    request_id: str
    attempt: int
    reason: str = ""


class Expect(msgspec.Struct, tag="expect", frozen=True):
    """Decode driver -> its other ranks: frames of this request will come into these blocks."""
    v: int
    request_id: str
    attempt: int
    block_ids: list[int]
    layout: KVLayoutSpec  # the sender's
    timeout_s: float


class ExpectOk(msgspec.Struct, tag="expect_ok", frozen=True):
    v: int
    request_id: str
    attempt: int


class Cancel(msgspec.Struct, tag="cancel", frozen=True):
    v: int
    request_id: str
    attempt: int


class Cancelled(msgspec.Struct, tag="cancelled", frozen=True):
    """A decode rank -> its driver: nothing of this request is written into its blocks any more."""
    v: int
    request_id: str
    attempt: int


class RankDone(msgspec.Struct, tag="rank_done", frozen=True):
    """A decode rank -> its driver: it has every frame of the request (ok), or gave up (reason)."""
    v: int
    request_id: str
    attempt: int
    rank: int
    ok: bool
    reason: str = ""


Message = (Reserve | Reserved | Pages | Ack | Abort | PairHello | PairInfo | StreamHello | StreamInfo | Expect | ExpectOk
           | Cancel | Cancelled | RankDone)



def _check(msg: Message) -> None:
    if isinstance(msg, Pages):
        _check_pages(msg)


_decoder: Decoder[Message] = Decoder(Message, "KV message", MAX_HEADER_BYTES, _check)


def decode(data: bytes | memoryview) -> Message:
    return _decoder.decode(data)


def _check_pages(m: Pages) -> None:
    if m.dtype not in DTYPES:
        raise MessageError(f"pages: unknown dtype {m.dtype!r}")
    if len(m.shape) != 5 or m.shape[0] != 2 or any(x <= 0 for x in m.shape):
        raise MessageError(f"pages: shape {m.shape} is not [2, blocks, heads, block_size, row]")
    if m.shape[1] != len(m.block_ids) or m.shape[2] != m.heads[1] - m.heads[0]:
        raise MessageError(f"pages: shape {m.shape} disagrees with {len(m.block_ids)} blocks and heads {m.heads}")
    if m.runs and (sum(m.runs) != len(m.block_ids) or min(m.runs) <= 0):
        raise MessageError(f"pages: runs {m.runs} do not split {len(m.block_ids)} blocks")
    i = 0
    for n in m.runs:  # a run lands on consecutive blocks: b, b + 1, ... (never on a block not named)
        if m.block_ids[i:i + n] != list(range(m.block_ids[i], m.block_ids[i] + n)):
            raise MessageError(f"pages: run of {n} at {i} over blocks {m.block_ids[i:i + n]} that are not consecutive")
        i += n
    if m.runs and m.pair:
        raise MessageError("pages: runs are for ZeroMQ frames, not torch.distributed payloads")
    if not 1 <= m.num_layers <= MAX_LAYERS or (m.pair and m.num_layers != 1):
        raise MessageError(f"pages: num_layers = {m.num_layers} (1..{MAX_LAYERS}; 1 over torch.distributed)")
    itemsize = ITEMSIZE[m.dtype]
    n = itemsize * m.num_layers
    for x in m.shape:
        n *= x
    if n != m.nbytes:
        raise MessageError(f"pages: {m.num_layers} layer(s) of {m.shape} {m.dtype} are {n} bytes, "
                            f"header says {m.nbytes}")
