"""LLMEngine: one process, the whole loop. add_request / step / abort.

    add_request -> Scheduler.waiting
    step_core(): stop strings reported since the last step finish their sequences -> scheduler.schedule()
                 -> runner.execute() -> scheduler.update() -> CoreStep (token ids, logprobs, finishes)
    step():      step_core() -> OutputProcessor.process() (detokenize, stop strings, held text)
                 -> RequestOutput deltas (new tokens and text per sequence; finish reasons)

A worker runs step_core() on its loop thread and the OutputProcessor (`self.outputs`) on an output
thread, which reports stop strings back through report_stop(); step() runs both inline.
"""

from __future__ import annotations

import gc
import logging
import queue
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace

from engine.block_manager import BlockManager
from engine.config import EngineConfig, ModelConfig
from engine.connector import KVConnector
from engine.errors import CapacityError, InvalidRequestError
from engine.executor import LocalExecutor, start_parallel
from engine.model_runner import ModelRunner, StepOutput
from engine.output_processor import (
    CompletionOutput,
    CoreStep,
    OutputProcessor,
    RequestAborted,
    RequestAdded,
    RequestOutput,
    SeqUpdate,
    StopHit,
)
from engine.partition import check_tp
from engine.platform import resolve_device, setup_process
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler, SchedulerOutput
from engine.sequence import Sequence, SequenceStatus
from engine.spec_decode import NgramProposer
from engine.tokenizer import Tokenizer

log = logging.getLogger(__name__)


__all__ = ["CompletionOutput", "LLMEngine", "RequestOutput"]


@dataclass
class _Request:
    seqs: list[Sequence]
    arrival_time: float


