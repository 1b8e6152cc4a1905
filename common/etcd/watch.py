"""A local mirror of an etcd key prefix: list, then watch from the listed revision (the informer
pattern). Torch-free.

After any error (etcd restarted, the session moved to another member, the watched revision was
compacted) the mirror lists again and watches from the new revision, reporting only what changed
meanwhile, so a consumer sees each registration appear once and disappear once: nothing duplicated,
nothing lost.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from common.etcd.session import Session

log = logging.getLogger(__name__)

OnChange = Callable[[str, bytes | None, bytes | None], None]  # key, old value, new value (None: absent)


class PrefixMirror:
    def __init__(self, session: Session, prefix: str, on_change: OnChange, retry_s: float = 0.2):
        self.session, self.prefix, self.on_change, self.retry_s = session, prefix, on_change, retry_s
        self.items: dict[str, bytes] = {}
        self.revision = 0  # of the last list or event applied
        self.synced = asyncio.Event()  # set after the first complete list
        self._task: asyncio.Task | None = None

    def start(self) -> PrefixMirror:
        self._task = asyncio.create_task(self._run(), name=f"mirror {self.prefix}")
        return self

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass

    def _set(self, key: str, value: bytes | None) -> None:
        old = self.items.get(key)
        if old == value:
            return
        if value is None:
            del self.items[key]
        else:
            self.items[key] = value
        try:
            self.on_change(key, old, value)
        except Exception:  # a consumer's bug must not stop the mirror
            log.exception("on_change(%s) failed", key)

    async def _list(self, client) -> None:
        got = await self.session._call(client.get_prefix(self.prefix.encode()))
        now = {kv.key.decode(): kv.value for kv in got}
        for key in [k for k in self.items if k not in now]:
            self._set(key, None)
        for key, value in now.items():
            self._set(key, value)
        self.revision = got.header.revision
        self.synced.set()

    async def _watch(self, client) -> None:
        watch = await self.session._call(client.watch_prefix(self.prefix.encode(), start_revision=self.revision + 1))
        try:
            async for ev in watch:
                key = ev.kv.key.decode()
                self._set(key, ev.kv.value if ev.kind == "PUT" else None)
                self.revision = max(self.revision, ev.kv.mod_revision)
        finally:
            try:
                await asyncio.wait_for(watch.cancel(), 1.0)
            except Exception:
                pass

    async def _run(self) -> None:
        while True:
            client = self.session.client
            try:
                if client is None or self.session.lost.is_set():
                    raise ConnectionError("no etcd session")
                await self._list(client)
                watcher = asyncio.create_task(self._watch(client))
                try:
                    # the watch stream of a client the session replaced (failover) may never end on its own
                    while not watcher.done():
                        await asyncio.wait({watcher}, timeout=0.5)
                        if self.session.client is not client or self.session.lost.is_set():
                            break
                    if watcher.done() and not watcher.cancelled() and watcher.exception() is not None:
                        raise watcher.exception()
                finally:  # stop() cancels us here: the watch must not outlive the mirror
                    if not watcher.done():
                        watcher.cancel()
                        await asyncio.gather(watcher, return_exceptions=True)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.debug("mirror of %s: %s; listing again", self.prefix, e)
            await asyncio.sleep(self.retry_s)
