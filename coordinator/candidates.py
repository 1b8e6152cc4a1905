"""The live view's indexes, and the candidates of one placement read through them (policy.Candidates).

Workers are filed per side (prefill: prefill and colocated workers; decode: decode and colocated)
and (model, role) group, once heard from and unless draining, in plain lists kept sorted by
bisection: an update is a delete and an insert (a memmove: cheap at thousands of workers), a read is
a walk from the front that stops early, never a copy. An entry is

    (*key(worker), registration order, worker view)

so equal keys stay in scan order and the view never needs comparing. The live view keeps two indexes
of its own per side (scan order; last heartbeat, so the suspects are a prefix) and builds one for each
key a policy asks for the first time it asks (its records' queue wait, batch step time, ...), plus
free-KV indexes for decode rooms. Health is not filed, as it changes with time alone: a walk skips the
suspects it meets, and a count subtracts the suspect prefix.
"""

from __future__ import annotations

import heapq
from bisect import bisect_left, bisect_right, insort
from typing import TYPE_CHECKING

from coordinator.policy import DecodeLoad, PrefillWorkerState, Room

if TYPE_CHECKING:
    from coordinator.live_view import LiveView, WorkerView

INF = float("inf")
SIDES = {"prefill": ("prefill", "colocated"), "decode": ("decode", "colocated")}  # side -> its roles


def in_scan_order(v: WorkerView) -> tuple:
    return ()


def by_heartbeat(v: WorkerView) -> tuple:
    return (v.heard_at,)


def _by_free(v: WorkerView) -> tuple:  # Room(n): a suffix; the roomiest: the last
    return (v.decode.free_tokens, v.info.worker_id)


def _by_batch_free(v: WorkerView) -> tuple:  # Room(n, batch=True): a suffix
    d = v.decode
    return (d.free_tokens if d.num_running < d.max_batch else -INF,)


def _by_tightest(v: WorkerView) -> tuple:
    return (v.decode.tightest_tpot,)


class SortedIndex:
    """One key's entries per (model, role) group, each list sorted."""

    def __init__(self, key):
        self.key = key
        self.groups: dict[tuple[str, str], list[tuple]] = {}

    def file(self, v: WorkerView, group: tuple[str, str] | None) -> None:
        """Files v under its current key in `group` (None: nowhere)."""
        new = None if group is None else (group, (*self.key(v), v.order, v))
        old = v.filed.get(self)
        if new == old:
            return
        if old is not None:
            entries = self.groups[old[0]]
            del entries[bisect_left(entries, old[1])]
        if new is None:
            del v.filed[self]
        else:
            insort(self.groups.setdefault(group, []), new[1])
            v.filed[self] = new


def _has_room(v: WorkerView, room: Room) -> bool:
    d = v.decode
    return d.free_tokens >= room.tokens and (not room.batch or d.num_running < d.max_batch)


