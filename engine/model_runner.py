"""Turns a SchedulerOutput into tensors, runs the model, samples. Owns the weights and the KV cache."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engine.attention import AttentionMetadata, PrefillSpan
from engine.config import CacheConfig, DeviceConfig, ModelConfig
from engine.guided import GuidedDecoder
from engine.kv_cache import KVCacheSpec, allocate_kv_cache, kv_cache_budget
from engine.layers.quantization import get_linear_method, quantize_model, set_int8_activations
from engine.loader import build_model
from engine.parallel import SINGLE, ParallelContext
from engine.platform import resolve_dtype
from engine.sampler import PromptLogprobs, Sampler, SamplingRow, TokenLogprobs, token_logprobs
from engine.scheduler import ScheduledSeq, SchedulerOutput
from engine.sequence import Sequence
from engine.spec_decode import accepted_prefix
from engine.tokenizer import eos_token_ids

log = logging.getLogger(__name__)

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# prompt logprobs take the logits of this many positions at a time: a long prefill chunk's
# [tokens, vocab] floats never exist at once
PROMPT_LOGPROBS_ROWS = 64


@dataclass
class StepOutput:
    """What a step gives back, by seq_id."""
    # the tokens appended: the next one, or with speculation the guesses that held and the one after them
    sampled: dict[int, list[int]] = field(default_factory=dict)
    logprobs: dict[int, list[TokenLogprobs]] = field(default_factory=dict)  # of those tokens, where asked for
    prompt_logprobs: dict[int, PromptLogprobs] = field(default_factory=dict)  # of the prompt tokens scored


@dataclass
class PromptRows:
    """Hidden-state rows of a step whose logits score a sequence's next prompt tokens."""
    seq: Sequence
    row: int  # the row of position `start`
    start: int  # a prompt position: its logits score prompt token start + 1
    count: int


def is_decode(s: ScheduledSeq) -> bool:
    """A decode: one new token, or one and the guesses after it (speculation), each row of which is
    computed as a decode of its own (its context ends at its position)."""
    return s.num_new_tokens == 1 or bool(s.draft)


def step_order(scheduled: list[ScheduledSeq]) -> list[ScheduledSeq]:
    """The order of a step's rows: decodes first, then prefills, each sequence's new tokens together."""
    return [s for s in scheduled if is_decode(s)] + [s for s in scheduled if not is_decode(s)]


def prompt_rows(scheduled: list[ScheduledSeq]) -> list[PromptRows]:
    """The rows whose logits score prompt tokens, of the sequences that report prompt logprobs in this
    step. Position p scores token p + 1; the last prompt position samples the first output token."""
    if not any(s.prompt_logprobs for s in scheduled):
        return []
    out, row = [], 0
    for s in step_order(scheduled):
        if s.prompt_logprobs:
            count = min(s.start + s.num_new_tokens, s.seq.num_prompt_tokens - 1) - s.start
            if count > 0:
                out.append(PromptRows(s.seq, row, s.start, count))
        row += s.num_new_tokens
    return out


