"""The one envelope of every message on tandem's sockets (DESIGN.md §3): MessagePack through typed
msgspec structs, tagged where a socket carries several kinds, the protocol version as each message's
first field `v`. Decoding is validation: a message that is malformed, unknown, too large or of
another protocol version raises `MessageError`, which the receiver logs, counts and drops. Nothing is ever unpickled.

The protocols built on it: common/messages.py (requesters and workers), common/coordinator_protocol.py
(heartbeats, placement, worker events) and kvtransfer/protocol.py (KV reservations and pages).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

import msgspec

VERSION = 1  # of the whole wire: every protocol above speaks it

T = TypeVar("T")


class MessageError(ValueError):
    """A message that failed to decode; the receiver drops it and goes on."""


_encoder = msgspec.msgpack.Encoder()


def encode(msg: msgspec.Struct) -> bytes:
    return _encoder.encode(msg)


class Decoder(Generic[T]):
    """Decodes one socket's messages (`type`: a struct or a tagged union of them), checks the envelope's
    version, the size and, if given, `check(msg)` (which raises MessageError for what the types cannot say)."""

    def __init__(self, type: Any, what: str, max_bytes: int | None = None,
                 check: Callable[[T], None] | None = None):
        self._dec = msgspec.msgpack.Decoder(type)
        self.what, self.max_bytes, self.check = what, max_bytes, check

    def decode(self, data: bytes | memoryview) -> T:
        if self.max_bytes is not None and len(data) > self.max_bytes:
            raise MessageError(f"{self.what} of {len(data)} bytes exceeds {self.max_bytes}")
        try:
            msg = self._dec.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            raise MessageError(f"malformed {self.what}: {e}") from None
        if msg.v != VERSION:
            raise MessageError(f"{self.what}: protocol version {msg.v} (this process speaks {VERSION})")
        if self.check is not None:
            self.check(msg)
        return msg
