"""Messages between requesters (gateway, tests), prefill workers and decode workers. Torch-free.

The envelope is common/wire.py's (a protocol version in each message); (request_id, attempt) on
everything that starts or continues work, so a late message of a failed attempt is recognised.

    requester --PrefillRequest(prompt, SamplingSpec, decode target, reply_to)--> prefill driver
    prefill   --KV pages (kvtransfer)--> decode ranks;  prefill --Handoff(first token)--> decode driver
    prefill   --TokenChunk(index 0)--> requester;        decode  --TokenChunk(index 1..)--> requester
    requester --Abort--> either worker
"""

from __future__ import annotations

import msgspec

from common.kv_layout import KVLayoutSpec
from common.sampling import SamplingSpec
from common.wire import VERSION, Decoder, MessageError, encode

__all__ = ["VERSION", "Abort", "DecodeTarget", "Handoff", "MessageError", "PrefillRequest", "SamplingSpec",
           "TokenChunk", "decode_chunk", "decode_worker_message", "encode"]


class DecodeTarget(msgspec.Struct, frozen=True):
    worker_id: str
    endpoint: str  # the decode driver's request socket (Handoff, Abort)
    kv_endpoints: list[str]  # one per decode rank; [0] takes reservations
    layout: KVLayoutSpec


class PrefillRequest(msgspec.Struct, tag="prefill", frozen=True):
    v: int
    request_id: str
    attempt: int
    prompt_token_ids: list[int]
    params: SamplingSpec
    reply_to: str  # the requester's PULL endpoint for TokenChunks
    decode: DecodeTarget | None = None  # None: this worker decodes too (colocated)
    held_tokens: int = 0  # trailing prompt tokens whose text the client has not seen yet (a migration)
    slo_ttft_ms: float | None = None  # the SLOs the placement used: workers report their attainment
    slo_tpot_ms: float | None = None
    held_text: str = ""  # decoded text of earlier tokens the client has not seen (held back for stop strings)


class Handoff(msgspec.Struct, tag="handoff", frozen=True):
    """Prefill -> decode driver, after the prompt's KV has been sent: what decoding needs."""
    v: int
    request_id: str
    attempt: int
    prompt_token_ids: list[int]
    first_token: int
    params: SamplingSpec
    reply_to: str
    held_tokens: int = 0
    slo_tpot_ms: float | None = None
    held_text: str = ""  # text up to the first token that P did not emit (a possible stop string)


class TokenChunk(msgspec.Struct, tag="tokens", frozen=True):
    v: int
    request_id: str
    attempt: int
    index: int  # output position of token_ids[0]: the requester dedupes by it
    token_ids: list[int]
    text: str
    logprobs: list[tuple[float, list[tuple[int, float]]]] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    error: str = ""
    worker_id: str = ""
    error_code: str = ""  # "invalid" (the request itself) | "capacity" (no room now) | "unavailable" (a peer failed)
    blame: str = ""  # the worker at fault when it is not the sender (e.g. the decode worker P reserved at)
    # on an attempt's first chunk (index 0), from the worker that prefilled (-1: not known):
    cached_tokens: int = -1  # prompt tokens its prefix cache held
    kv_tokens: int = -1  # prompt tokens whose KV it ships to the decode worker (held there: not shipped)
    # when the request asked for them (SamplingSpec.prompt_logprobs): one per prompt token, the first None
    prompt_logprobs: list[tuple[float, list[tuple[int, float]]] | None] | None = None


class Abort(msgspec.Struct, tag="abort", frozen=True):
    v: int
    request_id: str
    attempt: int


WorkerMessage = PrefillRequest | Handoff | Abort

_worker_dec: Decoder[WorkerMessage] = Decoder(WorkerMessage, "message")
_chunk_dec: Decoder[TokenChunk] = Decoder(TokenChunk, "chunk")


def decode_worker_message(data: bytes) -> WorkerMessage:
    return _worker_dec.decode(data)


def decode_chunk(data: bytes) -> TokenChunk:
    return _chunk_dec.decode(data)