class ModelRunner:
    def __init__(self, model_cfg: ModelConfig, cache_cfg: CacheConfig, device_cfg: DeviceConfig,
                 ctx: ParallelContext = SINGLE, num_blocks: int | None = None, quantization: str = "none"):
        self.model_cfg = model_cfg
        self.device = torch.device(device_cfg.device)
        self.dtype = TORCH_DTYPES[resolve_dtype(device_cfg.dtype, device_cfg.device)]  # (without an engine: tests)
        self.block_size = cache_cfg.block_size
        t0 = time.perf_counter()
        self.model = build_model(model_cfg, model_cfg.path, ctx, self.dtype, self.device)
        if self.device.type == "cpu":
            from engine.kernels import load_all

            load_all()  # before any timed step (the start-up profile); torch's ops where they cannot be built
        quantize_model(self.model, get_linear_method(quantization, self.dtype, self.device,
                                                     pack=device_cfg.packed_linear))
        if device_cfg.int8_activations and not set_int8_activations(self.model, True):
            log.warning("int8_activations: the model has no GGUF weights (the option applies to those only)")
        self.load_seconds = time.perf_counter() - t0
        attn = self.model.layers[0].self_attn if len(self.model.layers) else None
        self.kv_spec = KVCacheSpec(
            num_layers=self.model.num_local_layers,
            num_kv_heads=attn.num_kv_heads if attn else model_cfg.num_key_value_heads,
            head_dim=model_cfg.head_dim, block_size=cache_cfg.block_size, dtype=self.dtype,
            kv_cache_dtype=cache_cfg.kv_cache_dtype)
        if num_blocks is None:
            num_blocks = kv_cache_budget(cache_cfg, self.device) // self.kv_spec.block_bytes
        if num_blocks < 1:
            raise ValueError(f"KV cache budget too small: one block needs {self.kv_spec.block_bytes} bytes")
        self.num_blocks = num_blocks
        self.kv_caches = allocate_kv_cache(self.kv_spec, num_blocks, self.device)
        self.sampler = Sampler(eos_token_ids(model_cfg, model_cfg.path), device_cfg.seed, self.device)
        self.generators: dict[int, torch.Generator] = {}
        self._guided: GuidedDecoder | None = None  # built on the first guided request

    # ---- inputs --------------------------------------------------------------------------------
    def prepare(self, scheduled: list[ScheduledSeq]):
        """Token ids, positions and attention metadata for a step (decodes first, then prefills)."""
        bs = self.block_size
        order = step_order(scheduled)
        decodes = [s for s in order if is_decode(s)]
        prefills = order[len(decodes):]
        ids: list[int] = []
        pos: list[int] = []
        slot_b: list[int] = []
        slot_o: list[int] = []
        for s in order:
            seq = s.seq
            end = s.start + s.num_new_tokens
            ids.extend(seq.token_ids[s.start:end - len(s.draft)])
            ids.extend(s.draft)
            rng = range(s.start, end)
            pos.extend(rng)
            bt = seq.block_ids
            slot_b.extend(bt[p // bs] for p in rng)
            slot_o.extend(p % bs for p in rng)
        dev = self.device
        meta = AttentionMetadata(
            slot_blocks=torch.tensor(slot_b, dtype=torch.long, device=dev),
            slot_offsets=torch.tensor(slot_o, dtype=torch.long, device=dev),
            num_decode=sum(s.num_new_tokens for s in decodes))
        if decodes:
            # a row per new token: a speculating sequence's rows attend to one more position each (all
            # of this step's K/V are in the cache before any row attends)
            lens = [s.start + 1 + j for s in decodes for j in range(s.num_new_tokens)]
            max_len = max(lens)
            nb = -(-max_len // bs)
            tables = [s.seq.block_ids[:nb] + [0] * (nb - len(s.seq.block_ids[:nb])) for s in decodes]
            meta.decode_block_tables = torch.tensor(
                [t for s, t in zip(decodes, tables) for _ in range(s.num_new_tokens)], dtype=torch.long, device=dev)
            meta.decode_lens = lens_t = torch.tensor(lens, dtype=torch.long, device=dev)
            if min(lens) != nb * bs:  # some sequences end before the last slot: mask the rest
                lens_t = lens_t.view(-1, 1, 1, 1, 1)
                slots = torch.arange(nb * bs, device=dev).view(1, nb, 1, 1, bs)
                meta.decode_mask = slots < lens_t
        row = meta.num_decode  # rows, not sequences: a speculating decode has several
        groups: dict[int, list[int]] = {}
        for s in prefills:
            bt = None
            if s.start > 0:
                nb = -(-(s.start + s.num_new_tokens) // bs)
                bt = torch.tensor(s.seq.block_ids[:nb], dtype=torch.long, device=dev)
            else:
                groups.setdefault(s.num_new_tokens, []).append(row)
            meta.prefills.append(PrefillSpan(row, s.num_new_tokens, s.start, bt))
            row += s.num_new_tokens
        meta.prefill_groups = list(groups.items())
        # rows whose hidden state gives the next-token logits: each sampled sequence's last token, and
        # with speculation its guesses (a row each: the draws verify them)
        sample_rows, r = [], 0
        for s in order:
            r += s.num_new_tokens
            if s.sample:
                sample_rows.extend((s, row) for row in range(r - 1 - len(s.draft), r))
        input_ids = torch.tensor(ids, dtype=torch.long, device=dev)
        positions = torch.tensor(pos, dtype=torch.long, device=dev)
        return input_ids, positions, meta, sample_rows

    # ---- the step ------------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, out: SchedulerOutput, layer_done=None) -> StepOutput:
        """Runs one step.

        `layer_done(i)`: called once local layer i's KV for this step is in the cache (KV streaming)."""
        result = StepOutput()
        if out.empty:
            return result
        input_ids, positions, meta, sample_rows = self.prepare(out.scheduled)
        masks = self.begin_masks([s for s, _ in sample_rows])  # computed while the forward runs
        hidden = self.model(input_ids, positions, self.kv_caches, meta, layer_done=layer_done)
        if sample_rows:
            idx = torch.tensor([r for _, r in sample_rows], dtype=torch.long, device=self.device)
            logits = self.model.compute_logits(hidden[idx])
            result.sampled, result.logprobs = self.sample(logits, [s for s, _ in sample_rows], masks)
        result.prompt_logprobs = self.prompt_logprobs(hidden, prompt_rows(out.scheduled))
        return result

    def prompt_logprobs(self, hidden: torch.Tensor, spans: list[PromptRows], keep: bool = True):
        """{seq_id: PromptLogprobs} of the prompt tokens `spans` score, under the raw logits (before
        penalties, bias and grammar, as the sampler's logprobs), PROMPT_LOGPROBS_ROWS rows at a time.

        compute_logits is a collective of the last stage's TP ranks: each of them calls this with the
        same spans, and only the one with `keep` (the sampling rank) builds the result."""
        rows = [r for sp in spans for r in range(sp.row, sp.row + sp.count)]
        targets: list[int] = []
        ks: list[int | None] = []
        owners: list[int] = []
        out: dict[int, PromptLogprobs] = {}
        for sp in spans if keep else ():
            seq = sp.seq
            targets.extend(seq.token_ids[sp.start + 1:sp.start + sp.count + 1])
            ks.extend([seq.params.prompt_logprobs] * sp.count)
            owners.extend([seq.seq_id] * sp.count)
            out[seq.seq_id] = PromptLogprobs(sp.start + 1, [])
        for i in range(0, len(rows), PROMPT_LOGPROBS_ROWS):
            sl = slice(i, i + PROMPT_LOGPROBS_ROWS)
            idx = torch.tensor(rows[sl], dtype=torch.long, device=self.device)
            logits = self.model.compute_logits(hidden[idx])  # [<= PROMPT_LOGPROBS_ROWS, vocab]
            if not keep:
                continue
            lps = torch.log_softmax(logits.float(), dim=-1)
            got = token_logprobs(lps, torch.tensor(targets[sl], dtype=torch.long, device=self.device), ks[sl])
            for seq_id, lp in zip(owners[sl], got):
                out[seq_id].logprobs.append(lp)
        return out

    def guided(self) -> GuidedDecoder:
        if self._guided is None:
            path = Path(self.model_cfg.path) / "tokenizer.json"
            self._guided = GuidedDecoder(path.read_text(), self.model_cfg.vocab_size,
                                         tuple(self.sampler.eos_token_ids))
        return self._guided

    def begin_masks(self, seqs: list[ScheduledSeq]):
        """Starts the grammar masks of the guided sequences among `seqs` (the rows to sample, in order);
        None when there are none. sample() waits for them."""
        if not any(s.seq.params.guided for s in seqs):
            return None
        return self.guided().begin([s.seq for s in seqs])

    def sample(self, logits: torch.Tensor, seqs: list[ScheduledSeq], masks=None):
        """Draws a token for each row of `logits` (`seqs`: the row's sequence; a speculating sequence
        has 1 + len(draft) rows in a row, each with the history its guesses before it make) and keeps,
        per sequence, the draws up to the first guess that misses (engine/spec_decode.py).
        Returns ({seq_id: [token ids]}, {seq_id: [TokenLogprobs]} where logprobs were asked for)."""
        rows, spans, rewind = [], [], {}
        for s in seqs:
            seq = s.seq
            if spans and spans[-1][0] is s:
                j = len(rows) - spans[-1][1]  # the row's place among the sequence's
                spans[-1][2] += 1
            else:
                j = 0
                spans.append([s, len(rows), 1])
                gen = self._generator(seq)
                if s.draft and gen is not None and not seq.params.greedy:
                    rewind[seq.seq_id] = gen.get_state()
            history = seq.token_ids + s.draft[:j] if j else seq.token_ids
            rows.append(SamplingRow(seq.params, history, seq.num_prompt_tokens, gen))
        mask = None if masks is None else (lambda lg: self._guided.apply(masks, lg))
        tokens, lps = self.sampler(logits, rows, mask)
        sampled: dict[int, list[int]] = {}
        logprobs: dict[int, list[TokenLogprobs]] = {}
        for s, first, count in spans:
            sid = s.seq.seq_id
            got = accepted_prefix(s.draft, tokens[first:first + count]) if s.draft else [tokens[first]]
            sampled[sid] = got
            if lps[first] is not None:
                logprobs[sid] = lps[first:first + len(got)]
            if sid in rewind:  # the noise of the draws kept, as if only those had been made
                gen = self.generators[sid]
                gen.set_state(rewind[sid])
                for _ in got:
                    torch.empty(logits.shape[1], device=self.device).exponential_(generator=gen)
        return sampled, logprobs

    def _generator(self, seq) -> torch.Generator | None:
        if seq.params.seed is None:
            return None
        g = self.generators.get(seq.seq_id)
        if g is None:
            g = torch.Generator(device=self.device).manual_seed(seq.params.seed + 7919 * seq.index)
            # A sequence whose first tokens were sampled elsewhere (a prefill worker) replays those
            # draws (one noise vector of vocabulary size per sampled token), so a seeded request
            # samples the same tokens disaggregated as in one process.
            if not seq.params.greedy:
                for _ in range(seq.num_output_tokens):
                    torch.empty(self.model_cfg.vocab_size, device=self.device).exponential_(generator=g)
            self.generators[seq.seq_id] = g
        return g

    def release(self, seq_id: int) -> None:
        self.generators.pop(seq_id, None)
        if self._guided is not None:
            self._guided.release(seq_id)
