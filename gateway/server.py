"""The HTTP gateway (DESIGN.md §1, §7): OpenAI-compatible, streaming, and the owner of each of its
client requests. Torch-free; aiohttp on uvloop.

A request fans out into one `Generation` per (prompt, sample). Each asks the coordinator leader for a
placement, sends a PrefillRequest to P naming D, and reads TokenChunks (P's first token, D's chunks)
from the gateway's PULL socket, deduplicated by token index. When P or D fails (a coordinator event,
an error chunk, or no token within a timeout), the generation migrates: it aborts the old attempt,
asks for a new placement without the failed worker, and re-submits prompt + tokens already
delivered with max_tokens reduced; the client sees one stream with no gap and no duplicate. After
`max_migrations` it fails with a clear error. Generations live in gateway/generation.py.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass, field

import msgspec
import zmq
from aiohttp import web

from common import security
from common.coordinator_protocol import VERSION as CVERSION
from common.coordinator_protocol import WorkerEvent
from common.etcd import keys
from common.etcd.session import Session
from common.etcd.watch import PrefixMirror
from common.messages import MessageError, decode_chunk, encode
from common.metrics import CONTENT_TYPE, Metrics
from common.registry import WorkerInfo
from common.zmq_loop import Reader
from engine.block_manager import chain_hashes
from gateway import tools as toolcalls
from gateway.coordinator_link import CoordinatorLink
from gateway.generation import Delta, Generation
from gateway.openai_api import (
    ApiError,
    ApiRequest,
    chat_logprobs,
    completion_logprobs,
    detokenize,
    parse,
    tokenize,
    usage,
)
from gateway.openai_schema import openapi

log = logging.getLogger(__name__)
_json = msgspec.json.Encoder().encode


def key_matches(token: str, keys: list[str]) -> bool:
    """Whether `token` is one of `keys`, in time that does not depend on where they first differ
    (hmac.compare_digest, over every key: no early exit that would time which key came close)."""
    given = token.encode()
    found = False
    for k in keys:
        found |= hmac.compare_digest(given, k.encode())
    return found


@dataclass
class GatewayConfig:
    etcd: list[str]
    cluster: str = "default"
    model: str | None = None  # checkpoint directory (tokenizer, context length); None: the default model
    served_model_name: str | None = None  # default: the directory's name (as workers register it)
    host: str = "127.0.0.1"
    port: int = 8000  # 0: any free port
    internal_host: str = "127.0.0.1"  # where workers reach the gateway's token socket
    api_keys: list[str] = field(default_factory=list)
    open_paths: tuple[str, ...] = ("/health", "/ready", "/metrics", "/openapi.json")
    max_migrations: int = 3
    first_token_timeout: float = 60.0  # seconds without the first token of an attempt -> migrate
    token_timeout: float = 30.0  # seconds between tokens -> migrate
    placement_deadline: float = 6.0  # a new request waits this long for a worker to come (then 503)
    migration_wait: float = 30.0  # a moved request waits this long for a worker that can take it
    keepalive_s: float = 5.0  # SSE comment lines while a stream waits so (proxies keep the connection)
    max_body_bytes: int = 4 << 20
    lease_ttl: int = 2
    gateway_id: str = ""
    shutdown_grace: float = 30.0

    def __post_init__(self):
        if self.max_migrations < 0:
            raise ValueError(f"max_migrations = {self.max_migrations!r}: must be >= 0")
        keys.root(self.cluster)
        self.gateway_id = self.gateway_id or f"gw-{uuid.uuid4().hex[:8]}"


class Gateway:
    def __init__(self, config: GatewayConfig):
        from engine.config import ModelConfig
        from engine.model_store import resolve_model
        from engine.tokenizer import Tokenizer

        self.config = config
        model_dir = resolve_model(config.model)
        self.tokenizer = Tokenizer(model_dir)
        mc = ModelConfig.from_dir(model_dir)
        self.max_model_len, self.vocab_size = mc.max_model_len, mc.vocab_size
        self.model_name = config.served_model_name or os.path.basename(os.path.normpath(str(model_dir)))
        self.generations: dict[str, Generation] = {}
        self.workers: dict[str, WorkerInfo] = {}
        self._ids = itertools.count()
        self._draining = False
        m = self.metrics = Metrics()
        self.m_ttft = m.histogram("ttft_seconds", "time to first token")
        self.m_tpot = m.histogram("tpot_seconds", "time per output token after the first")
        self.m_e2e = m.histogram("e2e_seconds", "request latency, end to end")
        self.m_running = m.gauge("requests_running", "requests in flight")
        self.m_requests = m.counter("requests", "finished requests", ["endpoint", "status"])
        self.m_rejections = m.counter("rejections", "placements rejected", ["code"])
        self.m_migrations = m.counter("migrations", "generations moved to other workers")
        self.m_placement = m.histogram("gateway_placement_seconds", "placement round trips to the coordinator",
                                       buckets=(1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 0.1, 1.0))
        self.m_tokens = m.counter("generated_tokens", "tokens streamed to clients")

    # ---- lifecycle ---------------------------------------------------------------------------------
    async def start(self) -> Gateway:
        c = self.config
        self.session = await Session(c.etcd, ttl=c.lease_ttl).start()
        self.link = await CoordinatorLink(self.session, c.cluster, self._on_event,
                                          deadline=c.placement_deadline).start()
        self.worker_mirror = PrefixMirror(self.session, keys.workers(c.cluster), self._worker_changed).start()
        self.ctx = zmq.Context.instance()
        self.pull = security.server(self.ctx.socket(zmq.PULL))
        self.pull.setsockopt(zmq.LINGER, 0)
        self.pull.setsockopt(zmq.MAXMSGSIZE, 16 << 20)
        self.pull.setsockopt(zmq.RCVHWM, 100000)
        self.reply_to = f"tcp://{c.internal_host}:{self.pull.bind_to_random_port(f'tcp://{c.internal_host}')}"
        self._push: dict[str, zmq.Socket] = {}
        self._reader = Reader(asyncio.get_running_loop(), self.pull, self._on_chunk)
        self.app = self._build_app()
        self.runner = web.AppRunner(self.app, access_log=None, handler_cancellation=True,
                                    shutdown_timeout=c.shutdown_grace)
        await self.runner.setup()
        self.site = web.TCPSite(self.runner, c.host, c.port)
        await self.site.start()
        self.port = self.runner.addresses[0][1]
        self.url = f"http://{c.host}:{self.port}"
        await self.session.register(keys.gateway(c.cluster, c.gateway_id), json.dumps(
            {"gateway_id": c.gateway_id, "url": self.url, "pid": os.getpid(), "model": self.model_name,
             "reply_to": self.reply_to}).encode())
        log.info("gateway %s on %s (model %s)", c.gateway_id, self.url, self.model_name)
        return self

    async def close(self) -> None:
        """Graceful: stop accepting, let in-flight requests finish (up to shutdown_grace), then exit."""
        self._draining = True
        await self.runner.cleanup()
        for g in list(self.generations.values()):
            g.abort_attempt()
        self._reader.close()
        await self.worker_mirror.stop()
        await self.link.close()
        await self.session.close()
        for s in self._push.values():
            s.close(0)
        self.pull.close(0)

    # ---- sockets -----------------------------------------------------------------------------------
    def send(self, endpoint: str, msg) -> None:
        s = self._push.get(endpoint)
        if s is None:
            s = security.client(self.ctx.socket(zmq.PUSH))
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.SNDHWM, 10000)
            s.connect(endpoint)
            self._push[endpoint] = s
        try:
            s.send(encode(msg), zmq.NOBLOCK)
        except zmq.Again:
            log.warning("request queue to %s is full; %s not sent", endpoint, type(msg).__name__)

    def _on_chunk(self, data: bytes) -> None:
        try:
            chunk = decode_chunk(data)
        except MessageError:
            return
        g = self.generations.get(chunk.request_id)
        if g is not None:
            g.deliver(chunk)

    def _on_event(self, ev: WorkerEvent) -> None:
        if ev.state not in ("suspect", "dead"):
            return
        for g in list(self.generations.values()):
            g.worker_failed(ev.worker_id, f"worker {ev.worker_id} is {ev.state}: {ev.reason}")

    def _worker_changed(self, key: str, old: bytes | None, new: bytes | None) -> None:
        wid = keys.worker_id_of(key)
        if new is None:
            self.workers.pop(wid, None)
            self._on_event(WorkerEvent(CVERSION, wid, "", "dead", "its registration is gone", time.time()))
            return
        try:
            self.workers[wid] = msgspec.json.decode(new, type=WorkerInfo)
        except (msgspec.DecodeError, msgspec.ValidationError):
            pass

    # ---- helpers -----------------------------------------------------------------------------------
    def text_of(self, context: list[int], new: list[int]) -> str:
        tail = context[-6:]
        return self.tokenizer.decode(tail + new)[len(self.tokenizer.decode(tail)):]

    def served_models(self) -> set[str]:
        return {self.model_name}

    def prefix_hashes(self, token_ids: list[int]) -> tuple[list[int], int, int]:
        """The prompt's full blocks' prefix-cache hashes as this model's workers compute them, with the
        root and block size they chain from, for cache-aware placement; ([], 0, 0) when no worker
        caches prefixes. (Workers with another root or block size simply match nothing.)"""
        info = next((w for w in self.workers.values() if w.kv_hash_root and w.model == self.model_name
                     and w.role != "decode"), None) or \
            next((w for w in self.workers.values() if w.kv_hash_root and w.model == self.model_name), None)
        if info is None:
            return [], 0, 0
        return chain_hashes(info.kv_hash_root, token_ids, info.block_size), info.kv_hash_root, info.block_size

    # ---- HTTP --------------------------------------------------------------------------------------
    def _build_app(self) -> web.Application:
        app = web.Application(client_max_size=self.config.max_body_bytes, middlewares=[self._errors, self._auth])
        app.router.add_post("/v1/completions", lambda r: self._generate(r, chat=False))
        app.router.add_post("/v1/chat/completions", lambda r: self._generate(r, chat=True))
        app.router.add_post("/tokenize", self._tokenize)
        app.router.add_post("/detokenize", self._detokenize)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        app.router.add_get("/ready", self._ready)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/openapi.json", self._openapi)
        return app

    @web.middleware
    async def _errors(self, request, handler):
        try:
            return await handler(request)
        except ApiError as e:
            return web.json_response(e.body(), status=e.status, headers=e.headers)
        except web.HTTPException as e:
            if e.status < 400:
                raise
            code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(e.status)
            msg = e.text if e.status != 413 else f"request body larger than {self.config.max_body_bytes} bytes"
            return web.json_response(ApiError(e.status, msg or e.reason, code=code).body(), status=e.status)

    @web.middleware
    async def _auth(self, request, handler):
        keys_ = self.config.api_keys
        if keys_ and request.path not in self.config.open_paths:
            auth = request.headers.get("Authorization", "")
            token = auth[7:].strip() if auth[:7].lower() == "bearer " else None
            if token is None or not key_matches(token, keys_):
                raise ApiError(401, "Incorrect or missing API key (Authorization: Bearer ...)", code="invalid_api_key")
        return await handler(request)

    async def _health(self, request):
        return web.json_response({"status": "ok", "gateway_id": self.config.gateway_id})

    async def _ready(self, request):
        roles = {w.role for w in self.workers.values() if w.model == self.model_name}
        ok = not self._draining and self.link.leader is not None and \
            ("colocated" in roles or {"prefill", "decode"} <= roles)
        body = {"ready": ok, "leader": self.link.leader.coordinator_id if self.link.leader else None,
                "workers": sorted(self.workers)}
        return web.json_response(body, status=200 if ok else 503)

    async def _metrics(self, request):
        return web.Response(body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    async def _openapi(self, request):
        return web.json_response(openapi(sorted(self.served_models()), self.max_model_len))

    async def _models(self, request):
        return web.json_response({"object": "list", "data": [
            {"id": m, "object": "model", "created": 0, "owned_by": "tandem", "max_model_len": self.max_model_len}
            for m in sorted(self.served_models())]})

    async def _json_body(self, request: web.Request):
        raw = await request.read()
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError) as e:  # RecursionError: nested too deep
            raise ApiError(400, f"the body is not valid JSON: {str(e)[:200]}", code="invalid_json") from None

    async def _tokenize(self, request: web.Request):
        body = await self._json_body(request)
        return web.json_response(await asyncio.to_thread(tokenize, body, self.tokenizer, self.served_models(),
                                                         self.max_model_len))

    async def _detokenize(self, request: web.Request):
        body = await self._json_body(request)
        return web.json_response(detokenize(body, self.tokenizer, self.served_models(), self.vocab_size))

    async def _generate(self, request: web.Request, chat: bool):
        if self._draining:
            raise ApiError(503, "the gateway is shutting down", code="shutting_down", type_="service_unavailable",
                           headers={"Retry-After": "1"})
        rid = request.headers.get("X-Request-Id", "")
        if not (0 < len(rid) <= 128 and rid.isprintable() and rid.isascii()):
            rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        body = await self._json_body(request)
        # off the event loop: templates, tokenization and grammar checks (bounded, but milliseconds each)
        api = await asyncio.to_thread(parse, body, chat, self.tokenizer, self.served_models(), self.max_model_len,
                                      self.vocab_size)
        endpoint = "chat" if chat else "completions"
        gens = []
        base = f"{self.config.gateway_id}-{next(self._ids)}"
        for pi, prompt in enumerate(api.prompts):
            for j in range(api.n):
                params = api.params
                if api.n > 1 and params.seed is not None:
                    params = msgspec.structs.replace(params, seed=params.seed + j)
                if j > 0 and params.prompt_logprobs is not None and not api.stream:  # the first sample's serve
                    params = msgspec.structs.replace(params, prompt_logprobs=None)
                g = Generation(self, f"{base}-{pi * api.n + j}", prompt, params, api.model,
                               (api.ttft_ms, api.tpot_ms, api.slo_class or ""))
                gens.append(g)
        for g in gens:
            self.generations[g.id] = g
        self.m_running.inc()
        status = "500"
        try:
            results = await asyncio.gather(*(g.launch() for g in gens), return_exceptions=True)
            errs = [r for r in results if isinstance(r, BaseException)]
            if errs:
                raise errs[0]
            if api.stream:
                resp = await self._stream(request, api, gens, rid)
            else:
                resp = await self._complete(api, gens, rid)
            status = "200"
            return resp
        except ApiError as e:
            status = str(e.status)
            raise
        finally:
            for g in gens:
                if g.finish_reason is None:
                    g.abort_attempt()  # the client went away, or an error: free P and D at once
                self.generations.pop(g.id, None)
            self.m_running.dec()
            self.m_requests.labels(endpoint=endpoint, status=status).inc()
            for g in gens:
                self._observe(g)

    def _observe(self, g: Generation) -> None:
        now = time.monotonic()
        if g.first_token_at is not None:
            self.m_ttft.observe(g.first_token_at - g.started)
            if len(g.tokens) > 1:
                self.m_tpot.observe((now - g.first_token_at) / (len(g.tokens) - 1))
        if g.finish_reason is not None:
            self.m_e2e.observe(now - g.started)
        self.m_tokens.inc(len(g.tokens))

    @staticmethod
    def _echoed(api: ApiRequest, gens: list[Generation], i: int, token_ids: list[int],
                lps: list) -> tuple[list[int], list]:
        """(token ids, logprobs) of choice i's completion logprobs: with echo, the prompt's lead (its
        first token has none; a prompt's samples share its first sample's)."""
        if api.echo is None:
            return token_ids, lps
        first = gens[i] if gens[i].prompt_logprobs is not None else gens[i - i % api.n]
        prompt_lps = first.prompt_logprobs or [None] * len(first.prompt)
        return first.prompt + token_ids, list(prompt_lps) + list(lps)

    def _finish(self, reason: str | None) -> str:
        return reason if reason in ("stop", "length") else "stop"

    async def _complete(self, api: ApiRequest, gens: list[Generation], rid: str):
        async def run(g):
            async for _ in g.deltas():
                pass
        tasks = [asyncio.create_task(run(g)) for g in gens]
        try:  # the first failure ends the request: the other generations stop too (no orphans)
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for t in done:
                if t.exception() is not None:
                    raise t.exception()
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        choices = []
        for i, g in enumerate(gens):
            lp = None
            if api.logprobs is not None:
                lp = chat_logprobs(self.tokenizer, g.tokens, g.logprobs) if api.chat else \
                    completion_logprobs(self.tokenizer, *self._echoed(api, gens, i, g.tokens, g.logprobs))
            if api.chat:
                message, reason = {"role": "assistant", "content": g.text}, self._finish(g.finish_reason)
                if api.tool_format is not None:
                    content, calls = toolcalls.parse(api.tool_format, g.text, api.tool_names)
                    message["content"] = content
                    if calls:
                        message["tool_calls"] = calls
                        reason = "tool_calls" if reason == "stop" else reason
                choice = {"index": i, "message": message, "logprobs": lp, "finish_reason": reason}
            else:
                text = g.text if api.echo is None else api.echo[i // api.n] + g.text
                choice = {"index": i, "text": text, "logprobs": lp, "finish_reason": self._finish(g.finish_reason)}
            if api.return_token_ids:
                choice["token_ids"] = g.tokens
            choices.append(choice)
        body = {"id": rid, "object": "chat.completion" if api.chat else "text_completion", "created": int(time.time()),
                "model": api.model, "choices": choices,
                "usage": _usage(api, gens)}
        return web.json_response(body, headers={"X-Request-Id": rid})

    async def _stream(self, request, api: ApiRequest, gens: list[Generation], rid: str):
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           "X-Request-Id": rid})
        await resp.prepare(request)

        async def keepalive() -> None:  # while a moved request waits for a worker (an SSE comment line)
            await resp.write(b": keep-alive\n\n")
        for g in gens:
            g.keepalive = keepalive
        created = int(time.time())
        obj = "chat.completion.chunk" if api.chat else "text_completion"
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i, g):
            try:
                async for d in g.deltas():
                    queue.put_nowait((i, d, None))
            except ApiError as e:
                queue.put_nowait((i, None, e))
            except Exception as e:  # a bug must reach the client as an error, not a hang
                log.exception("generation %s", g.id)
                queue.put_nowait((i, None, ApiError(500, f"internal error: {e}", type_="server_error")))
            queue.put_nowait((i, None, None))

        async def solo(g):  # n = 1: no pump task, no queue
            try:
                async for d in g.deltas():
                    yield 0, d, None
            except ApiError as e:
                yield 0, None, e
            except Exception as e:  # a bug must reach the client as an error event, not a cut stream
                log.exception("generation %s", g.id)
                yield 0, None, ApiError(500, f"internal error: {e}", type_="server_error")
            yield 0, None, None

        async def merged():
            while True:
                yield await queue.get()

        buf: list[bytes] = []  # events of one loop turn go out in one write (a syscall per event costs)

        def send(payload: dict) -> None:
            buf.append(b"data: " + _json(payload) + b"\n\n")

        offsets = [0] * len(gens)
        calls = [toolcalls.ToolStream(api.tool_format, api.tool_names) for _ in gens] \
            if api.chat and api.tool_format is not None else None
        echoed = [api.echo is None] * len(gens)

        def event(i: int, d: Delta) -> None:
            lp = None
            text = d.text
            lead = not echoed[i]  # echo: the prompt leads the choice's first event
            if lead:
                echoed[i] = True
                text = api.echo[i // api.n] + text
            if api.logprobs is not None and d.logprobs:
                if api.chat:
                    lp = chat_logprobs(self.tokenizer, d.token_ids, d.logprobs)
                elif lead:  # the first event of an echo: the prompt's logprobs lead
                    lp = completion_logprobs(self.tokenizer, *self._echoed(api, gens, i, d.token_ids, d.logprobs))
                else:
                    lp = completion_logprobs(self.tokenizer, d.token_ids, d.logprobs, offsets[i])
            offsets[i] += len(text)
            fin = self._finish(d.finish_reason) if d.finish_reason else None
            if calls is not None:
                content, tool_deltas = calls[i].feed(d.text, final=fin is not None)
                delta = {"content": content} if content else {}
                if tool_deltas:
                    delta["tool_calls"] = tool_deltas
                if fin == "stop" and calls[i].calls:
                    fin = "tool_calls"
                if not delta and fin is None and lp is None:
                    return  # held back (a possible call marker): nothing to say yet
                choice = {"index": i, "delta": delta, "logprobs": lp, "finish_reason": fin}
            elif api.chat:
                delta = {"content": text} if text or not fin else {}
                choice = {"index": i, "delta": delta, "logprobs": lp, "finish_reason": fin}
            else:
                choice = {"index": i, "text": text, "logprobs": lp, "finish_reason": fin}
            if api.return_token_ids:
                choice["token_ids"] = d.token_ids
            send({"id": rid, "object": obj, "created": created, "model": api.model, "choices": [choice]})

        tasks = [] if len(gens) == 1 else [asyncio.create_task(pump(i, g)) for i, g in enumerate(gens)]
        source = solo(gens[0]) if len(gens) == 1 else merged()
        try:
            if api.chat:
                for i in range(len(gens)):
                    send({"id": rid, "object": obj, "created": created, "model": api.model, "choices": [
                        {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                         "finish_reason": None}]})
            live = len(gens)

            def take(i, d, err) -> int:  # how many generations this item ended
                if err is not None:
                    send(err.body())
                elif d is None:
                    return 1
                else:
                    event(i, d)
                return 0
            async for item in source:
                live -= take(*item)
                while tasks and live and not queue.empty():  # whatever else is ready goes in the same write
                    live -= take(*queue.get_nowait())
                if not live:
                    break
                if buf:
                    await resp.write(b"".join(buf))
                    buf.clear()
            if api.include_usage:
                send({"id": rid, "object": obj, "created": created, "model": api.model, "choices": [],
                      "usage": _usage(api, gens)})
            buf.append(b"data: [DONE]\n\n")
            await resp.write(b"".join(buf))
            await resp.write_eof()
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        return resp


async def serve(config: GatewayConfig, ready=None) -> None:
    gw = await Gateway(config).start()
    stop = asyncio.Event()
    gw.stop = stop.set
    if ready is not None:
        ready(gw)
    try:
        await stop.wait()
    finally:
        await gw.close()


def _usage(api: ApiRequest, gens: list) -> dict:
    """Usage of a request's generations (api.n samples of each prompt, in order): a prompt counts once,
    as its first sample's prefill found it."""
    firsts = gens[::max(api.n, 1)]
    return usage(sum(len(p) for p in api.prompts), sum(len(g.tokens) for g in gens),
                 sum(g.cached_tokens for g in firsts), sum(g.kv_tokens for g in gens))
