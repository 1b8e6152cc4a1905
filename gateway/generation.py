"""One sample of one request, as the gateway runs it (DESIGN.md §7): a placement from the coordinator,
the PrefillRequest to P naming D, the token chunks of the attempt deduplicated by index, and, when P
or D fails (a coordinator event, an error chunk, a gap, a timeout), the next attempt elsewhere with
the prompt plus the tokens delivered and what the client has not seen yet. The HTTP side that
streams a Generation's deltas to the client is gateway/server.py."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import msgspec

from common.coordinator_protocol import VERSION as CVERSION
from common.coordinator_protocol import Place, Placed, Rejected
from common.messages import VERSION, Abort, DecodeTarget, PrefillRequest, SamplingSpec, TokenChunk
from gateway.coordinator_link import PlacementUnavailable
from gateway.openai_api import ApiError

if TYPE_CHECKING:
    from gateway.server import Gateway

log = logging.getLogger(__name__)


@dataclass
class Delta:
    token_ids: list[int]
    text: str
    logprobs: list | None
    finish_reason: str | None = None


@dataclass
class _Failure:
    worker_id: str | None
    reason: str
    attempt: int | None = None  # a notice about this attempt only (None: the current one, found in-line)


class _Inbox:
    """A generation's incoming chunks and failures: a deque and one waiter future, with a timeout by
    call_later (no task per wait: this is the hot path, one wait per token)."""

    def __init__(self):
        from collections import deque
        self.items = deque()
        self.waiter: asyncio.Future | None = None

    def put(self, item) -> None:
        self.items.append(item)
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def get(self, timeout: float):
        if not self.items:
            loop = asyncio.get_running_loop()
            self.waiter = loop.create_future()
            handle = loop.call_later(timeout, lambda w=self.waiter: w.done() or w.set_exception(asyncio.TimeoutError()))
            try:
                await self.waiter
            finally:
                handle.cancel()
                self.waiter = None
        return self.items.popleft()


class Generation:
    """One sample of one prompt: placements, attempts, migration, dedupe."""

    def __init__(self, gw: Gateway, gid: str, prompt: list[int], params: SamplingSpec, model: str, slo: tuple):
        self.gw, self.id, self.prompt, self.params, self.model, self.slo = gw, gid, prompt, params, model, slo
        self.tokens: list[int] = []
        self.text = ""
        self.logprobs: list = []
        self.finish_reason: str | None = None
        self.attempt = -1
        self.placement: Placed | None = None
        self.base = 0  # tokens delivered when the current attempt started (its index 0)
        self.migrations = 0
        self.keepalive = None  # async callable: a sign of life for a streaming client while it waits
        self.exclude: set[str] = set()
        self.capacity_retries = 0
        self.capacity_since: float | None = None  # first "no room" of the current run of them
        self.decoding = False  # this attempt's D has sent a token
        self.held = 0  # delivered tokens whose text has not been emitted yet (mid-character)
        self.q = _Inbox()
        self.started = time.monotonic()
        self.first_token_at: float | None = None
        self.cached_tokens = 0  # prompt tokens the last attempt's prefilling worker had cached
        self.kv_tokens = 0  # prompt tokens whose KV was shipped between workers, over all attempts
        self.prompt_logprobs: list | None = None  # echo with logprobs: the prompt's, from the first chunk

    # ---- inputs (from the gateway's reader and event handler) ------------------------------------
    def deliver(self, chunk: TokenChunk) -> None:
        if chunk.attempt == self.attempt:
            self.q.put(chunk)

    def workers(self) -> tuple[str, ...]:
        p = self.placement
        if p is None:
            return ()
        return (p.prefill.worker_id,) + ((p.decode.worker_id,) if p.decode is not None else ())

    def worker_failed(self, worker_id: str, reason: str) -> None:
        p = self.placement
        if self.finish_reason is not None or p is None or worker_id not in self.workers():
            return
        if worker_id == p.prefill.worker_id and p.decode is not None and self.decoding:
            return  # P's part is over: D already streams this attempt
        self.q.put(_Failure(worker_id, reason, self.attempt))

    # ---- the attempt ----------------------------------------------------------------------------------
    async def launch(self) -> None:
        """Places the next attempt and sends it to P. Raises ApiError when nothing can take it."""
        remaining = self.params.max_tokens - len(self.tokens)
        prompt_len = len(self.prompt) + len(self.tokens)
        # no healthy worker right now (just registered, not yet heard from; or all briefly suspect; or a
        # moved request's last worker just died, and a supervisor restarts it): wait, as a queue would,
        # before answering 503; a moved request longer, its stream kept alive meanwhile
        cfg = self.gw.config
        give_up = time.monotonic() + (cfg.migration_wait if self.migrations else cfg.placement_deadline)
        last_sign = time.monotonic()
        delay = 0.05
        hashes = self.gw.prefix_hashes(self.prompt + self.tokens)  # where the prompt's KV may be cached
        while True:
            for exclude in (self.exclude, set()):  # all excluded workers gone? the cluster may have healed
                t0 = time.perf_counter()
                try:
                    reply = await self.gw.link.place(Place(CVERSION, self.id, self.model, prompt_len, remaining,
                                                           self.slo[0], self.slo[1], sorted(exclude),
                                                           self.slo[2] if len(self.slo) > 2 else "", *hashes))
                except PlacementUnavailable as e:
                    raise ApiError(503, str(e), code="coordinator_unavailable", type_="service_unavailable",
                                   headers={"Retry-After": "2"}) from None
                finally:
                    self.gw.m_placement.observe(time.perf_counter() - t0)
                if isinstance(reply, Placed) or reply.code != "no_workers" or not exclude:
                    break
            transient = reply.code == "no_workers" if isinstance(reply, Rejected) else False
            transient |= isinstance(reply, Rejected) and reply.code == "unknown_model" and \
                self.model in self.gw.served_models()  # its workers are all gone for the moment
            if not transient or time.monotonic() + delay > give_up:
                break
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)
            if self.keepalive is not None and time.monotonic() - last_sign >= cfg.keepalive_s:
                last_sign = time.monotonic()
                await self.keepalive()
        if isinstance(reply, Rejected):
            self.gw.m_rejections.labels(code=reply.code).inc()
            retry = {"Retry-After": str(max(1, round(reply.retry_after_s)))}
            if reply.code == "overloaded":
                raise ApiError(429, f"overloaded: {reply.reason}", code="overloaded", type_="rate_limit_error",
                               headers=retry)
            if reply.code == "unknown_model" and self.model not in self.gw.served_models():
                raise ApiError(404, reply.reason, "model", "model_not_found")
            if reply.code == "bad_request":
                raise ApiError(400, reply.reason)
            raise ApiError(503, reply.reason, code=reply.code, type_="service_unavailable", headers=retry)
        self.attempt += 1
        self.placement = reply
        self.decoding = False
        self.base = len(self.tokens)
        # a resumed attempt's prompt ends with the output delivered so far: its grammar replays it
        run = msgspec.structs.replace(self.params, max_tokens=remaining,
                                      min_tokens=max(0, self.params.min_tokens - len(self.tokens)),
                                      guided_start=len(self.tokens) if self.params.guided else 0,
                                      # the prompt's logprobs come once: a resumed prompt is longer
                                      prompt_logprobs=None if self.prompt_logprobs is not None or self.tokens
                                      else self.params.prompt_logprobs)
        d = reply.decode
        target = None if d is None else DecodeTarget(d.worker_id, d.endpoint, d.kv_endpoints, d.layout)
        held_tokens, held_text = self._unseen()
        self.gw.send(reply.prefill.endpoint, PrefillRequest(VERSION, self.id, self.attempt, self.prompt + self.tokens,
                                                            run, self.gw.reply_to, target, held_tokens=held_tokens,
                                                            slo_ttft_ms=reply.ttft_ms, slo_tpot_ms=reply.tpot_ms,
                                                            held_text=held_text))

    def _unseen(self) -> tuple[int, str]:
        """What the client has not seen of the tokens delivered so far, for the next attempt to emit:
        trailing tokens that end mid-character (undecodable yet), and decoded text a worker held
        back because a stop string could start in it (so a stop across the migration is still found)."""
        if not self.tokens:
            return 0, ""
        k, n = 0, len(self.tokens)
        full = self.gw.text_of(self.prompt, self.tokens)
        while k < n and full.endswith("\ufffd"):
            k += 1
            full = self.gw.text_of(self.prompt, self.tokens[:n - k])
        if not full.startswith(self.text):  # decoding at once differs from the stream's: tokens only
            return self.held, ""
        return k, full[len(self.text):]

    def abort_attempt(self) -> None:
        p = self.placement
        if p is None:
            return
        msg = Abort(VERSION, self.id, self.attempt)
        self.gw.send(p.prefill.endpoint, msg)
        if p.decode is not None:
            self.gw.send(p.decode.endpoint, msg)

    async def _migrate(self, failure: _Failure) -> None:
        self.abort_attempt()
        self.migrations += 1
        self.gw.m_migrations.inc()
        if failure.worker_id:
            self.exclude.add(failure.worker_id)
        log.warning("request %s: attempt %d failed (%s); %s", self.id, self.attempt, failure.reason,
                    "migrating" if self.migrations <= self.gw.config.max_migrations else "giving up")
        if self.migrations > self.gw.config.max_migrations:
            raise ApiError(503, f"the request failed after {self.migrations - 1} migrations: {failure.reason}",
                           code="migration_limit", type_="server_error", headers={"Retry-After": "1"})
        await self.launch()

    async def _retry_capacity(self, worker_id: str, why: str) -> None:
        """A decode worker had no room for the prompt's KV: its load report was stale. Placed again (without
        it, if another can take it) after a short backoff; bounded by the first-token timeout, not by
        the migration limit."""
        self.abort_attempt()
        self.capacity_retries += 1
        self.capacity_since = self.capacity_since or time.monotonic()
        if time.monotonic() - self.capacity_since > self.gw.config.first_token_timeout:
            raise ApiError(503, f"no decode worker had room for the request: {why}", code="capacity",
                           type_="service_unavailable", headers={"Retry-After": "1"})
        await asyncio.sleep(min(0.5, 0.01 * 2 ** min(self.capacity_retries, 6)))
        self.exclude.add(worker_id)
        await self.launch()
        self.exclude.discard(worker_id)

    async def deltas(self):
        """Yields Deltas until the generation finishes; migrates across worker failures."""
        cfg = self.gw.config
        got_first = False
        attempt = self.attempt
        while True:
            if self.attempt != attempt:
                attempt, got_first = self.attempt, False
            timeout = cfg.token_timeout if got_first else cfg.first_token_timeout
            try:
                item = await self.q.get(timeout)
            except asyncio.TimeoutError:
                p = self.placement
                wid = (p.decode.worker_id if got_first and p.decode is not None else p.prefill.worker_id)
                item = _Failure(wid, f"no token for {timeout:.0f} s")
            if isinstance(item, _Failure):
                if item.attempt is not None and item.attempt != self.attempt:
                    continue  # about an attempt already left behind (e.g. the same event from two replicas)
                if self.params.max_tokens - len(self.tokens) <= 0:  # everything was delivered already
                    self.finish_reason = "length"
                    yield Delta([], "", None, "length")
                    return
                await self._migrate(item)
                continue
            chunk: TokenChunk = item
            if chunk.attempt != self.attempt:
                continue
            got_first = True
            if chunk.index >= 1:
                self.decoding = True
            else:
                self.cached_tokens = max(chunk.cached_tokens, 0)
                self.kv_tokens += max(chunk.kv_tokens, 0)
                if chunk.prompt_logprobs is not None and self.prompt_logprobs is None:
                    self.prompt_logprobs = chunk.prompt_logprobs
            if chunk.finish_reason in ("error", "abort"):
                why = f"worker {chunk.worker_id}: {chunk.error or chunk.finish_reason}"
                if chunk.error_code == "invalid":  # the request itself: another worker would say the same
                    raise ApiError(400, chunk.error or "invalid request", code="invalid_request")
                if chunk.error_code == "capacity":  # no room right now: not a failure, place again shortly
                    await self._retry_capacity(chunk.blame or chunk.worker_id, why)
                    continue
                await self._migrate(_Failure(chunk.blame or chunk.worker_id or None, why))
                continue
            index = self.base + chunk.index
            skip = len(self.tokens) - index
            new = chunk.token_ids[max(skip, 0):] if skip < len(chunk.token_ids) else []
            if index > len(self.tokens):  # a gap: a chunk was lost; the attempt cannot be trusted
                await self._migrate(_Failure(None, f"gap in the token stream at {len(self.tokens)}"))
                continue
            text = chunk.text if skip <= 0 else self.gw.text_of(self.prompt + self.tokens, new)
            lps = chunk.logprobs[max(skip, 0):] if chunk.logprobs else None
            if new and self.first_token_at is None:
                self.first_token_at = time.monotonic()
            if new:
                self.capacity_since = None
            self.tokens += new
            self.text += text
            self.held = 0 if text else self.held + len(new)
            if lps:
                self.logprobs += lps
            if chunk.finish_reason:
                self.finish_reason = chunk.finish_reason
            if new or text or chunk.finish_reason:
                yield Delta(new, text, lps, chunk.finish_reason)
            if chunk.finish_reason:
                return
