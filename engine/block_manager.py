"""The KV block pool: allocation, reference counts, prefix caching. Pure bookkeeping (no torch).

    block table of a sequence (block_size = 4):
        tokens   t0 t1 t2 t3 | t4 t5 t6 t7 | t8 t9
        blocks   [    17    ] [    3      ] [  42 ...]      slot of token i = block[i // 4] * 4 + i % 4

Prefix caching: a *full* block whose tokens are all computed gets a hash chained over every token
before it, so equal prefixes map to equal hashes:

    root   = blake2b(hash_seed)                          the model's identity, one per BlockManager
    hash_0 = blake2b(root   as 8 bytes | tokens of block 0 as little-endian int64s)
    hash_i = blake2b(hash_i-1 as 8 bytes | tokens of block i ...)          (8-byte digests, as ints)

The hash is a pure function of the content, equal in every process and host (never Python's `hash()`,
whose value for None or str changes with the process), so workers and the coordinator can compare
hashes. A block keeps its hash after its last user frees it; it sits in the free queue in LRU order
and can be revived by a later request with the same prefix until the allocator needs it for something
else (eviction).
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from collections.abc import Callable
from collections.abc import Sequence as TokenIds
from dataclasses import dataclass
from hashlib import blake2b

from engine.sequence import Sequence


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None


@dataclass
class PrefixCacheStats:
    queries: int = 0  # prompt tokens looked up
    hits: int = 0  # of which found cached

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0


def root_hash(hash_seed: bytes | str = b"") -> int:
    """The parent hash of a sequence's first block: derived from the model's identity, so that two
    models never share a block hash."""
    if isinstance(hash_seed, str):
        hash_seed = hash_seed.encode()
    return int.from_bytes(blake2b(hash_seed, digest_size=8, person=b"tandem-kv-root").digest(), "little")


# one struct per block length: the parent hash as an unsigned 64-bit int, then the token ids as signed ones
_packers: dict[int, Callable[..., bytes]] = {}


def hash_block_tokens(parent_hash: int, tokens: TokenIds[int]) -> int:
    """The hash of a block whose tokens are `tokens` after the prefix whose last block hashed to
    `parent_hash` (`root_hash(...)` for the first block): an unsigned 64-bit int, equal on every host."""
    pack = _packers.get(len(tokens))
    if pack is None:
        pack = _packers[len(tokens)] = struct.Struct(f"<Q{len(tokens)}q").pack
    # NOTE: one struct.pack of the parent and the tokens together was the fastest packing measured for
    # 16-token blocks: array('q') and numpy conversions cost more than the hash itself
    return int.from_bytes(blake2b(pack(parent_hash, *tokens), digest_size=8).digest(), "little")


def chain_hashes(root: int, token_ids: TokenIds[int], block_size: int) -> list[int]:
    """The hashes of `token_ids`' full blocks, chained from `root` (what a BlockManager with that root
    gives them): for looking a prompt up in other processes' caches."""
    out, h = [], root
    for i in range(len(token_ids) // block_size):
        h = hash_block_tokens(h, token_ids[i * block_size:(i + 1) * block_size])
        out.append(h)
    return out


class KVEventLog:
    """Blocks entering and leaving a BlockManager's prefix cache since the last `drain`, for the
    cluster's KV index. Only each hash's last change is kept (stored, then evicted, is evicted), so
    the log is bounded by the cache's churn between drains; past `max_events` it gives up and the next
    publication must be a snapshot (`overflowed`)."""

    def __init__(self, max_events: int = 1 << 16):
        self.max_events = max_events
        self._last: dict[int, bool] = {}  # hash -> stored (True) or removed (False)
        self.overflowed = False

    def stored(self, h: int) -> None:
        self._note(h, True)

    def removed(self, h: int) -> None:
        self._note(h, False)

    def _note(self, h: int, stored: bool) -> None:
        if self.overflowed:
            return
        self._last.pop(h, None)
        self._last[h] = stored
        if len(self._last) > self.max_events:
            self._last.clear()
            self.overflowed = True

    def drain(self) -> tuple[list[int], list[int], bool]:
        """(stored, removed, overflowed) since the last drain; an overflowed log asks for a snapshot."""
        stored = [h for h, s in self._last.items() if s]
        removed = [h for h, s in self._last.items() if not s]
        overflowed, self.overflowed = self.overflowed, False
        self._last.clear()
        return stored, removed, overflowed


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 hash_seed: bytes | str = b""):
        """`hash_seed`: the model's identity; block hashes differ between models with different seeds."""
        if num_blocks <= 0:
            raise ValueError(f"num_blocks = {num_blocks} must be positive")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.root_hash = root_hash(hash_seed)
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[int, int] = {}  # hash -> block id
        self.seq_hashes: dict[int, list[int]] = {}  # seq_id -> hashes of its full computed blocks
        self.stats = PrefixCacheStats()
        self.events: KVEventLog | None = None  # set by a worker that publishes its cache to the cluster

    def enable_events(self) -> KVEventLog:
        """Starts logging prefix-cache changes (`events`), for a worker that publishes them."""
        if self.events is None:
            self.events = KVEventLog()
        return self.events

    def cached_hashes(self) -> list[int]:
        """Every block hash in the prefix cache now (a snapshot for the cluster's KV index)."""
        return list(self.cached)

    # ---- queries -------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def get_computed_blocks(self, seq: Sequence) -> list[int]:
        """Blocks that already hold KV for a prefix of `seq` (prefix cache hit or the n-parent's).

        At most `(num_tokens - 1) // block_size` blocks, so at least one token is left to compute and
        the step that computes it yields logits to sample from. None for the sequence that reports a
        request's prompt logprobs until it has its first token: those need every prompt position's
        logits, so it computes the whole prompt. No side effects.
        """
        if seq.computes_prompt_logprobs:
            return []
        max_blocks = (seq.num_tokens - 1) // self.block_size
        best: list[int] = []
        parent = seq.parent
        if parent is not None and not parent.is_finished and parent.block_ids:
            n = min(max_blocks, parent.num_computed_tokens // self.block_size, len(parent.block_ids))
            if seq.token_ids[:n * self.block_size] == parent.token_ids[:n * self.block_size]:
                best = parent.block_ids[:n]
        if self.enable_prefix_caching:
            hits: list[int] = []
            h = self.root_hash
            for i in range(max_blocks):
                h = hash_block_tokens(h, seq.token_ids[i * self.block_size:(i + 1) * self.block_size])
                b = self.cached.get(h)
                if b is None:
                    break
                hits.append(b)
            if len(hits) > len(best):
                best = hits
        return best

    def cached_prefix(self, hashes: TokenIds[int], max_blocks: int) -> list[int]:
        """The blocks holding the leading `hashes` (at most `max_blocks`), as far as this cache has
        them: a receiver's reuse of a prefix it already holds (the hashes are the sender's, computed
        the same way; a miss just ends the run)."""
        out = []
        for h in hashes[:max_blocks] if self.enable_prefix_caching else ():
            b = self.cached.get(h)
            if b is None:
                break
            out.append(b)
        return out

    # ---- allocation ----------------------------------------------------------------------------
    def allocate_slots(self, seq: Sequence, num_new_tokens: int, computed_blocks: list[int] = ()) -> bool:
        """Grow `seq`'s block table to hold `num_computed_tokens + num_new_tokens` tokens.

        `computed_blocks` (admission only) are attached first and advance `num_computed_tokens`.
        All or nothing: returns False, changing nothing, when the pool has too few free blocks.
        """
        if computed_blocks:
            assert not seq.block_ids and seq.num_computed_tokens == 0
        num_computed = seq.num_computed_tokens + len(computed_blocks) * self.block_size
        need = self.blocks_needed(num_computed + num_new_tokens) - len(seq.block_ids) - len(computed_blocks)
        revived = sum(1 for b in computed_blocks if self.blocks[b].ref_count == 0)
        if need > self.num_free_blocks - revived:
            return False
        if computed_blocks or (not seq.block_ids and seq.num_computed_tokens == 0):
            self.stats.queries += seq.num_tokens
            self.stats.hits += len(computed_blocks) * self.block_size
            seq.num_cached_tokens = len(computed_blocks) * self.block_size
        for b in computed_blocks:
            self._touch(b)
        seq.block_ids.extend(computed_blocks)
        seq.num_computed_tokens = num_computed
        # NOTE: fresh blocks in ascending id order: consecutive ids make contiguous cache regions, which
        # kvtransfer ships as single frames and attention gathers faster
        seq.block_ids.extend(sorted(self._pop_free() for _ in range(max(need, 0))))
        return True

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Register hashes of `seq`'s full, computed blocks (call after its tokens are computed)."""
        if not self.enable_prefix_caching:
            return
        hashes = self.seq_hashes.setdefault(seq.seq_id, [])
        num_full = min(seq.num_computed_tokens // self.block_size, len(seq.block_ids))
        bs = self.block_size
        while len(hashes) < num_full:
            i = len(hashes)
            h = hash_block_tokens(hashes[-1] if hashes else self.root_hash, seq.token_ids[i * bs:(i + 1) * bs])
            hashes.append(h)
            block = self.blocks[seq.block_ids[i]]
            if block.hash is None and h not in self.cached:
                block.hash = h
                self.cached[h] = block.block_id
                if self.events is not None:
                    self.events.stored(h)

    def free(self, seq: Sequence) -> None:
        """Drop `seq`'s references. Tail blocks go to the free queue first, so they are evicted
        before the shared prefix blocks."""
        for b in reversed(seq.block_ids):
            block = self.blocks[b]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {b} freed twice"
            if block.ref_count == 0:
                self.free_queue[b] = None
        seq.block_ids = []
        seq.num_computed_tokens = 0
        self.seq_hashes.pop(seq.seq_id, None)

    def hold(self, seq: Sequence) -> Sequence:
        """Another reference to `seq`'s blocks (a placeholder sequence), so they outlive `seq`:
        a prefill worker keeps a request's pages until the decode worker has them. Free it with `free`."""
        holder = Sequence(seq.request_id, seq.index, [], 0, seq.params)
        for b in seq.block_ids:
            self._touch(b)
        holder.block_ids = list(seq.block_ids)
        holder.num_computed_tokens = seq.num_computed_tokens
        return holder

    def reset_prefix_cache(self) -> None:
        for h, b in list(self.cached.items()):
            if self.blocks[b].ref_count == 0:
                self.blocks[b].hash = None
                del self.cached[h]
                if self.events is not None:
                    self.events.removed(h)

    # ---- internals -----------------------------------------------------------------------------
    def _touch(self, b: int) -> None:
        block = self.blocks[b]
        if block.ref_count == 0:
            del self.free_queue[b]
        block.ref_count += 1

    def _pop_free(self) -> int:
        b, _ = self.free_queue.popitem(last=False)  # least recently freed first
        block = self.blocks[b]
        if block.hash is not None:  # evict from the prefix cache
            if self.cached.get(block.hash) == b:
                del self.cached[block.hash]
                if self.events is not None:
                    self.events.removed(block.hash)
            block.hash = None
        block.ref_count = 1
        return b
