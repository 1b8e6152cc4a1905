"""A gateway's link to the coordinators (torch-free, asyncio): placements from the leader, worker
events from every replica.

The leader is found from etcd (coordinator/leader, mirrored): placement requests go to its ROUTER
over one DEALER socket, matched to their replies by a nonce. A placement that gets no reply in
`timeout`, or a `not_leader` reply (a takeover in progress), is retried until `deadline` seconds have
passed; a leader change reconnects the DEALER. Every coordinator's PUB socket is subscribed, so a
failure event reaches the gateway even from a standby.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable

import msgspec
import zmq

from common import security
from common.coordinator_protocol import (
    CoordinatorInfo,
    MessageError,
    Place,
    Placed,
    Rejected,
    WorkerEvent,
    decode_event,
    decode_reply,
    encode,
)
from common.etcd import keys
from common.etcd.session import Session
from common.etcd.watch import PrefixMirror
from common.zmq_loop import Reader

log = logging.getLogger(__name__)


class PlacementUnavailable(RuntimeError):
    """No coordinator answered in time."""


class CoordinatorLink:
    def __init__(self, session: Session, cluster: str, on_event: Callable[[WorkerEvent], None],
                 timeout: float = 0.5, deadline: float = 6.0):
        self.session, self.cluster, self.on_event = session, cluster, on_event
        self.timeout, self.deadline = timeout, deadline
        self.ctx = zmq.Context.instance()
        self.leader: CoordinatorInfo | None = None
        self.coordinators: dict[str, CoordinatorInfo] = {}
        self._dealer: zmq.Socket | None = None
        self._dealer_reader: Reader | None = None
        self._dealer_ep = ""
        self._sub = security.client(self.ctx.socket(zmq.SUB))
        self._sub.setsockopt(zmq.LINGER, 0)
        self._sub.setsockopt(zmq.MAXMSGSIZE, 1 << 20)
        self._sub.setsockopt(zmq.SUBSCRIBE, b"")
        self._sub_eps: set[str] = set()
        self._waiting: dict[str, asyncio.Future] = {}
        self._nonce = itertools.count()
        self._tasks: list[asyncio.Task] = []
        self.leader_known = asyncio.Event()
        self.bad_messages = 0

    async def start(self) -> CoordinatorLink:
        self._leader_mirror = PrefixMirror(self.session, keys.leader(self.cluster), self._leader_changed).start()
        self._coord_mirror = PrefixMirror(self.session, keys.coordinators(self.cluster), self._coord_changed).start()
        self._loop = asyncio.get_running_loop()
        self._sub_reader = Reader(self._loop, self._sub, self._on_event_data)
        return self

    async def close(self) -> None:
        await self._leader_mirror.stop()
        await self._coord_mirror.stop()
        self._sub_reader.close()
        if self._dealer is not None:
            self._dealer_reader.close()
            self._dealer.close(0)
        self._sub.close(0)

    # ---- discovery ---------------------------------------------------------------------------------
    def _leader_changed(self, key: str, old: bytes | None, new: bytes | None) -> None:
        try:
            self.leader = msgspec.json.decode(new, type=CoordinatorInfo) if new else None
        except (msgspec.DecodeError, msgspec.ValidationError):
            self.leader = None
        if self.leader is None:
            self.leader_known.clear()
            return
        if self.leader.placement != self._dealer_ep:
            if self._dealer is not None:
                self._dealer_reader.close()
                self._dealer.close(0)
            self._dealer = security.client(self.ctx.socket(zmq.DEALER))
            self._dealer.setsockopt(zmq.LINGER, 0)
            self._dealer.setsockopt(zmq.MAXMSGSIZE, 1 << 20)
            self._dealer.connect(self.leader.placement)
            self._dealer_ep = self.leader.placement
            self._dealer_reader = Reader(asyncio.get_running_loop(), self._dealer, self._on_reply)
        self._subscribe(self.leader.events)
        self.leader_known.set()

    def _coord_changed(self, key: str, old: bytes | None, new: bytes | None) -> None:
        if new is None:
            return  # a SUB connection to a dead publisher is harmless; ZeroMQ retries quietly
        try:
            info = msgspec.json.decode(new, type=CoordinatorInfo)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return
        self.coordinators[info.coordinator_id] = info
        self._subscribe(info.events)

    def _subscribe(self, endpoint: str) -> None:
        if endpoint not in self._sub_eps:
            try:
                self._sub.connect(endpoint)
            except zmq.ZMQError as e:  # a malformed coordinator record
                log.warning("events from %r: %s", endpoint, e)
                return
            self._sub_eps.add(endpoint)
            if getattr(self, "_sub_reader", None) is not None:
                self._sub_reader.kick()  # connect may have taken the FD's edge

    # ---- events and replies ------------------------------------------------------------------------
    def _on_event_data(self, data: bytes) -> None:
        try:
            ev = decode_event(data)
        except MessageError:
            self.bad_messages += 1
            return
        self.on_event(ev)

    def _on_reply(self, data: bytes) -> None:
        try:
            reply = decode_reply(data)
        except MessageError:
            self.bad_messages += 1
            return
        fut = self._waiting.pop(reply.request_id, None)
        if fut is not None and not fut.done():
            fut.set_result(reply)

    # ---- placement ---------------------------------------------------------------------------------
    async def place(self, req: Place) -> Placed | Rejected:
        """The leader's answer; retried across leader changes until the deadline."""
        deadline = time.monotonic() + self.deadline
        loop = asyncio.get_running_loop()
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise PlacementUnavailable("no coordinator answered the placement request "
                                           f"within {self.deadline:.0f} s")
            if not self.leader_known.is_set() or self._dealer is None:
                try:
                    await asyncio.wait_for(self.leader_known.wait(), min(left, self.timeout))
                except asyncio.TimeoutError:
                    pass
                continue
            tag = f"{req.request_id}#{next(self._nonce)}"
            fut = loop.create_future()
            self._waiting[tag] = fut
            # a timeout by call_later, not wait_for: no task per placement (hot path)
            timer = loop.call_later(min(left, self.timeout), lambda: fut.done() or fut.set_exception(asyncio.TimeoutError()))
            try:
                self._dealer.send(encode(msgspec.structs.replace(req, request_id=tag)), zmq.NOBLOCK)
                self._dealer_reader.kick()  # the send may have taken the FD's edge
                reply = await fut
            except (asyncio.TimeoutError, zmq.ZMQError):
                continue
            finally:
                timer.cancel()
                self._waiting.pop(tag, None)
            if isinstance(reply, Rejected) and reply.code == "not_leader":
                await asyncio.sleep(min(reply.retry_after_s, 0.1))
                continue
            return msgspec.structs.replace(reply, request_id=req.request_id)
