"""The one envelope (common/wire.py) as every protocol uses it: the same version check, the same
error, whatever the socket."""

import msgspec
import pytest

from common import coordinator_protocol as cp
from common import messages as wm
from common.wire import VERSION, Decoder, MessageError, encode
from kvtransfer import protocol as kp


class Ping(msgspec.Struct, tag="ping", frozen=True):
    v: int
    n: int


def test_round_trip_and_checks():
    dec = Decoder(Ping, "ping", max_bytes=64)
    assert dec.decode(encode(Ping(VERSION, 3))) == Ping(VERSION, 3)
    with pytest.raises(MessageError, match="protocol version 99"):
        dec.decode(encode(Ping(99, 3)))
    with pytest.raises(MessageError, match="malformed ping"):
        dec.decode(b"\xc1not msgpack")
    with pytest.raises(MessageError, match="exceeds 64"):
        dec.decode(b"x" * 65)

    def odd_only(m):
        if m.n % 2 == 0:
            raise MessageError("even")

    with pytest.raises(MessageError, match="even"):
        Decoder(Ping, "ping", check=odd_only).decode(encode(Ping(VERSION, 2)))


@pytest.mark.parametrize("decode,msg", [
    (wm.decode_worker_message, wm.Abort(VERSION + 1, "r", 0)),
    (cp.decode_event, cp.WorkerEvent(VERSION + 1, "w", "decode", "dead", "", 0.0)),
    (kp.decode, kp.Abort(VERSION + 1, "r", 0)),
])
def test_every_protocol_refuses_another_version_with_the_same_error(decode, msg):
    with pytest.raises(MessageError, match="protocol version"):
        decode(encode(msg))
    assert wm.MessageError is cp.MessageError is kp.MessageError is MessageError
