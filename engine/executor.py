"""Executors run a SchedulerOutput on a model replica: one process, or TP x PP rank processes.

    driver (rank 0: scheduler, I/O)            follower ranks (model shards only)
      schedule() -> StepMsg ──broadcast──▶        decode StepMsg, mirror sequences
      forward (stage 0, TP shard 0)               forward (their stage, their TP shard)
           │ hidden ──send──▶ stage 1 ... ──▶ last stage: logits (TP all-gather), TP rank 0 samples
      ◀── StepResult (tokens, logprobs, prompt logprobs) ──┘ (unless the driver is the last stage itself)

One broadcast per step carries everything the followers need: for each scheduled sequence the tokens
being computed, its block table, whether it samples, and (first time only) its prompt length and
sampling parameters. It is msgspec-encoded into a uint8 tensor: no pickle crosses a process.
Followers mirror each sequence's token ids, so the sampling rank has the history penalties need, and
the last stage's TP ranks all know which rows score prompt tokens (their logits are one collective).
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import timedelta

import msgspec
import torch
import torch.distributed as dist

from engine.config import CacheConfig, DeviceConfig, ModelConfig
from engine.connector import KVConnector
from engine.model_runner import ModelRunner, StepOutput, prompt_rows
from engine.parallel import ParallelContext
from engine.sampler import PromptLogprobs, TokenLogprobs
from engine.sampling_params import SamplingParams
from engine.scheduler import ScheduledSeq, SchedulerOutput
from engine.sequence import Sequence

log = logging.getLogger(__name__)


# Measured on SmolLM2, pp=2 on 2 cores: 8 prompts of 256 tokens in 2 micro-batches prefill 20% faster
# than in one; 8-sequence decode steps cut in 2 got 10% slower, in 4 twice as slow.
MIN_MICRO_BATCH_TOKENS = 128


class SeqStep(msgspec.Struct, array_like=True):
    seq_id: int
    index: int
    start: int
    tokens: list[int]  # token_ids[start:start + num_new]
    # token_ids[held:start]: what the ranks' mirror lacks before start (held: the tokens it holds; 0 the
    # first time a rank sees the sequence, then the end of its last step's, where accepted guesses follow)
    prefix: list[int]
    block_ids: list[int]
    sample: bool
    num_prompt_tokens: int = 0
    params: dict | None = None  # SamplingParams fields; only the first time a rank sees the sequence
    prompt_logprobs: bool = False  # ScheduledSeq.prompt_logprobs
    # with prompt_logprobs, the token after the step's when the step ends inside the prompt: the score
    # of its last position
    next_token: int = -1
    draft: list[int] = []  # ScheduledSeq.draft: guessed tokens computed after `tokens` (speculation)


class StepMsg(msgspec.Struct, array_like=True):
    seqs: list[SeqStep]
    finished: list[int] = []
    shutdown: bool = False
    kv_plan: bytes = b""  # the worker's KV connector plan for this step (engine/connector.py); opaque here


class PromptLogprobsMsg(msgspec.Struct, array_like=True):
    seq_id: int
    start: int  # PromptLogprobs.start
    logprobs: list[tuple[float, list[tuple[int, float]]]]


class StepResult(msgspec.Struct, array_like=True):
    seq_ids: list[int]
    tokens: list[list[int]]  # StepOutput.sampled: one each, or more with speculation
    logprobs: list[list[tuple[float, list[tuple[int, float]]]] | None]
    prompt_logprobs: list[PromptLogprobsMsg] = []


_enc = msgspec.msgpack.Encoder()
_step_dec = msgspec.msgpack.Decoder(StepMsg)
_result_dec = msgspec.msgpack.Decoder(StepResult)


def _params_dict(p: SamplingParams) -> dict:
    return {k: getattr(p, k) for k in SamplingParams.__dataclass_fields__}


def _token_logprobs(lp: tuple[float, list]) -> TokenLogprobs:
    return TokenLogprobs(lp[0], [tuple(x) for x in lp[1]])


def forward_with(connector: KVConnector | None, rank: int, runner: ModelRunner, kv_plan: bytes,
                 seq_ids: list[int], forward):
    """Runs `forward(layer_done)` with the connector's hooks for this plan, if it has any."""
    hooks = connector.start_forward(rank, runner, kv_plan, seq_ids) if connector is not None and kv_plan else None
    if hooks is None:
        return forward(None)
    result = forward(hooks.on_layer_done)
    hooks.finish()
    return result


