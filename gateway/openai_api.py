"""The OpenAI-compatible request surface (torch-free): validation of /v1/completions and
/v1/chat/completions bodies into a typed request, response and stream-chunk shapes, and the OpenAPI
description the gateway serves. Every validation failure is an ApiError naming the parameter."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from common.sampling import SamplingSpec
from engine.errors import InvalidRequestError
from engine.sampling_params import MAX_LOGPROBS, SamplingParams


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type, self.headers = \
            status, message, param, code, type_, headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "min_p", "n", "stop", "seed", "presence_penalty",
          "frequency_penalty", "repetition_penalty", "user", "stream", "stream_options", "min_tokens",
          "ignore_eos", "stop_token_ids", "skip_special_tokens", "include_stop_str_in_output", "ttft_ms", "tpot_ms",
          "return_token_ids", "slo_class"}
COMPLETION_FIELDS = COMMON | {"prompt", "logprobs", "echo", "best_of", "suffix", "logit_bias"}
CHAT_FIELDS = COMMON | {"messages", "max_completion_tokens", "logprobs", "top_logprobs", "logit_bias", "tools",
                        "tool_choice", "functions", "function_call", "response_format", "parallel_tool_calls",
                        "store", "metadata", "service_tier", "modalities", "audio", "prediction",
                        "reasoning_effort"}
# OpenAI parameters tandem knows but does not implement: a clear 400, not a silent ignore
UNSUPPORTED = {"echo": lambda v: bool(v), "best_of": lambda v: v not in (None, 1), "suffix": lambda v: bool(v),
               "logit_bias": lambda v: bool(v), "tools": lambda v: bool(v), "tool_choice": lambda v: v not in (None, "none"),
               "functions": lambda v: bool(v), "function_call": lambda v: v not in (None, "none"),
               "response_format": lambda v: v not in (None, {"type": "text"}), "audio": lambda v: v is not None,
               "modalities": lambda v: v not in (None, ["text"]), "prediction": lambda v: v is not None,
               "reasoning_effort": lambda v: v is not None}
MAX_N = 16
MAX_PROMPTS = 64


@dataclass
class ApiRequest:
    chat: bool
    model: str
    prompts: list[list[int]]  # token ids, one per prompt
    params: SamplingSpec  # n = 1; `n` below fans out
    n: int
    stream: bool
    include_usage: bool
    logprobs: int | None  # None: none; k: chosen token + k alternatives
    user: str | None = None
    ttft_ms: float | None = None
    tpot_ms: float | None = None
    return_token_ids: bool = False  # extension (as vLLM's): each choice also carries its token ids
    slo_class: str | None = None  # extension: a named SLO class the coordinator knows


def _bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param, code)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _get(body: dict, name: str, check, what: str, default=None):
    v = body.get(name, default)
    if v is None:
        return default
    if not check(v):
        raise _bad(f"'{name}' must be {what}, got {v!r:.80}", name)
    return v


def parse(body, chat: bool, tokenizer, served_models: set[str], max_model_len: int, vocab_size: int) -> ApiRequest:
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object")
    allowed = CHAT_FIELDS if chat else COMPLETION_FIELDS
    for k in body:
        if k not in allowed:
            raise _bad(f"Unrecognized request argument supplied: {k}", k)
    for k, is_set in UNSUPPORTED.items():
        if k in body and is_set(body[k]):
            raise _bad(f"'{k}' is not supported by this server", k, "unsupported_parameter")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("'model' is required (a string)", "model")
    if model not in served_models:
        raise ApiError(404, f"The model '{model:.200}' does not exist (served: {', '.join(sorted(served_models))})",
                       "model", "model_not_found")
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _bad("'messages' must be a non-empty array", "messages")
        clean = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise _bad(f"messages[{i}] must be an object with a 'role'", f"messages[{i}]")
            if m["role"] not in ("system", "developer", "user", "assistant", "tool"):
                raise _bad(f"messages[{i}].role {m['role']!r:.40} is not one of system, developer, user, "
                           "assistant, tool", f"messages[{i}].role")
            content = m.get("content")
            if isinstance(content, list):  # content parts: text only
                parts = []
                for j, part in enumerate(content):
                    if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                        raise _bad(f"messages[{i}].content[{j}]: only text parts are supported",
                                   f"messages[{i}].content")
                    parts.append(part["text"])
                content = "".join(parts)
            if not isinstance(content, str):
                raise _bad(f"messages[{i}].content must be a string or text parts", f"messages[{i}].content")
            clean.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content})
        try:
            text = tokenizer.apply_chat_template(clean)
        except InvalidRequestError as e:
            raise _bad(str(e), "messages") from None
        prompts = [tokenizer.encode(text, add_special_tokens=False)]
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            prompts = [tokenizer.encode(prompt)]
        elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
            prompts = [list(prompt)]
        elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            prompts = [tokenizer.encode(p) for p in prompt]
        elif isinstance(prompt, list) and prompt and all(isinstance(p, list) and p and all(_is_int(t) for t in p)
                                                        for p in prompt):
            prompts = [list(p) for p in prompt]
        else:
            raise _bad("'prompt' must be a string, an array of strings, an array of token ids, or an array of "
                       "token-id arrays (non-empty)", "prompt")
        if len(prompts) > MAX_PROMPTS:
            raise _bad(f"at most {MAX_PROMPTS} prompts per request", "prompt")
    vocab = vocab_size
    for p in prompts:
        if not p:
            raise _bad("the prompt is empty after tokenization", "messages" if chat else "prompt")
        if any(t < 0 or t >= vocab for t in p):
            raise _bad(f"token ids must be in [0, {vocab})", "prompt")
        if len(p) >= max_model_len:
            raise _bad(f"This model's maximum context length is {max_model_len} tokens; the prompt has "
                       f"{len(p)} tokens (and at least one must be generated)", "messages" if chat else "prompt",
                       "context_length_exceeded")

    name = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _get(body, name, lambda v: _is_int(v) and v >= 1, "a positive integer")
    longest = max(len(p) for p in prompts)
    room = max_model_len - longest
    if max_tokens is None:
        max_tokens = room if chat else min(16, room)
    elif max_tokens > room:
        raise _bad(f"This model's maximum context length is {max_model_len} tokens; {name} = {max_tokens} plus "
                   f"the prompt's {longest} tokens exceed it", name, "context_length_exceeded")
    n = _get(body, "n", lambda v: _is_int(v) and 1 <= v <= MAX_N, f"an integer in [1, {MAX_N}]", 1)
    if len(prompts) * n > MAX_PROMPTS:
        raise _bad(f"prompts x n must be at most {MAX_PROMPTS}", "n")
    stream = _get(body, "stream", lambda v: isinstance(v, bool), "a boolean", False)
    so = _get(body, "stream_options", lambda v: isinstance(v, dict), "an object", {})
    include_usage = so.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise _bad("'stream_options.include_usage' must be a boolean", "stream_options")
    if so and not stream:
        raise _bad("'stream_options' is only allowed with stream: true", "stream_options")
    if chat:
        want = _get(body, "logprobs", lambda v: isinstance(v, bool), "a boolean", False)
        top = _get(body, "top_logprobs", lambda v: _is_int(v) and 0 <= v <= MAX_LOGPROBS,
                   f"an integer in [0, {MAX_LOGPROBS}]", None)
        if top is not None and not want:
            raise _bad("'top_logprobs' needs 'logprobs': true", "top_logprobs")
        logprobs = (top or 0) if want else None
    else:
        logprobs = _get(body, "logprobs", lambda v: _is_int(v) and 0 <= v <= 5, "an integer in [0, 5]", None)
    stop = body.get("stop")
    if stop is not None and not (isinstance(stop, str) or (isinstance(stop, list) and all(isinstance(s, str)
                                                                                          for s in stop))):
        raise _bad("'stop' must be a string or an array of strings", "stop")
    user = _get(body, "user", lambda v: isinstance(v, str), "a string")
    slo = {k: _get(body, k, lambda v: _is_num(v) and v > 0, "a positive number") for k in ("ttft_ms", "tpot_ms")}
    kw = {}
    for k in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
        if body.get(k) is not None:
            kw[k] = _get(body, k, _is_num, "a number")
    for k in ("top_k", "seed", "min_tokens"):
        if body.get(k) is not None:
            kw[k] = _get(body, k, _is_int, "an integer")
    for k in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output"):
        if body.get(k) is not None:
            kw[k] = _get(body, k, lambda v: isinstance(v, bool), "a boolean")
    if body.get("stop_token_ids") is not None:
        kw["stop_token_ids"] = _get(body, "stop_token_ids", lambda v: isinstance(v, list), "an array of integers")
    if "seed" in kw and not -(2**63) <= kw["seed"] < 2**64:
        raise _bad("'seed' is out of range", "seed")
    if "temperature" in kw and kw["temperature"] > 2.0:
        raise _bad(f"'temperature' must be in [0, 2], got {kw['temperature']}", "temperature")
    try:
        params = SamplingParams(n=1, max_tokens=max_tokens, stop=stop or [], logprobs=logprobs, **kw)
    except InvalidRequestError as e:
        raise _bad(str(e), getattr(e, "param", None)) from None
    spec = SamplingSpec(**{f.name: getattr(params, f.name) for f in dataclasses.fields(params)})
    return_ids = _get(body, "return_token_ids", lambda v: isinstance(v, bool), "a boolean", False)
    slo_class = _get(body, "slo_class", lambda v: isinstance(v, str) and 0 < len(v) <= 64, "a short string")
    return ApiRequest(chat, model, prompts, spec, n, stream, include_usage, logprobs, user,
                      slo["ttft_ms"], slo["tpot_ms"], return_ids, slo_class)


# ---- responses ---------------------------------------------------------------------------------------
def completion_logprobs(tokenizer, token_ids: list[int], lps: list, offset0: int = 0) -> dict:
    tokens = [tokenizer.decode([t], skip_special_tokens=False) for t in token_ids]
    offsets, off = [], offset0
    for t in tokens:
        offsets.append(off)
        off += len(t)
    def top(alts) -> dict:
        out = {}
        for i, v in alts:  # two ids can decode alike (partial UTF-8): the raw token string keeps them apart
            s = tokenizer.decode([i], skip_special_tokens=False)
            out[s if s not in out else (tokenizer.id_to_token(i) or f"<{i}>")] = v
        return out
    return {"tokens": tokens, "token_logprobs": [lp[0] for lp in lps], "top_logprobs": [top(lp[1]) for lp in lps],
            "text_offset": offsets}


def chat_logprobs(tokenizer, token_ids: list[int], lps: list) -> dict:
    def entry(tid, lp):
        s = tokenizer.decode([tid], skip_special_tokens=False)
        return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}
    content = []
    for tid, (lp, top) in zip(token_ids, lps):
        e = entry(tid, lp)
        e["top_logprobs"] = [entry(i, v) for i, v in top]
        content.append(e)
    return {"content": content}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


# ---- OpenAPI -----------------------------------------------------------------------------------------
_ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type", "param", "code"],
    "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                   "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}
_NUM = {"type": "number"}
_SAMPLING = {
    "model": {"type": "string"}, "max_tokens": {"type": "integer", "minimum": 1},
    "temperature": {"type": "number", "minimum": 0, "maximum": 2}, "top_p": {"type": "number"},
    "top_k": {"type": "integer"}, "min_p": _NUM, "n": {"type": "integer", "minimum": 1, "maximum": MAX_N},
    "stop": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
    "seed": {"type": "integer"}, "presence_penalty": _NUM, "frequency_penalty": _NUM, "repetition_penalty": _NUM,
    "user": {"type": "string"}, "stream": {"type": "boolean"},
    "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}},
}
_ERRORS = {str(s): {"description": d, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
           for s, d in ((400, "invalid request"), (401, "missing or wrong API key"), (404, "unknown model"),
                        (413, "body too large"), (429, "overloaded or SLO rejection (Retry-After)"),
                        (503, "no workers or no coordinator (Retry-After)"))}
def openapi(models: list[str], max_model_len: int) -> dict:
    """The gateway's OpenAPI 3.1 description, with the served model names and context length filled in."""
    sampling = dict(_SAMPLING, model={"type": "string", "enum": sorted(models)},
                    max_tokens={"type": "integer", "minimum": 1, "maximum": max_model_len - 1})
    body = {"type": "object", "additionalProperties": False}
    return {
        "openapi": "3.1.0",
        "info": {"title": "tandem gateway (OpenAI-compatible)", "version": "1"},
        "paths": {
            "/v1/completions": {"post": {
                "summary": "Text completion", "requestBody": {"required": True, "content": {"application/json": {
                    "schema": {**body, "required": ["model", "prompt"], "properties": {
                        **sampling, "logprobs": {"type": "integer", "minimum": 0, "maximum": 5},
                        "prompt": {"oneOf": [{"type": "string", "minLength": 1},
                                             {"type": "array", "minItems": 1, "items": {"type": "string"}},
                                             {"type": "array", "minItems": 1,
                                              "items": {"type": "integer", "minimum": 0}}]}}}}}},
                "responses": {"200": {"description": "completion (JSON) or an SSE stream"}, **_ERRORS}}},
            "/v1/chat/completions": {"post": {
                "summary": "Chat completion", "requestBody": {"required": True, "content": {"application/json": {
                    "schema": {**body, "required": ["model", "messages"], "properties": {
                        **sampling, "max_completion_tokens": {"type": "integer", "minimum": 1},
                        "logprobs": {"type": "boolean"},
                        "top_logprobs": {"type": "integer", "minimum": 0, "maximum": 20},
                        "messages": {"type": "array", "minItems": 1, "items": {
                            "type": "object", "required": ["role", "content"],
                            "properties": {"role": {"type": "string",
                                                    "enum": ["system", "developer", "user", "assistant"]},
                                           "content": {"type": "string"}}}}}}}}},
                "responses": {"200": {"description": "chat completion (JSON) or an SSE stream"}, **_ERRORS}}},
            "/v1/models": {"get": {"summary": "Served models", "responses": {"200": {"description": "model list"},
                                                                              "401": _ERRORS["401"]}}},
            "/health": {"get": {"summary": "Liveness", "responses": {"200": {"description": "ok"}}}},
            "/ready": {"get": {"summary": "Readiness: a coordinator leader and workers are known",
                               "responses": {"200": {"description": "ready"}, "503": _ERRORS["503"]}}},
            "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {"200": {"description": "text"}}}},
        },
        "components": {"schemas": {"Error": _ERROR},
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }
