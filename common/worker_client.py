"""A requester for workers (tests, benchmarks; the gateway builds on it): sends PrefillRequests and
collects TokenChunks on its own PULL socket, deduplicated by token index. Torch-free."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import zmq

from common import security
from common.messages import (
    VERSION,
    Abort,
    DecodeTarget,
    MessageError,
    PrefillRequest,
    SamplingSpec,
    decode_chunk,
    encode,
)


@dataclass
class Stream:
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list = field(default_factory=list)
    finish_reason: str | None = None
    error: str = ""
    duplicates: int = 0
    workers: list[str] = field(default_factory=list)
    prompt_logprobs: list | None = None  # from the first chunk, when asked for


class WorkerClient:
    def __init__(self, host: str = "127.0.0.1"):
        self.ctx = zmq.Context.instance()
        self.pull = security.server(self.ctx.socket(zmq.PULL))
        self.pull.setsockopt(zmq.LINGER, 0)
        self.reply_to = f"tcp://{host}:{self.pull.bind_to_random_port(f'tcp://{host}')}"
        self._push: dict[str, zmq.Socket] = {}
        self.streams: dict[str, Stream] = {}

    def _sock(self, endpoint: str) -> zmq.Socket:
        s = self._push.get(endpoint)
        if s is None:
            s = security.client(self.ctx.socket(zmq.PUSH))
            s.setsockopt(zmq.LINGER, 0)
            s.connect(endpoint)
            self._push[endpoint] = s
        return s

    def submit(self, prefill: dict, request_id: str, prompt_ids: list[int], params: SamplingSpec,
               decode: dict | None = None, attempt: int = 0) -> None:
        """`prefill`/`decode`: the ready lines the workers printed (endpoint, kv_endpoints, layout)."""
        target = None if decode is None else DecodeTarget(decode["worker_id"], decode["endpoint"],
                                                          decode["kv_endpoints"], decode["layout"])
        self.streams[request_id] = Stream()
        self._sock(prefill["endpoint"]).send(encode(PrefillRequest(VERSION, request_id, attempt, list(prompt_ids),
                                                                   params, self.reply_to, target)))

    def abort(self, endpoint: str, request_id: str, attempt: int = 0) -> None:
        self._sock(endpoint).send(encode(Abort(VERSION, request_id, attempt)))

    def collect(self, timeout: float = 60.0, until=None) -> None:
        """Reads chunks until every stream has finished (or `until()`), at most `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if until is not None and until():
                return
            if until is None and all(s.finish_reason for s in self.streams.values()):
                return
            if not self.pull.poll(50):
                continue
            try:
                chunk = decode_chunk(self.pull.recv())
            except MessageError:
                continue
            st = self.streams.get(chunk.request_id)
            if st is None:
                continue
            st.workers.append(chunk.worker_id)
            if chunk.index == 0 and chunk.prompt_logprobs is not None:
                st.prompt_logprobs = chunk.prompt_logprobs
            skip = len(st.token_ids) - chunk.index  # tokens of this chunk already delivered
            if skip > 0:
                st.duplicates += min(skip, len(chunk.token_ids))
            if skip < len(chunk.token_ids) or not chunk.token_ids:
                st.token_ids += chunk.token_ids[max(skip, 0):]
                st.text += chunk.text if skip <= 0 else ""
                if chunk.logprobs:
                    st.logprobs += chunk.logprobs[max(skip, 0):]
            if chunk.finish_reason:
                st.finish_reason = chunk.finish_reason
                st.error = chunk.error

    def close(self) -> None:
        for s in self._push.values():
            s.close(0)
        self.pull.close(0)
