"""Every KV transport answers the same `KVTransport` protocol, signatures included, so the transfer
code (and the fake that unit tests of other modules use) cannot drift from the real client."""

import inspect

import pytest

from kvtransfer.fake import FakeKVClient, FakeKVNetwork
from kvtransfer.transport import KVTransport
from kvtransfer.zmq_transport import KVClient

METHODS = [name for name, v in vars(KVTransport).items() if inspect.isfunction(v) and not name.startswith("_")]


def shape(fn):
    """Parameter names, kinds and defaults (annotations aside: the fake leaves some out)."""
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


@pytest.mark.parametrize("cls", [KVClient, FakeKVClient])
def test_implementation_has_every_method_with_the_same_parameters(cls):
    assert set(METHODS) >= {"reserve", "send_pages", "expect_ack", "abort", "flush", "start", "stop"}
    for name in METHODS:
        assert shape(getattr(cls, name)) == shape(getattr(KVTransport, name)), f"{cls.__name__}.{name}"


def test_instances_are_transports():
    fake = FakeKVClient(FakeKVNetwork(), 0)
    client = KVClient(0)  # not started: no thread, no sockets yet
    try:
        assert isinstance(fake, KVTransport) and isinstance(client, KVTransport)
        assert not fake.path.gathers and not client.path.gathers and client.path is client.frames
    finally:
        client.ctx.term()