class LocalExecutor:
    """tp = pp = 1: the runner in this process, with the worker's KV connector (engine/connector.py)."""

    def __init__(self, runner: ModelRunner, connector: KVConnector | None = None):
        self.runner = runner
        self.num_blocks = runner.num_blocks
        self.connector = connector

    def execute(self, out: SchedulerOutput, kv_plan: bytes = b""):
        return forward_with(self.connector, 0, self.runner, kv_plan, [s.seq.seq_id for s in out.scheduled],
                            lambda layer_done: self.runner.execute(out, layer_done))

    def release(self, seq_id: int) -> None:
        self.runner.release(seq_id)

    def shutdown(self) -> None:
        pass


class RankRuntime:
    """What every rank (driver included) does with a step: its forward and, on the sampling rank, sampling."""

    def __init__(self, rank: int, tp: int, pp: int, model_cfg: ModelConfig, cache_cfg: CacheConfig,
                 device_cfg: DeviceConfig, quantization: str, num_blocks: int | None, timeout: float,
                 connector: KVConnector | None = None):
        self.rank, self.tp, self.pp = rank, tp, pp
        self.connector = connector
        self.num_micro_batches = pp  # set from ParallelConfig.micro_batches by init_rank
        self.tp_rank, self.pp_rank = rank % tp, rank // tp
        self.timeout = timedelta(seconds=timeout)
        groups = [dist.new_group([p * tp + t for t in range(tp)], timeout=self.timeout) for p in range(pp)]
        ctx = ParallelContext(self.tp_rank, tp, self.pp_rank, pp, groups[self.pp_rank])
        self.runner = ModelRunner(model_cfg, cache_cfg, device_cfg, ctx, num_blocks, quantization)
        n = torch.tensor([self.runner.num_blocks])
        dist.all_reduce(n, op=dist.ReduceOp.MIN)  # every rank must agree on the pool size
        self.num_blocks = int(n)
        self.hidden_size = model_cfg.hidden_size
        self.sampler_rank = (pp - 1) * tp
        self.mirror: dict[int, Sequence] = {}

    def run(self, msg: StepMsg, driver_seqs: dict[int, Sequence] | None = None):
        """This rank's part of a step. Returns StepResult on the sampling rank, else None.

        With pp > 1 the step's sequences are cut into micro-batches that flow through the stages
        one after another: while stage s + 1 runs micro-batch k, stage s runs k + 1."""
        scheduled = []
        for s in msg.seqs:
            seq = driver_seqs[s.seq_id] if driver_seqs is not None else self._mirror(s)
            scheduled.append(ScheduledSeq(seq, s.start, len(s.tokens) + len(s.draft), s.sample, s.prompt_logprobs,
                                          s.draft))
        sampled, lps, plps = {}, {}, {}
        k = 1
        if self.pp > 1:  # only big steps are worth cutting: a micro-batch costs a send/recv round
            k = min(self.num_micro_batches, sum(s.num_new_tokens for s in scheduled) // MIN_MICRO_BATCH_TOKENS)
        for group in micro_batches(scheduled, k):
            forward_with(self.connector, self.rank, self.runner, msg.kv_plan, [s.seq.seq_id for s in group],
                         lambda layer_done, g=group: self._run_group(g, layer_done, sampled, lps, plps))
        for seq_id in msg.finished:
            self.runner.release(seq_id)
            self.mirror.pop(seq_id, None)
        if self.rank != self.sampler_rank or not any(s.has_output for s in scheduled):
            return None
        ids_ = list(sampled)
        return StepResult(ids_, [sampled[i] for i in ids_],
                          [[(lp.logprob, lp.top) for lp in lps[i]] if i in lps else None for i in ids_],
                          [PromptLogprobsMsg(i, p.start, [(lp.logprob, lp.top) for lp in p.logprobs])
                           for i, p in plps.items()])

    def _run_group(self, group: list[ScheduledSeq], layer_done, sampled: dict, lps: dict, plps: dict) -> None:
        ids, pos, meta, rows = self.runner.prepare(group)
        masks = self.runner.begin_masks([s for s, _ in rows]) if self.rank == self.sampler_rank else None
        with torch.inference_mode():
            hidden = None
            if self.pp_rank > 0:
                hidden = torch.empty(len(ids), self.hidden_size, dtype=self.runner.dtype, device=self.runner.device)
                dist.recv(hidden, src=self.rank - self.tp)
            h = self.runner.model(ids if self.pp_rank == 0 else None, pos, self.runner.kv_caches, meta,
                                  hidden=hidden, layer_done=layer_done)
            if self.pp_rank < self.pp - 1:
                dist.send(h.contiguous(), dst=self.rank + self.tp)
                return
            sampling = self.rank == self.sampler_rank
            if rows:
                idx = torch.tensor([r for _, r in rows], device=self.runner.device)
                logits = self.runner.model.compute_logits(h[idx])  # TP ranks all-gather together
                if sampling:
                    got, got_lps = self.runner.sample(logits, [s for s, _ in rows], masks)
                    sampled.update(got)
                    lps.update(got_lps)
            # every TP rank derives the same rows from the step (and calls compute_logits alike)
            plps.update(self.runner.prompt_logprobs(h, prompt_rows(group), keep=sampling))

    def _mirror(self, s: SeqStep) -> Sequence:
        seq = self.mirror.get(s.seq_id)
        if seq is None:
            params = SamplingParams(**s.params) if s.params is not None else SamplingParams()
            seq = Sequence("", s.index, list(s.prefix), s.num_prompt_tokens, params, seq_id=s.seq_id)
            self.mirror[s.seq_id] = seq
        if s.prefix:  # the tokens it lacks before start (the mirror holds those before them)
            del seq.token_ids[s.start - len(s.prefix):]
            seq.token_ids.extend(s.prefix)
        del seq.token_ids[s.start:]
        seq.token_ids.extend(s.tokens)
        if s.next_token >= 0:
            seq.token_ids.append(s.next_token)  # replaced by the next step's tokens
        seq.block_ids = s.block_ids
        return seq


def micro_batches(scheduled: list[ScheduledSeq], k: int) -> list[list[ScheduledSeq]]:
    """Contiguous groups of about equal token counts (at most k, none empty); deterministic, so every
    rank cuts a step alike."""
    k = max(1, min(k, len(scheduled)))
    if k == 1:
        return [scheduled] if scheduled else []
    total = sum(s.num_new_tokens for s in scheduled)
    groups, cur, acc = [], [], 0
    for i, s in enumerate(scheduled):
        cur.append(s)
        acc += s.num_new_tokens
        left_groups = k - len(groups) - 1
        left_seqs = len(scheduled) - i - 1
        if left_groups > 0 and (acc >= total * (len(groups) + 1) / k or left_seqs == left_groups):
            groups.append(cur)
            cur = []
    if cur:
        groups.append(cur)
    return groups


def _broadcast_bytes(data: bytes | None, src: int = 0) -> bytes:
    n = torch.tensor([len(data) if data is not None else 0], dtype=torch.long)
    dist.broadcast(n, src)
    buf = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data is not None else \
        torch.empty(int(n), dtype=torch.uint8)
    if int(n):
        dist.broadcast(buf, src)
    return buf.numpy().tobytes()


class _Sends:
    """Non-blocking sends whose buffers must live until they complete."""

    def __init__(self):
        self.pending: list[tuple[object, torch.Tensor]] = []

    def isend(self, data: bytes, dst: int) -> None:
        n = torch.tensor([len(data)], dtype=torch.long)
        buf = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        self.pending.append((dist.isend(n, dst=dst), n))
        self.pending.append((dist.isend(buf, dst=dst), buf))

    def wait(self) -> None:
        for work, _ in self.pending:
            work.wait()
        self.pending = []


def send_step(data: bytes, world: int, sends: _Sends) -> None:
    """The driver's step message to every other rank, without waiting for any of them: a stage still
    busy with the previous step takes it when it gets there (pipeline parallelism)."""
    for r in range(1, world):
        sends.isend(data, r)


def send_bytes(data: bytes, dst: int) -> None:
    dist.send(torch.tensor([len(data)], dtype=torch.long), dst=dst)
    dist.send(torch.frombuffer(bytearray(data), dtype=torch.uint8), dst=dst)


def recv_bytes(src: int) -> bytes:
    n = torch.empty(1, dtype=torch.long)
    dist.recv(n, src=src)
    buf = torch.empty(int(n), dtype=torch.uint8)
    dist.recv(buf, src=src)
    return buf.numpy().tobytes()


def exchange_strings(mine: str, rank: int, world: int) -> list[str]:
    """Rank 0 broadcasts its string and gathers everyone's (one per rank), e.g. socket endpoints
    created after the group formed. Every rank calls it once, before the step loop."""
    driver = _broadcast_bytes(mine.encode() if rank == 0 else None).decode()
    if rank != 0:
        send_bytes(mine.encode(), 0)
        return [driver]
    return [driver] + [recv_bytes(r).decode() for r in range(1, world)]


class ParallelExecutor:
    """The driver's side of a TP x PP replica (rank 0 of a gloo/NCCL world of tp * pp processes).

    While idle it broadcasts an empty step every `heartbeat_s`, so the followers' waits (bounded by
    the group timeout) never expire on a healthy but quiet worker.
    """

    def __init__(self, runtime: RankRuntime, heartbeat_s: float = 5.0, followers=()):
        self.rt = runtime
        self.num_blocks = runtime.num_blocks
        self.runner = runtime.runner
        self.followers = list(followers)  # subprocess.Popen of the other ranks
        self._known: dict[int, int] = {}  # seq_id -> how many of its tokens the other ranks' mirrors hold
        self._finished: list[int] = []
        self.broken = False  # a rank died: every later step fails; the worker must exit
        self.world = runtime.tp * runtime.pp
        self.pp = runtime.pp
        self._sends = _Sends()  # heartbeats and shutdown
        self.in_flight = 0  # launched steps not collected yet
        self.max_in_flight = 0
        self._lock = threading.Lock()
        self._last = time.monotonic()
        self._closed = threading.Event()
        self._beat = threading.Thread(target=self._heartbeats, args=(heartbeat_s,), daemon=True,
                                      name="executor-heartbeat")
        self._beat.start()

    def _heartbeats(self, every: float) -> None:
        while not self._closed.wait(every / 2):
            with self._lock:
                if self._closed.is_set() or time.monotonic() - self._last < every:
                    continue
                if self.in_flight:
                    continue  # the ranks are busy with a step: they are not waiting
                try:
                    send_step(_enc.encode(StepMsg([], self._finished)), self.world, self._sends)
                    self._sends.wait()
                    self._finished = []
                    self._last = time.monotonic()
                except RuntimeError:
                    log.error("a rank of this worker is gone; the worker cannot go on")
                    self.broken = True
                    self._closed.set()

    def execute(self, out: SchedulerOutput, kv_plan: bytes = b""):
        """One step, start to finish."""
        return self.collect(self.launch(out, kv_plan))

    def launch(self, out: SchedulerOutput, kv_plan: bytes = b""):
        """Starts a step: the step message goes to every rank and this rank (stage 0) runs its layers
        and hands the hidden states on; it returns before the later stages are done, so the next
        step's stage 0 can run while they work on this one. `collect` waits for its tokens."""
        with self._lock:
            self._last = time.monotonic()
            try:
                sampling = self._launch(out, kv_plan)
            except RuntimeError:
                self.broken = True
                raise
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            return sampling

    def collect(self, launched) -> StepOutput:
        """The sampled tokens, their logprobs and prompt logprobs of a launched step, in launch order."""
        with self._lock:
            try:
                return self._collect(launched)
            except RuntimeError:
                self.broken = True
                raise
            finally:
                self.in_flight -= 1

    def _collect(self, launched):
        result, sampling, sends = launched
        if sampling and self.rt.sampler_rank != 0:
            result = _result_dec.decode(recv_bytes(self.rt.sampler_rank))
        sends.wait()  # every rank has taken this step's message (the last stage's result says so)
        if result is None:
            return StepOutput()
        sampled = dict(zip(result.seq_ids, result.tokens))
        lps = {sid: [_token_logprobs(x) for x in lp] for sid, lp in zip(result.seq_ids, result.logprobs)
               if lp is not None}
        plps = {p.seq_id: PromptLogprobs(p.start, [_token_logprobs(lp) for lp in p.logprobs])
                for p in result.prompt_logprobs}
        return StepOutput(sampled, lps, plps)

    def _launch(self, out: SchedulerOutput, kv_plan: bytes):
        seqs, driver_seqs = [], {}
        for s in out.scheduled:
            seq = s.seq
            new = seq.seq_id not in self._known
            held = self._known.get(seq.seq_id, 0)
            driver_seqs[seq.seq_id] = seq
            end = s.start + s.num_new_tokens - len(s.draft)
            self._known[seq.seq_id] = end
            # the tokens before `start` the mirrors lack: the whole prefix at first; after a step that
            # accepted guesses (speculation), those
            seqs.append(SeqStep(seq.seq_id, seq.index, s.start, seq.token_ids[s.start:end],
                                seq.token_ids[held:s.start], list(seq.block_ids), s.sample,
                                seq.num_prompt_tokens, _params_dict(seq.params) if new else None,
                                s.prompt_logprobs,
                                seq.token_ids[end] if s.prompt_logprobs and end < seq.num_tokens else -1, s.draft))
        msg = StepMsg(seqs, self._finished, kv_plan=kv_plan)
        self._finished = []
        sends = _Sends()
        send_step(_enc.encode(msg), self.world, sends)
        result = self.rt.run(msg, driver_seqs)
        return result, any(s.has_output for s in out.scheduled), sends

    def release(self, seq_id: int) -> None:
        with self._lock:
            self.runner.release(seq_id)
            if seq_id in self._known:
                del self._known[seq_id]
                self._finished.append(seq_id)

    def exchange(self, mine: str) -> list[str]:
        """exchange_strings from the driver, between steps (the heartbeat waits)."""
        with self._lock:
            return exchange_strings(mine, 0, self.rt.tp * self.rt.pp)

    def shutdown(self) -> None:
        with self._lock:
            if self._closed.is_set() and not self.followers:
                return
            self._closed.set()
            try:
                send_step(_enc.encode(StepMsg([], [], shutdown=True)), self.world, self._sends)
                self._sends.wait()
            except RuntimeError:
                pass
            for p in self.followers:
                try:
                    p.wait(10)
                except Exception:
                    p.kill()
                    p.wait(5)
            self.followers = []
            try:
                dist.destroy_process_group()
            except (RuntimeError, ValueError):
                pass


def follower_loop(rt: RankRuntime) -> None:
    """A follower rank: one broadcast per step until shutdown (or the driver is gone: the collective
    times out or fails, and the rank exits)."""
    sends = _Sends()
    while True:
        msg = _step_dec.decode(recv_bytes(0))
        if msg.shutdown:
            break
        result = rt.run(msg)
        if result is not None and rt.rank != 0:
            # without waiting: the driver collects it after it has launched the next step
            sends.wait()
            sends.isend(_enc.encode(result), 0)
    sends.wait()
    dist.destroy_process_group()


# ---- start-up -------------------------------------------------------------------------------------
def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config_to_json(config) -> str:
    return msgspec.json.encode(config).decode()


def config_from_json(text: str):
    """The driver's EngineConfig, as a follower rank gets it (msgspec builds the nested dataclasses
    and runs their checks)."""
    from engine.config import EngineConfig
    return msgspec.json.decode(text, type=EngineConfig)


def init_rank(config, rank: int, init_method: str, model_cfg: ModelConfig, num_blocks=None,
              connector: KVConnector | None = None) -> RankRuntime:
    par = config.parallel
    backend = "nccl" if config.device.device.startswith("cuda") else "gloo"
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=par.tp * par.pp,
                            timeout=timedelta(seconds=par.timeout_s))
    rt = RankRuntime(rank, par.tp, par.pp, model_cfg, config.cache, config.device, config.quantization,
                     num_blocks if num_blocks is not None else config.cache.num_blocks, par.timeout_s, connector)
    rt.num_micro_batches = par.micro_batches or par.pp
    return rt


def start_parallel(config, model_cfg: ModelConfig, connector: KVConnector | None = None,
                   rank_module: str = "engine.rank_main") -> ParallelExecutor:
    """Spawns ranks 1..tp*pp-1 (`python -m rank_module`, which installs the worker's KV connector on
    each) and becomes rank 0."""
    import subprocess
    import sys

    par = config.parallel
    init = f"tcp://127.0.0.1:{_free_port()}"
    cfg_json = config_to_json(config)
    followers = [subprocess.Popen([sys.executable, "-m", rank_module, str(r), init, cfg_json])
                 for r in range(1, par.tp * par.pp)]
    try:
        rt = init_rank(config, 0, init, model_cfg, connector=connector)
    except Exception:
        for p in followers:
            p.kill()
            p.wait(5)
        raise
    return ParallelExecutor(rt, heartbeat_s=max(1.0, par.timeout_s / 6), followers=followers)