class LLMEngine:
    def __init__(self, config: EngineConfig, connector: KVConnector | None = None,
                 rank_module: str = "engine.rank_main"):
        """`connector` and `rank_module`: a worker's KV connector on every rank (prefill workers ship KV
        pages from every rank; engine/connector.py), rank 0's here, the others' from `rank_module`."""
        t0 = time.perf_counter()
        setup_process(config.device.device, config.device.num_threads, config.device.tune_malloc)
        # `auto` becomes this host's dtype here, once: the ranks, the KV cache, the layout a worker
        # registers and the prefix hashes all get the resolved config
        asked, device = config.device.dtype, resolve_device(config.device)
        if device is not config.device:
            config = replace(config, device=device)
        self.config = config
        # the context limit picks LongRoPE's factor set (engine/config.py: RopeScaling), on every rank alike
        self.model_config = ModelConfig.from_dir(config.model).with_context_limit(config.scheduler.max_model_len)
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
        spec = config.speculative
        self.scheduler = Scheduler(self.block_manager, config.scheduler.max_num_seqs,
                                   config.scheduler.max_num_batched_tokens, self.max_model_len, eos,
                                   proposer=self._proposer(config),
                                   num_speculative_tokens=spec.num_tokens, speculative_max_batch=spec.max_batch)
        self._requests: dict[str, _Request] = {}  # unfinished, as the core sees them
        self._seqs: dict[int, Sequence] = {}  # their unfinished sequences
        self.outputs = OutputProcessor(self.tokenizer)  # step() runs it; a worker's output thread may instead
        self._events: list[RequestAdded | RequestAborted] = []  # for the next CoreStep
        self._stops: queue.SimpleQueue[StopHit] = queue.SimpleQueue()  # from whichever thread processes outputs
        self.last_step = (0, 0)  # (tokens, sequences) of the last step
        # pipeline parallelism: up to pp steps in flight, each on its own share of the running batch
        self.pipeline_depth = par.pp if par.pp > 1 and par.pipeline_steps else 1
        # steps in flight side by side are not timed one by one: speculation is weighed without exploring
        self.scheduler.spec_policy.timed = self.pipeline_depth == 1
        self._in_flight: deque = deque()  # (SchedulerOutput, launched) in launch order
        self._busy: set[int] = set()  # ids of the sequences in those steps
        self._finish_later: list[Sequence] = []  # aborted while in flight: freed when their step is back
        bs = config.cache.block_size
        # what exists now lives as long as the engine: out of the collector's sight, so that the collections
        # a step's garbage triggers scan only the young (they took ~5% of a decode step)
        gc.collect()
        gc.freeze()
        log.info("engine ready in %.1fs (weights %.1fs): dtype %s%s, KV cache %d blocks x %d tokens = %d tokens "
                 "(%.1f MiB), max model len %d", time.perf_counter() - t0, self.runner.load_seconds,
                 config.device.dtype, " (auto)" if asked == "auto" else "",
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
        seqs: list[Sequence] = []
        first = None
        for i in range(params.n):
            seq = Sequence(request_id, i, list(ids), len(ids), params, parent=first)
            first = first or seq
            seqs.append(seq)
            self._seqs[seq.seq_id] = seq
            self.scheduler.add(seq)
        self._requests[request_id] = _Request(seqs, arrival_time or time.monotonic())
        self._events.append(RequestAdded(request_id, ids, params, [s.seq_id for s in seqs], held_tokens, held_text))
        return ids

    def _proposer(self, config: EngineConfig):
        """Speculative decoding's proposer (engine/spec_decode.py), or None."""
        spec = config.speculative
        if not spec.enabled:
            return None
        if spec.draft is None:
            return NgramProposer(spec.ngram_min, spec.ngram_max)
        from engine.draft_proposer import DraftProposer

        # the draft's cache: a quarter of the target's budget where one is set, else 256 MiB
        memory = config.cache.kv_cache_memory // 4 if config.cache.kv_cache_memory else 256 * 2**20
        return DraftProposer(spec.draft, self.model_config, config.device, memory, config.cache.block_size,
                             spec.draft_quantization)

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
        self._seqs[seq.seq_id] = seq
        self._requests[request_id] = _Request([seq], time.monotonic())
        self._events.append(RequestAdded(request_id, list(prompt_ids), params, [seq.seq_id], held_tokens, held_text,
                                         first_token))
        self.scheduler.add(seq)

    def abort_request(self, request_id: str) -> bool:
        req = self._requests.pop(request_id, None)
        if req is None:
            return False
        for seq in req.seqs:
            if seq.seq_id in self._seqs:
                self._finish(seq, SequenceStatus.FINISHED_ABORTED)
        self._events.append(RequestAborted(request_id))
        return True

    def report_stop(self, hit: StopHit) -> None:
        """(any thread) A stop string ended a sequence: the loop finishes it before its next schedule()."""
        self._stops.put(hit)

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests) or bool(self._in_flight)

    # ---- the loop ------------------------------------------------------------------------------
    def step(self, plan_kv: Callable[[SchedulerOutput], bytes] | None = None) -> list[RequestOutput]:
        """One schedule -> execute -> update round, and its outputs. `plan_kv(out)` (a worker's
        connector, scheduler side) sees the SchedulerOutput first and returns its plan for every rank's
        connector, encoded (a prefill worker pins the pages it will ship and names them there), or b""
        for none."""
        outputs, stops = self.outputs.process(self.step_core(plan_kv))
        for hit in stops:
            self.report_stop(hit)
        self._apply_stops()  # as if found in the step itself: nothing more is computed for them
        return outputs

    def step_core(self, plan_kv: Callable[[SchedulerOutput], bytes] | None = None) -> CoreStep:
        """step() without the output processing: the token ids, logprobs and finishes the step computed,
        for `self.outputs.process()`, inline or on another thread (which reports stop strings back)."""
        finished = self._apply_stops()
        if self.pipeline_depth > 1:
            core = self._pipelined_step(plan_kv)
        else:
            t0 = time.perf_counter()
            out = self.scheduler.schedule()
            self.last_step = (out.num_batched_tokens, len(out.scheduled))  # for load reports
            kv_plan = plan_kv(out) if plan_kv is not None else b""
            result = self.executor.execute(out, kv_plan) if not out.empty else StepOutput()
            if out.scheduled and all(s.sample and s.num_new_tokens - len(s.draft) == 1 for s in out.scheduled):
                # decodes only: the step times speculation is weighed with (engine/spec_decode.py), the
                # proposer's time (a draft model's steps) included
                self.scheduler.spec_policy.observe_step(out.num_batched_tokens, time.perf_counter() - t0)
            core = self._update(out, result)
        core.finished[:0] = finished
        return core

    def _pipelined_step(self, plan_kv: Callable[[SchedulerOutput], bytes] | None) -> CoreStep:
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
            return self._take_events(CoreStep())
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
        return self._update(done, result)

    def _update(self, out: SchedulerOutput, result: StepOutput) -> CoreStep:
        """A step's tokens into the scheduler; what each sequence got, for the output processor."""
        sampled, logprobs = result.sampled, result.logprobs
        # the sequences that take this step's tokens: not aborted or finished while it ran
        live = [s.seq for s in out.scheduled if s.seq.seq_id in self._seqs]
        self.scheduler.update(out, sampled)
        core = self._take_events(CoreStep())
        for seq in live:
            sid = seq.seq_id
            fin = seq.status.value if seq.is_finished else None
            core.updates.append(SeqUpdate(sid, seq.request_id, sampled.get(sid, []), logprobs.get(sid),
                                          result.prompt_logprobs.get(sid), fin, seq.stop_reason if fin else None,
                                          seq.num_cached_tokens))
            if fin is not None:
                self._finish(seq, seq.status, core.finished)
        return core

    def _take_events(self, core: CoreStep) -> CoreStep:
        core.events, self._events = self._events, []
        return core

    def _apply_stops(self) -> list[str]:
        """Finishes the sequences whose stop strings the output processor found; returns the requests
        that finished with them."""
        done: list[str] = []
        while True:
            try:
                hit = self._stops.get_nowait()
            except queue.Empty:
                return done
            seq = self._seqs.get(hit.seq_id)
            if seq is not None:  # (not aborted, nor finished by the scheduler since)
                seq.stop_reason = hit.stop
                self._finish(seq, SequenceStatus.FINISHED_STOPPED, done)

    def _finish(self, seq: Sequence, status: SequenceStatus, done: list[str] | None = None) -> None:
        """The core is done with `seq` (the scheduler may have finished it already); a request whose
        sequences are all done leaves (and is named in `done`)."""
        if seq.seq_id in self._busy:  # a step in flight still writes its KV: free its blocks after
            self._finish_later.append(seq)
        else:
            self.scheduler.finish(seq, status)
        del self._seqs[seq.seq_id]
        self.executor.release(seq.seq_id)
        req = self._requests.get(seq.request_id)
        if req is not None and not any(s.seq_id in self._seqs for s in req.seqs):
            del self._requests[seq.request_id]
            if done is not None:
                done.append(seq.request_id)

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
            "spec_proposed_tokens_total": self.scheduler.num_proposed,
            "spec_accepted_tokens_total": self.scheduler.num_accepted,
            "num_queued_tokens": self.num_queued_tokens(),
        }

    def num_queued_tokens(self) -> int:
        """Tokens scheduled sequences have still to compute (prompts waiting or mid-prefill)."""
        return sum(s.num_tokens - s.num_computed_tokens for s in (*self.scheduler.waiting, *self.scheduler.running))

    def shutdown(self) -> None:
        """Stops the other ranks of a TP x PP replica (no-op in one process). Idempotent."""
        self.executor.shutdown()
