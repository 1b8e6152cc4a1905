"""Leader election among coordinator replicas (etcd's election.go, over a Session). Torch-free.

Campaign = one transaction: if the leader key does not exist (create_revision == 0), create it on
our lease. The winner's key create revision fences every write it makes: `fenced_put` succeeds only
while the leader key still has that create revision, so a deposed leader (lease lost, paused, revived)
cannot write. A leader whose session loses its lease steps down at once.
"""

from __future__ import annotations

import asyncio
import logging

from aetcd import transactions as T

from common.etcd.session import Session

log = logging.getLogger(__name__)


class Election:
    def __init__(self, session: Session, key: str, value: bytes, poll_s: float | None = None):
        self.session, self.key, self.value = session, key.encode(), value
        self.poll_s = poll_s if poll_s is not None else max(0.05, session.ttl / 8)
        self.revision = 0  # create revision of our leader key while we lead; 0 otherwise
        self.elected = asyncio.Event()
        self._watch: asyncio.Task | None = None

    @property
    def is_leader(self) -> bool:
        return self.revision != 0 and not self.session.lost.is_set()

    async def campaign(self) -> None:
        """Returns once this candidate leads (standbys wait here)."""
        s = self.session
        while True:
            if not s.lost.is_set():
                try:
                    ok, _ = await s._call(s.client.transaction(
                        compare=[T.Create(self.key) == 0],
                        success=[T.Put(self.key, self.value, lease=s.lease.id)], failure=[]))
                    got = await s._call(s.client.get(self.key))
                    # a campaign whose reply was lost (timeout) may have won: the key is on our lease
                    ok = ok or (got is not None and got.lease == s.lease.id)
                    if ok and got is not None:
                        self.revision = got.create_revision
                        self.elected.set()
                        self._watch = asyncio.create_task(self._step_down_on_loss())
                        log.info("elected leader of %s (revision %d)", self.key.decode(), self.revision)
                        return
                except Exception as e:  # etcd unavailable: keep campaigning
                    log.debug("campaign: %s", e)
            await asyncio.sleep(self.poll_s)

    async def fenced_put(self, key: str, value: bytes) -> bool:
        """A write that lands only while we still lead (the leader key is still ours)."""
        if not self.is_leader:
            return False
        s = self.session
        ok, _ = await s._call(s.client.transaction(compare=[T.Create(self.key) == self.revision],
                                                   success=[T.Put(key.encode(), value)], failure=[]))
        return bool(ok)

    async def resign(self) -> None:
        if self.revision:
            s = self.session
            await s._call(s.client.transaction(compare=[T.Create(self.key) == self.revision],
                                               success=[T.Delete(self.key)], failure=[]))
        self._step_down()

    async def leader(self) -> bytes | None:
        got = await self.session._call(self.session.client.get(self.key))
        return got.value if got is not None else None

    async def _step_down_on_loss(self) -> None:
        await self.session.lost.wait()
        log.warning("lease lost: stepping down as leader of %s", self.key.decode())
        self._step_down()

    def _step_down(self) -> None:
        self.revision = 0
        self.elected.clear()
        if self._watch is not None and self._watch is not asyncio.current_task():
            self._watch.cancel()