class Candidates:
    """policy.Candidates on a live view: its `side` workers of `roles` serving `model` ("": any),
    healthy at `now`, less `exclude`. Valid until the view next changes."""

    def __init__(self, view: LiveView, side: str, roles: tuple[str, ...], model: str, now: float,
                 exclude: frozenset = frozenset()):
        self.view, self.side, self.roles, self.model, self.now, self.exclude = view, side, roles, model, now, exclude
        self._roster = view.index(side, in_scan_order, of_view=True)
        self.groups = [g for g, entries in self._roster.groups.items()
                       if entries and g[1] in roles and (not model or g[0] == model)]
        self._unfit_by_room: dict[Room | None, set] = {}

    def _ok(self, v: WorkerView) -> bool:  # filed here: registered, heard from, not draining
        return self.now - v.heard_at <= self.view.suspect_after and v.info.worker_id not in self.exclude

    def _lists(self, key, of_view: bool = False) -> list[list[tuple]]:
        groups = self.view.index(self.side, key, of_view).groups
        return [groups[g] for g in self.groups if g in groups]

    def _walk(self, entries: list[tuple], room: Room | None):
        i, n = 0, len(entries)
        while i < n:
            e = entries[i]
            i += 1
            if self._ok(e[-1]) and (room is None or _has_room(e[-1], room)):
                yield e
                key = e[:-2]
                if i < n and entries[i][:-2] == key:  # the rest of its key ranks the same: skipped
                    i = bisect_right(entries, (*key, INF), i)

    # ---- policy.Candidates -----------------------------------------------------------------------
    def ordered(self, key, room: Room | None = None):
        walks = [self._walk(entries, room) for entries in self._lists(key)]
        for e in walks[0] if len(walks) == 1 else heapq.merge(*walks):
            yield e[:-2], getattr(e[-1], self.side)

    def exists(self, room: Room | None = None) -> bool:
        if room is None:
            return any(self._ok(e[-1]) for entries in self._lists(in_scan_order, True) for e in entries)
        for entries in self._lists(_by_batch_free if room.batch else _by_free, True):
            for e in reversed(entries):
                if e[0] < room.tokens:
                    break
                if self._ok(e[-1]):
                    return True
        return False

    def count(self, room: Room | None = None) -> int:
        return sum(map(len, self._lists(in_scan_order, True))) - len(self._unfit(room))

    def nth(self, k: int, room: Room | None = None):
        lists = self._lists(in_scan_order, True)
        entries = lists[0] if len(lists) == 1 else list(heapq.merge(*lists))  # any model: O(workers)
        # skip the unfit: the k-th fit one is k + the number of unfit ones at or before it
        for pos in sorted(bisect_left(entries, (v.order,)) for v in self._unfit(room)):
            if pos > k:
                break
            k += 1
        return getattr(entries[k][-1], self.side)

    def roomiest(self) -> DecodeLoad | None:
        best = None
        for entries in self._lists(_by_free, True):
            for e in reversed(entries):
                if self._ok(e[-1]):
                    if best is None or e[:2] > best[:2]:
                        best = e
                    break
        return None if best is None else best[-1].decode

    def floor(self) -> PrefillWorkerState | DecodeLoad:
        return self.view.floor(self.side, self.groups)

    def loosest_tpot(self) -> float | None:
        got = None
        for entries in self._lists(_by_tightest, True):
            i = bisect_left(entries, (INF,))
            if i and (got is None or entries[i - 1][0] > got):
                got = entries[i - 1][0]
        return got

    def states(self, records=None) -> list:
        if records is None:
            states = self.view.prefill_states if self.side == "prefill" else self.view.decode_states
            return states(self.now, self.roles, self.model, self.exclude)
        state = self.view.prefill_state if self.side == "prefill" else self.view.decode_state
        views = sorted((self.view.workers[r.worker_id] for r in records), key=lambda v: v.order)
        return [state(v, self.now) for v in views]

    # ----------------------------------------------------------------------------------------------
    def only(self, worker_id: str) -> Candidates:
        """These candidates restricted to one worker."""
        return _One(self, worker_id)

    def _unfit(self, room: Room | None) -> set:
        """The workers filed in these groups that are not candidates (for `room`)."""
        got = self._unfit_by_room.get(room)
        if got is None:
            got = set()
            for entries in self._lists(by_heartbeat, True):  # the suspects: a prefix
                for e in entries:
                    if self.now - e[0] <= self.view.suspect_after:
                        break
                    got.add(e[-1])
            for wid in self.exclude:
                v = self.view.workers.get(wid)
                filed = v.filed.get(self._roster) if v is not None else None
                if filed is not None and filed[0] in self.groups:
                    got.add(v)
            if room is not None:  # short of room: a prefix
                for entries in self._lists(_by_batch_free if room.batch else _by_free, True):
                    for e in entries:
                        if e[0] >= room.tokens:
                            break
                        got.add(e[-1])
            self._unfit_by_room[room] = got
        return got


class _One(Candidates):
    """Candidates restricted to one worker (colocated: the prefill must be the decode worker chosen)."""

    def __init__(self, of: Candidates, worker_id: str):
        self.__dict__.update(of.__dict__)
        v = self.view.workers.get(worker_id)
        filed = v.filed.get(self._roster) if v is not None else None
        self.v = v if filed is not None and filed[0] in self.groups and self._ok(v) else None

    def only(self, worker_id: str) -> Candidates:
        """Narrowed, never widened: this worker if it is the one asked for, else none (the TTFT walk asks
        for each worker holding a prefix, which must not escape a colocated placement's restriction)."""
        one = _One(self, worker_id)
        if one.v is not self.v:
            one.v = None
        return one

    def _views(self, room: Room | None) -> list:
        return [self.v] if self.v is not None and (room is None or _has_room(self.v, room)) else []

    def ordered(self, key, room=None):
        for v in self._views(room):
            rec = getattr(v, self.side)
            yield key(rec), rec

    def exists(self, room=None):
        return bool(self._views(room))

    def count(self, room=None):
        return len(self._views(room))

    def nth(self, k, room=None):
        return getattr(self._views(room)[k], self.side)

    def roomiest(self):
        return self.v.decode if self.v is not None else None

    def states(self, records=None):
        if records is None:
            records = [getattr(v, self.side) for v in self._views(None)]
        return super().states(records)
