"""The simulator's model of the workers' prefix caches (coordinator/simulator.py, DESIGN.md §9): blocks
named as the engine's chained hashes name them, held least recently used first. Pure Python."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


@dataclass(frozen=True)
class Prefix:
    """Names the blocks of a request's token stream as chained hashes would: a block wholly inside the
    first `shared_tokens` tokens (a system prompt and its template) is `(shared, i)`, equal for every
    conversation that has that system prompt; any later block is `(own, i)`, its conversation's. Turns
    of a conversation extend one stream, so a turn's prompt starts with the blocks of the one before."""
    shared: object
    shared_tokens: int
    own: object

    def blocks(self, tokens: int, block_size: int) -> list[tuple]:
        """The full blocks of the first `tokens` tokens."""
        return [(self.shared, i) if (i + 1) * block_size <= self.shared_tokens else (self.own, i)
                for i in range(tokens // block_size)]



class PrefixCache:
    """A worker's prefix cache of full blocks: `capacity` blocks, least recently used evicted first.
    Blocks a request in flight links (pinned) are neither evictable nor counted: they are inside that
    request's KV reservation. A sequence's blocks are stored and touched tail first, so its tail is
    evicted before the prefix it shares with others (as engine/block_manager.py frees them)."""

    def __init__(self, capacity: int):
        self.capacity = max(capacity, 0)
        self._lru: OrderedDict = OrderedDict()  # unpinned blocks, least recently used first
        self._pinned: dict = {}  # block -> requests linking it

    def __len__(self) -> int:
        return len(self._lru) + len(self._pinned)

    def match(self, blocks: list) -> int:
        """How many leading blocks of `blocks` it holds."""
        n = 0
        for b in blocks:
            if b not in self._lru and b not in self._pinned:
                break
            n += 1
        return n

    def touch(self, blocks: list) -> None:
        for b in reversed(blocks):
            if b in self._lru:
                self._lru.move_to_end(b)

    def store(self, blocks: list) -> None:
        for b in reversed(blocks):
            if b not in self._pinned:
                self._lru[b] = None
                self._lru.move_to_end(b)
        self.resize(self.capacity)

    def pin(self, blocks: list) -> None:
        for b in blocks:
            self._lru.pop(b, None)
            self._pinned[b] = self._pinned.get(b, 0) + 1

    def unpin(self, blocks: list) -> None:
        for b in reversed(blocks):
            if self._pinned[b] == 1:
                del self._pinned[b]
                self._lru[b] = None
            else:
                self._pinned[b] -= 1

    def resize(self, capacity: int) -> None:
        self.capacity = max(capacity, 0)
        while len(self._lru) > self.capacity:
            self._lru.popitem(last=False)
