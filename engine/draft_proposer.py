"""A draft model as a speculative-decoding proposer (`--speculative draft:PATH`).

Any checkpoint with the target's tokenizer, run by the engine's own process (the driver rank, whatever
the target's TP/PP) with its own paged KV cache and block pool. For a batch of decoding sequences it
proposes k tokens each, greedily: first it computes what its cache lacks of each sequence (the whole
prompt the first time; after a step, the tokens that step appended), which also draws the first guess,
then k - 1 one-token steps. Greedy guesses are certain (a point mass), so the engine's verification
(draw and compare, engine/spec_decode.py) keeps the target's output exact.

A guess that did not hold leaves the draft's KV past the sequence's tokens: the next call trims its
copy of the sequence to what it shares with the target's and recomputes from there.
"""

from __future__ import annotations

from engine.block_manager import BlockManager
from engine.config import CacheConfig, DeviceConfig, ModelConfig
from engine.errors import ModelConfigError
from engine.model_runner import ModelRunner
from engine.sampling_params import SamplingParams
from engine.scheduler import ScheduledSeq, SchedulerOutput
from engine.sequence import Sequence

GREEDY = SamplingParams(temperature=0, ignore_eos=True)


class DraftProposer:
    def __init__(self, path: str, target: ModelConfig, device: DeviceConfig, kv_cache_memory: int | None,
                 block_size: int, quantization: str = "none"):
        from engine.model_store import resolve_model

        path = str(resolve_model(path))
        self.config = ModelConfig.from_dir(path)
        if self.config.vocab_size != target.vocab_size:
            raise ModelConfigError(f"draft model {path!r}: vocab_size {self.config.vocab_size} differs from the "
                                   f"target's {target.vocab_size} (a draft must share the target's tokenizer)")
        _check_tokenizer(path, target.path)
        cache = CacheConfig(block_size=block_size, kv_cache_memory=kv_cache_memory, enable_prefix_caching=False)
        self.runner = ModelRunner(self.config, cache, device, quantization=quantization)
        self.bm = BlockManager(self.runner.num_blocks, block_size, False)
        self.max_len = self.config.max_model_len
        self.seqs: dict[int, Sequence] = {}  # target seq_id -> the draft's copy
        self.synced: dict[int, int] = {}  # target seq_id -> its length at the last sync (tokens only grow)
        self._used: dict[int, int] = {}  # target seq_id -> the call that last asked for its guesses
        self._calls = 0
        self.catch_up_tokens = 2048  # a call's catch-up computes at most this many (a prompt over steps)

    def propose(self, seq: Sequence, k: int) -> list[int]:
        return self.propose_batch([(seq, k)])[0]

    def propose_batch(self, items: list[tuple[Sequence, int]]) -> list[list[int]]:
        """Up to k greedy guesses for each (sequence, k); [] where the draft has no room for it."""
        out: list[list[int]] = [[] for _ in items]
        live: list[tuple[int, Sequence, int]] = []  # (index in items, draft copy, k)
        room = self.catch_up_tokens
        self._calls += 1
        asked = {seq.seq_id for seq, _ in items}
        for i, (seq, k) in enumerate(items):
            if seq.num_tokens + k > self.max_len:  # past the draft's context: its copy is of no more use
                self.forget(seq.seq_id)
                continue
            d = self._sync(seq)
            if k <= 0 or d is None:
                continue
            self._used[seq.seq_id] = self._calls
            self._make_room(d, d.num_tokens - d.num_computed_tokens + k, asked)
            lag = d.num_tokens - d.num_computed_tokens
            if lag > 1 and lag > room:  # a long catch-up: part of it now, guesses from a later step
                if room > 0 and self.bm.allocate_slots(d, room):
                    self._compute([(d, room)], sample=False)
                    room = 0
                continue
            room -= lag
            live.append((i, d, k))
        step = [(i, d, d.num_tokens - d.num_computed_tokens) for i, d, _ in live]
        for _ in range(max((k for _, _, k in live), default=0)):
            todo = [(i, d, m) for i, d, m in step if len(out[i]) < items[i][1] and self.bm.allocate_slots(d, m)]
            if not todo:
                break
            sampled = self._compute([(d, m) for _, d, m in todo], sample=True)
            for i, d, _ in todo:
                token = sampled[d.seq_id][0]
                d.token_ids.append(token)
                out[i].append(token)
            step = [(i, d, 1) for i, d, _ in todo]
        return out

    def _compute(self, work: list[tuple[Sequence, int]], sample: bool) -> dict[int, list[int]]:
        """One draft step: m more tokens of each copy (slots allocated), the next token drawn where
        `sample`."""
        sched = [ScheduledSeq(d, d.num_computed_tokens, m, sample) for d, m in work]
        result = self.runner.execute(SchedulerOutput(sched, [], sum(m for _, m in work)))
        for d, m in work:
            d.num_computed_tokens += m
        return result.sampled

    def _sync(self, seq: Sequence) -> Sequence | None:
        """The draft's copy of `seq`, trimmed to the tokens it shares with it and given the rest (its KV
        to be computed); None when the draft's cache cannot hold it."""
        d = self.seqs.get(seq.seq_id)
        if d is None:
            d = Sequence(seq.request_id, 0, [], seq.num_prompt_tokens, GREEDY)
            self.seqs[seq.seq_id] = d
        # the copy is the target's tokens up to its last sync, then guesses: compare from there
        held = min(self.synced.get(seq.seq_id, 0), d.num_tokens)
        n = held + _common_prefix(d.token_ids[held:], seq.token_ids[held:])
        self.synced[seq.seq_id] = seq.num_tokens
        if n < d.num_tokens:
            del d.token_ids[n:]
        d.num_computed_tokens = min(d.num_computed_tokens, n, len(seq.token_ids) - 1)
        d.token_ids.extend(seq.token_ids[n:])
        if self.bm.blocks_needed(d.num_tokens + 16) > self.bm.num_blocks:
            self.forget(seq.seq_id)
            return None
        return d

    def _make_room(self, d: Sequence, tokens: int, keep: set[int]) -> None:
        """Frees the copies asked for least recently (none of `keep`) until `tokens` more of `d` fit:
        sequences the policy stopped asking about, or preempted in the target, keep no blocks from those
        it asks about now."""
        need = self.bm.blocks_needed(d.num_computed_tokens + tokens) - len(d.block_ids)
        for seq_id in sorted((s for s in self.seqs if s not in keep), key=lambda s: self._used.get(s, 0)):
            if need <= self.bm.num_free_blocks:
                return
            self.forget(seq_id)

    def forget(self, seq_id: int) -> None:
        d = self.seqs.pop(seq_id, None)
        self.synced.pop(seq_id, None)
        self._used.pop(seq_id, None)
        if d is not None:
            self.bm.free(d)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _check_tokenizer(draft: str, target: str) -> None:
    """The draft's tokenizer must give the target's ids: checked on a probe text."""
    from engine.tokenizer import Tokenizer

    probe = "Speculative decoding: the quick brown fox, 12345 tokens! <tag> é中"
    a, b = Tokenizer(draft).encode(probe), Tokenizer(target).encode(probe)
    if a != b:
        raise ModelConfigError(f"draft model {draft!r}: its tokenizer gives other ids than the target's "
                               f"({a[:8]}... vs {b[:8]}...)")

