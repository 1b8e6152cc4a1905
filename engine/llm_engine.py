"""LLMEngine: one process, the whole loop. add_request / step / abort.

    add_request -> Scheduler.waiting
    step():  scheduler.schedule() -> runner.execute() -> scheduler.update() -> detokenize, stop strings
             -> RequestOutput deltas (new tokens and text per sequence; finish reasons)
"""

from __future__ import annotations

import gc
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from engine.block_manager import BlockManager
from engine.config import EngineConfig, ModelConfig
from engine.connector import KVConnector
from engine.errors import CapacityError, InvalidRequestError
from engine.executor import LocalExecutor, start_parallel
from engine.model_runner import ModelRunner, StepOutput
from engine.partition import check_tp
from engine.platform import setup_process
from engine.sampler import TokenLogprobs
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler, SchedulerOutput
from engine.sequence import Sequence, SequenceStatus
from engine.tokenizer import IncrementalDetokenizer, Tokenizer

log = logging.getLogger(__name__)


@dataclass
class CompletionOutput:
    index: int
    text: str  # new text since the last output of this sequence
    token_ids: list[int]  # new token ids since the last output
    logprobs: list[TokenLogprobs] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0  # prompt tokens the prefix cache held at admission (OpenAI's cached_tokens)
    # SamplingParams.prompt_logprobs: one per prompt token (the first's None), on the output that carries
    # sample 0's first token; None on every other
    prompt_logprobs: list[TokenLogprobs | None] | None = None


@dataclass
class _SeqState:
    seq: Sequence
    detok: IncrementalDetokenizer
    text: str = ""  # full (possibly truncated at a stop string) text
    emitted_chars: int = 0
    emitted_tokens: int = 0
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reported: bool = False
    # by prompt position, as the steps computing the prompt score them (a recomputation writes over)
    prompt_logprobs: list[TokenLogprobs | None] | None = None


@dataclass
class _RequestState:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[_SeqState]
    arrival_time: float


