"""An in-memory KV transport for unit tests of other modules: the KVClient API, no sockets, no threads.

`FakeKVNetwork` maps endpoint names to receivers; `FakeKVClient` calls into them synchronously, with the
same messages (encoded and decoded, so protocol validation still runs) and the same payload bytes.
"""

from __future__ import annotations

from collections import Counter
from concurrent.futures import Future

import torch

from kvtransfer.pages import to_bytes_view
from kvtransfer.plan import KVLayout
from kvtransfer.protocol import VERSION, Abort, Ack, Pages, Reserve, Reserved, decode, encode
from kvtransfer.receiver import RankReceiver
from kvtransfer.reservations import Reservations


class FakeKVNetwork:
    def __init__(self):
        self.receivers: dict[str, RankReceiver] = {}
        self.reservations: dict[str, Reservations] = {}
        self.clients: dict[bytes, FakeKVClient] = {}
        self.dropped = Counter()  # endpoint -> messages sent to a missing endpoint (a dead peer)

    def serve(self, endpoint: str, receiver: RankReceiver, reservations: Reservations | None = None) -> None:
        self.receivers[endpoint] = receiver
        if reservations is not None:
            self.reservations[endpoint] = reservations
            reservations.send_ack = self._deliver_ack

    def kill(self, endpoint: str) -> None:
        self.receivers.pop(endpoint, None)
        self.reservations.pop(endpoint, None)

    def _deliver_ack(self, identity: bytes, ack: Ack) -> None:
        client = self.clients.get(identity)
        if client is not None:
            client._on_reply(decode(encode(ack)))


class FramesOnly:
    gathers = False


class FakeKVClient:
    path = FramesOnly  # pages as frames: no torch.distributed gather

    def __init__(self, network: FakeKVNetwork, rank: int):
        self.net, self.rank = network, rank
        self.identity = f"fake-client-{id(self)}".encode()
        network.clients[self.identity] = self
        self.metrics = Counter()
        self._acks: dict[tuple[str, int], Future] = {}

    def start(self):
        pass

    def stop(self, timeout: float = 5.0):
        pass

    def flush(self, timeout: float = 5.0):
        pass

    def reserve(self, endpoint, request_id, attempt, num_tokens, layout: KVLayout, timeout=5.0, block_hashes=(),
                hash_root=0, wait_s=0.0) -> Reserved:
        res = self.net.reservations.get(endpoint)
        if res is None:
            self.net.dropped[endpoint] += 1
            return Reserved(VERSION, request_id, attempt, False, [], f"no answer within {timeout} s")
        msg = decode(encode(Reserve(VERSION, request_id, attempt, num_tokens, layout, block_hashes=list(block_hashes),
                                    hash_root=hash_root, wait_s=wait_s)))
        return decode(encode(res.on_reserve(self.identity, msg)))

    def reserve_async(self, endpoint, request_id, attempt, num_tokens, layout: KVLayout, block_hashes=(),
                      hash_root=0, wait_s=0.0) -> Future:
        fut: Future = Future()
        if endpoint in self.net.reservations:  # an unreachable endpoint never answers
            fut.set_result(self.reserve(endpoint, request_id, attempt, num_tokens, layout, block_hashes=block_hashes,
                                        hash_root=hash_root, wait_s=wait_s))
        else:
            self.net.dropped[endpoint] += 1
        return fut

    def forget_reserve(self, request_id, attempt) -> None:
        pass

    def expect_ack(self, request_id, attempt) -> Future:
        fut: Future = Future()
        self._acks[(request_id, attempt)] = fut
        return fut

    def send_pages(self, endpoint, header: Pages, payload: torch.Tensor | list, cache=None) -> None:
        recv = self.net.receivers.get(endpoint)
        if recv is None:
            self.net.dropped[endpoint] += 1
            return
        frames = payload if isinstance(payload, list) else [payload]
        # one buffer per frame, as ZeroMQ delivers them
        data = [memoryview(bytes(to_bytes_view(t.cpu() if isinstance(t, torch.Tensor) else t))) for t in frames]
        recv.on_pages(decode(encode(header)), data)
        self.metrics["frames_sent"] += 1

    def abort(self, endpoint, request_id, attempt, reason=""):
        res = self.net.reservations.get(endpoint)
        if res is not None:
            msg = decode(encode(Abort(VERSION, request_id, attempt, reason)))
            res.on_abort(msg.request_id, msg.attempt, msg.reason)

    def _on_reply(self, ack: Ack) -> None:
        fut = self._acks.pop((ack.request_id, ack.attempt), None)
        if fut is not None and not fut.done():
            fut.set_result(ack)
