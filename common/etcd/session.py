"""An etcd session: a lease, a task that keeps it alive, and a `lost` event (etcd's
concurrency.Session, in asyncio with aetcd). Torch-free.

Keys registered through the session are attached to its lease, so they vanish when the process
dies. If the lease is lost (etcd unreachable for longer than the TTL, or the lease expired), `lost`
is set, and the session keeps trying: on success it grants a new lease, re-registers every key and
sets `renewed`. Every call has a timeout; endpoints are tried in turn (a 3-member cluster).
"""

from __future__ import annotations

import asyncio
import logging
import time
from urllib.parse import urlparse

import aetcd

from common.etcd.client import EtcdAuth, make_client

log = logging.getLogger(__name__)


class Session:
    def __init__(self, endpoints: list[str], ttl: int = 2, timeout: float = 2.0, auth: EtcdAuth | None = None):
        """`auth`: TLS and user settings (default: from the environment, see common/etcd/client.py)."""
        if ttl < 1:
            raise ValueError(f"ttl = {ttl!r}: etcd leases are whole seconds, at least 1")
        self.endpoints = [urlparse(e if "://" in e else f"http://{e}") for e in endpoints]
        self.ttl, self.timeout = ttl, timeout
        self.auth = (auth or EtcdAuth.from_env()).check()
        self.client: aetcd.Client | None = None
        self.lease = None
        self.lost = asyncio.Event()
        self.renewed = asyncio.Event()
        self._keys: dict[bytes, bytes] = {}
        self._task: asyncio.Task | None = None
        self._ep = 0
        self.num_leases = 0

    async def start(self) -> Session:
        await self._grant()
        self._task = asyncio.create_task(self._keepalive(), name="etcd-session")
        return self

    async def register(self, key: str, value: bytes) -> None:
        """Puts `key` on the session's lease; it is put again on every new lease."""
        self._keys[key.encode()] = value
        await self._call(self.client.put(key.encode(), value, lease=self.lease.id))

    async def unregister(self, key: str) -> None:
        self._keys.pop(key.encode(), None)
        await self._call(self.client.delete(key.encode()))

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        if self.client is not None:
            try:
                await self._call(self.client.revoke_lease(self.lease.id))
            except Exception:  # already gone: nothing to revoke
                pass
            await self.client.close()

    # ---- internals -----------------------------------------------------------------------------
    async def _call(self, coro, timeout: float | None = None):
        return await asyncio.wait_for(coro, timeout or self.timeout)

    async def _connect(self, timeout: float | None = None, start: int = 0) -> None:
        """A client for the first member that answers, trying them in turn from the current one
        (`start` = 1: from the next, when the current one just failed)."""
        last = None
        n = len(self.endpoints)
        for i in range(start, start + n):
            ep = self.endpoints[(self._ep + i) % n]
            client = make_client(ep, self.auth, self.timeout)
            try:
                await self._call(client.connect(), timeout)
                # a real round trip, answered by the member itself: during a leader election a
                # linearizable read would wait for the new leader, and the wait is the TTL's
                await self._call(client.get(b"/tandem/ping", serializable=True), timeout)
            except Exception as e:  # connection refused, timeout, unavailable
                last = e
                await client.close()
                continue
            if self.client is not None:
                await self.client.close()
            self.client, self._ep = client, (self._ep + i) % n
            return
        raise ConnectionError(f"no etcd endpoint answered: {last}")

    async def _grant(self) -> None:
        if self.client is None:
            await self._connect()
        self.lease = await self._call(self.client.lease(self.ttl))
        self.num_leases += 1
        for k, v in self._keys.items():
            await self._call(self.client.put(k, v, lease=self.lease.id))

    async def _keepalive(self) -> None:
        # a member that is up answers in milliseconds: waiting longer than a third of the TTL on one
        # that is not would let the lease expire before another member is tried
        quick = min(self.timeout, self.ttl / 3)
        last_ok = time.monotonic()
        delay = self.ttl / 3
        while True:
            await asyncio.sleep(delay)
            delay = self.ttl / 3
            try:
                reply = await self._call(self.client.refresh_lease(self.lease.id), quick)  # via the current member
                ttl = reply[0].TTL if isinstance(reply, list) else getattr(reply, "TTL", 1)
                if ttl <= 0:
                    raise LookupError("lease expired")
                last_ok = time.monotonic()
                continue
            except Exception as e:
                if time.monotonic() - last_ok < self.ttl and not isinstance(e, LookupError):
                    try:
                        await self._connect(quick, start=1)  # maybe another member answers
                    except ConnectionError:
                        pass
                    # the lease is still ours for what is left of the TTL: try again at once rather
                    # than a third of the TTL later (a leader election takes 0.5-1 s of it)
                    delay = min(0.1, delay)
                    continue
                if not self.lost.is_set():
                    log.warning("etcd lease lost (%s); re-registering when etcd is back", e)
                    self.renewed.clear()
                    self.lost.set()
            try:
                await self._connect()
                await self._grant()
            except Exception as e:
                log.debug("etcd still unavailable: %s", e)
                continue
            last_ok = time.monotonic()
            self.lost.clear()
            self.renewed.set()