class LLMEngine:
    def __init__(self, config: EngineConfig, connector: KVConnector | None = None,
                 rank_module: str = "engine.rank_main"):
        """`connector` and `rank_module`: a worker's KV connector on every rank (prefill workers ship KV
        pages from every rank; engine/connector.py), rank 0's here, the others' from `rank_module`."""
        t0 = time.perf_counter()
        setup_process(config.device.device, config.device.num_threads, config.device.tune_malloc)
        self.config = config
        self.model_config = ModelConfig.from_dir(config.model)
        self.tokenizer = Tokenizer(config.model)
        self.max_model_len = min(config.scheduler.max_model_len or self.model_config.max_model_len,
                                 self.model_config.max_model_len)
        par = config.parallel
        if par.tp * par.pp > 1:
            check_tp(self.model_config.num_attention_heads, self.model_config.num_key_value_heads, par.tp)
            if par.pp > self.model_config.num_hidden_layers:
                raise ValueError(f"pp = {par.pp} exceeds the model's {self.model_config.num_hidden_layers} layers")
            self.executor = start_parallel(config, self.model_config, connector, rank_module)
        else:
            self.executor = LocalExecutor(ModelRunner(self.model_config, config.cache, config.device,
                                                      num_blocks=config.cache.num_blocks,
                                                      quantization=config.quantization), connector)
        self.runner = self.executor.runner
        # NOTE: block hashes are compared between workers, so their seed must name the model the same way
        # on every host: the checkpoint's config (not its path, which differs between hosts) and what
        # changes the KV computed from it (dtype, quantization, a quantized KV cache: its blocks hold other
        # numbers). Two fine-tunes of one base model with the same config.json would still share hashes; a
        # served model name would tell them apart. ("auto" adds nothing: the seeds of before stay valid.)
        hash_seed = f"{self.model_config.identity()}|{config.device.dtype}|{config.quantization}"
        if config.cache.kv_cache_dtype != "auto":
            hash_seed += f"|kv:{config.cache.kv_cache_dtype}"
        self.block_manager = BlockManager(self.executor.num_blocks, config.cache.block_size,
                                          config.cache.enable_prefix_caching, hash_seed=hash_seed)
        eos = tuple(self.runner.sampler.eos_token_ids)
        self.eos_token_ids = eos
        self.scheduler = Scheduler(self.block_manager, config.scheduler.max_num_seqs,
                                   config.scheduler.max_num_batched_tokens, self.max_model_len, eos)
        self._requests: dict[str, _RequestState] = {}
        self.last_step = (0, 0)  # (tokens, sequences) of the last step
        # pipeline parallelism: up to pp steps in flight, each on its own share of the running batch
        self.pipeline_depth = par.pp if par.pp > 1 and par.pipeline_steps else 1
        self._in_flight: deque = deque()  # (SchedulerOutput, launched) in launch order
        self._busy: set[int] = set()  # ids of the sequences in those steps
        self._finish_later: list[Sequence] = []  # aborted while in flight: freed when their step is back
        self._seq_state: dict[int, _SeqState] = {}
        bs = config.cache.block_size
        # what exists now lives as long as the engine: out of the collector's sight, so that the collections
        # a step's garbage triggers scan only the young (they took ~5% of a decode step)
        gc.collect()
        gc.freeze()
        log.info("engine ready in %.1fs (weights %.1fs): KV cache %d blocks x %d tokens = %d tokens "
                 "(%.1f MiB), max model len %d", time.perf_counter() - t0, self.runner.load_seconds,
                 self.executor.num_blocks, bs, self.executor.num_blocks * bs,
                 self.executor.num_blocks * self.runner.kv_spec.block_bytes / 2**20, self.max_model_len)

    @property
    def kv_capacity_tokens(self) -> int:
        return self.executor.num_blocks * self.config.cache.block_size

    # ---- requests ------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None,
                    arrival_time: float | None = None, held_tokens: int = 0, held_text: str = "") -> list[int]:
        """A resumed request (a migration) may carry what the client has not seen of its earlier output:
        `held_text`, text the earlier worker held back (a possible stop string), and `held_tokens`,
        trailing prompt tokens whose text was never decoded (mid-character). Their text leads the new
        tokens' text, and stop strings are matched across it."""
        params = params or SamplingParams()
        if request_id in self._requests:
            raise InvalidRequestError(f"request id {request_id!r} is already running", param="request_id")
        self._check_vocab(params)
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
        else:
            ids = list(prompt)
            if any(not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < self.model_config.vocab_size
                   for t in ids):
                raise InvalidRequestError(f"prompt token ids must be integers in [0, "
                                          f"{self.model_config.vocab_size})", param="prompt")
        if not ids:
            raise InvalidRequestError("prompt is empty", param="prompt")
        if len(ids) >= self.max_model_len:
            raise InvalidRequestError(f"prompt has {len(ids)} tokens; this model's context is "
                                      f"{self.max_model_len} (prompt + at least one new token)", param="prompt")
        if self.block_manager.blocks_needed(len(ids) + 1) > self.block_manager.num_blocks:
            raise CapacityError(f"prompt of {len(ids)} tokens does not fit the KV cache "
                                f"({self.kv_capacity_tokens} tokens)")
        seqs: list[_SeqState] = []
        first = None
        for i in range(params.n):
            seq = Sequence(request_id, i, list(ids), len(ids), params, parent=first)
            first = first or seq
            st = _SeqState(seq, IncrementalDetokenizer(self.tokenizer, ids, params.skip_special_tokens, held_tokens))
            st.text = held_text
            if seq.computes_prompt_logprobs:
                st.prompt_logprobs = [None] * len(ids)
            seqs.append(st)
            self._seq_state[seq.seq_id] = st
            self.scheduler.add(seq)
        self._requests[request_id] = _RequestState(request_id, ids, params, seqs,
                                                   arrival_time or time.monotonic())
        return ids

    def _check_vocab(self, params: SamplingParams) -> None:
        """Token ids in the parameters must exist in this model (the sampler indexes the logits by them)."""
        if any(t >= self.model_config.vocab_size for t in params.stop_token_ids):
            raise InvalidRequestError(f"stop_token_ids must be below the vocabulary size "
                                      f"({self.model_config.vocab_size})", param="stop_token_ids")

    def add_prefilled(self, request_id: str, prompt_ids: list[int], first_token: int, params: SamplingParams,
                      block_ids: list[int], held_tokens: int = 0, held_text: str = "") -> None:
        """A request whose prompt KV is already in `block_ids` (sent by a prefill worker, which also
        sampled and reported `first_token`). It joins the batch with num_computed_tokens = prompt_len.
        `held_text`: the text the prefill worker decoded but did not emit (held back for stop strings):
        it is emitted from here, and stop strings are matched across it."""
        if request_id in self._requests:
            raise InvalidRequestError(f"request id {request_id!r} is already running", param="request_id")
        if params.n != 1:
            raise InvalidRequestError("n > 1 is served colocated, not disaggregated", param="n")
        self._check_vocab(params)
        seq = Sequence(request_id, 0, list(prompt_ids) + [first_token], len(prompt_ids), params)
        seq.block_ids = list(block_ids)
        seq.num_computed_tokens = len(prompt_ids)
        st = _SeqState(seq, IncrementalDetokenizer(self.tokenizer, prompt_ids, params.skip_special_tokens,
                                                   held_tokens))
        st.detok.add(first_token)  # its text is in what P emitted plus `held_text`
        st.text = held_text
        st.emitted_chars, st.emitted_tokens = 0, 1  # the prefill worker reported the token
        self._seq_state[seq.seq_id] = st
        self._requests[request_id] = _RequestState(request_id, list(prompt_ids), params, [st], time.monotonic())
        self.scheduler.add(seq)

    def abort_request(self, request_id: str) -> bool:
        req = self._requests.pop(request_id, None)
        if req is None:
            return False
        for st in req.seqs:
            if st.seq.seq_id in self._busy:  # a step in flight still writes its KV: free its blocks after
                self._finish_later.append(st.seq)
            else:
                self.scheduler.finish(st.seq, SequenceStatus.FINISHED_ABORTED)
            self._drop(st.seq)
        return True

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests) or bool(self._in_flight)

    # ---- the loop ------------------------------------------------------------------------------
    def step(self, plan_kv: Callable[[SchedulerOutput], bytes] | None = None) -> list[RequestOutput]:
        """One schedule -> execute -> update round. `plan_kv(out)` (a worker's connector, scheduler side)
        sees the SchedulerOutput first and returns its plan for every rank's connector, encoded (a
        prefill worker pins the pages it will ship and names them there), or b"" for none."""
        if self.pipeline_depth > 1:
            return self._pipelined_step(plan_kv)
        out = self.scheduler.schedule()
        self.last_step = (out.num_batched_tokens, len(out.scheduled))  # for load reports
        kv_plan = plan_kv(out) if plan_kv is not None else b""
        return self._apply(out, self.executor.execute(out, kv_plan) if not out.empty else StepOutput())

    def _pipelined_step(self, plan_kv: Callable[[SchedulerOutput], bytes] | None) -> list[RequestOutput]:
        """Pipeline parallelism across steps (vLLM's virtual engines, in one scheduler): a step takes
        about 1/pp of the runnable sequences that are not in flight, is launched (stage 0 runs here,
        then hands on), and the oldest step in flight is collected once pp are in flight or nothing
        new could start. So stage s works on step k while stage s - 1 works on step k + 1."""
        depth = self.pipeline_depth
        runnable = len(self.scheduler.running) + len(self.scheduler.waiting)
        # a batch cut in pp costs a weight read per share: only worth it for big batches (ParallelConfig.
        # pipeline_min_seqs); smaller ones go whole, one step in flight, as without pipelining
        share = -(-runnable // depth)
        out = self.scheduler.schedule(busy=self._busy,
                                      max_seqs=share if share >= self.config.parallel.pipeline_min_seqs else None)
        if not out.empty:
            self.last_step = (out.num_batched_tokens, len(out.scheduled))
            kv_plan = plan_kv(out) if plan_kv is not None else b""
            self._in_flight.append((out, self.executor.launch(out, kv_plan)))
            self._busy.update(s.seq.seq_id for s in out.scheduled)
        if not self._in_flight or (len(self._in_flight) < depth and not out.empty):
            return []
        done, launched = self._in_flight.popleft()
        result = self.executor.collect(launched)
        self._busy.difference_update(s.seq.seq_id for s in done.scheduled)
        later = []
        for seq in self._finish_later:
            if seq.seq_id in self._busy:
                later.append(seq)
            else:
                self.scheduler.finish(seq, SequenceStatus.FINISHED_ABORTED)
        self._finish_later = later
        return self._apply(done, result)

    def _apply(self, out, result: StepOutput) -> list[RequestOutput]:
        """A step's tokens into the scheduler, the detokenizers and the outputs."""
        sampled, logprobs = result.sampled, result.logprobs
        self.scheduler.update(out, sampled)
        touched: dict[str, list[_SeqState]] = {}
        for s in out.scheduled:
            seq = s.seq
            st = self._seq_state.get(seq.seq_id)
            if st is None:
                continue
            plp = result.prompt_logprobs.get(seq.seq_id)
            if plp is not None and st.prompt_logprobs is not None:
                st.prompt_logprobs[plp.start:plp.start + len(plp.logprobs)] = plp.logprobs
            if seq.seq_id not in sampled:
                continue
            token = sampled[seq.seq_id]
            if seq.seq_id in logprobs:
                st.logprobs.append(logprobs[seq.seq_id])
            self._detokenize(st, token)
            touched.setdefault(seq.request_id, []).append(st)
        return [self._make_output(rid, sts) for rid, sts in touched.items()]

    def generate(self, prompts: list[str | list[int]], params: SamplingParams | list[SamplingParams]):
        """Runs prompts to completion; returns one dict per prompt: token_ids/text/logprobs per sample, and
        the prompt's logprobs (None unless asked for)."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        ids = [f"gen-{time.monotonic_ns()}-{i}" for i in range(len(prompts))]
        results: dict[str, dict] = {}
        for rid, p, sp in zip(ids, prompts, plist):
            self.add_request(rid, p, sp)
            results[rid] = {"outputs": [{"token_ids": [], "text": "", "logprobs": [], "finish_reason": None}
                                        for _ in range(sp.n)], "prompt_logprobs": None}
        while self.has_unfinished_requests():
            for ro in self.step():
                if ro.prompt_logprobs is not None:
                    results[ro.request_id]["prompt_logprobs"] = ro.prompt_logprobs
                for co in ro.outputs:
                    o = results[ro.request_id]["outputs"][co.index]
                    o["token_ids"] += co.token_ids
                    o["text"] += co.text
                    o["logprobs"] += co.logprobs or []
                    o["finish_reason"] = co.finish_reason or o["finish_reason"]
        return [results[r] for r in ids]

    def stats(self) -> dict:
        return {
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
            "kv_usage": self.block_manager.usage,
            "num_free_blocks": self.block_manager.num_free_blocks,
            "num_blocks": self.block_manager.num_blocks,
            "prefix_cache_hit_rate": self.block_manager.stats.hit_rate,
            "prompt_tokens_total": self.block_manager.stats.queries,  # looked up at admission or reservation
            "prefix_hit_tokens_total": self.block_manager.stats.hits,
            "num_preemptions": self.scheduler.num_preemptions,
            "num_queued_tokens": self.num_queued_tokens(),
        }

    def num_queued_tokens(self) -> int:
        """Tokens scheduled sequences have still to compute (prompts waiting or mid-prefill)."""
        return sum(s.num_tokens - s.num_computed_tokens for s in (*self.scheduler.waiting, *self.scheduler.running))

    # ---- helpers -------------------------------------------------------------------------------
    def _detokenize(self, st: _SeqState, token: int) -> None:
        seq = st.seq
        delta = st.detok.add(token)
        st.text += delta
        stops = seq.params.stop
        if stops and delta and not seq.is_finished:
            search_from = max(0, len(st.text) - len(delta) - max(map(len, stops)) + 1)
            hit = None
            for s in stops:
                k = st.text.find(s, search_from)
                if k != -1 and (hit is None or k < hit[0]):
                    hit = (k, s)
            if hit is not None:
                k, s = hit
                st.text = st.text[:k + len(s)] if seq.params.include_stop_str_in_output else st.text[:k]
                seq.stop_reason = s
                self.scheduler.finish(seq, SequenceStatus.FINISHED_STOPPED)

    def _make_output(self, request_id: str, sts: list[_SeqState]) -> RequestOutput:
        req = self._requests[request_id]
        outs = []
        prompt_lps = None
        for st in sts:
            seq = st.seq
            if st.prompt_logprobs is not None and st.emitted_tokens == 0:  # its first token goes out now
                prompt_lps, st.prompt_logprobs = st.prompt_logprobs, None
            done = seq.is_finished
            hold = 0 if done or not seq.params.stop else max(map(len, seq.params.stop)) - 1
            upto = max(st.emitted_chars, len(st.text) - hold)
            text = st.text[st.emitted_chars:upto]
            st.emitted_chars = upto
            new_ids = seq.output_token_ids[st.emitted_tokens:]
            st.emitted_tokens = seq.num_output_tokens
            lps = None
            if seq.params.logprobs is not None:
                lps, st.logprobs = st.logprobs, []
            reason = None
            if done and not st.finish_reported:
                reason = seq.status.value
                st.finish_reported = True
                self._drop(seq)
            outs.append(CompletionOutput(seq.index, text, new_ids, lps, reason, seq.stop_reason))
        finished = all(st.seq.is_finished for st in req.seqs)
        if finished:
            del self._requests[request_id]
        cached = max((st.seq.num_cached_tokens for st in req.seqs), default=0)
        return RequestOutput(request_id, req.prompt_token_ids, outs, finished, cached, prompt_lps)

    def _drop(self, seq: Sequence) -> None:
        self._seq_state.pop(seq.seq_id, None)
        self.executor.release(seq.seq_id)

    def shutdown(self) -> None:
        """Stops the other ranks of a TP x PP replica (no-op in one process). Idempotent."""
        self.executor.shutdown()
