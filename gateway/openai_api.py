"""The OpenAI-compatible request surface (torch-free): a /v1/completions or /v1/chat/completions body
into a typed request, and the response and stream-chunk shapes. The bodies' types and bounds are
gateway/openai_schema.py's Structs; what needs the served model (its names, context length, vocabulary,
tokenizer) is checked here. Every failure is an ApiError naming the parameter."""

from __future__ import annotations

from dataclasses import dataclass

import msgspec

from common.sampling import SamplingSpec
from engine import grammar
from engine.errors import InvalidRequestError
from gateway.openai_schema import (
    MAX_PROMPTS,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    ErrorDetail,
    ErrorResponse,
    Prompt,
    ResponseFormatJsonObject,
    ResponseFormatJsonSchema,
    unsupported,
)


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type, self.headers = \
            status, message, param, code, type_, headers or {}

    def body(self) -> dict:
        return msgspec.to_builtins(ErrorResponse(ErrorDetail(self.message, self.type, self.param, self.code)))


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


# the request fields that go to the engine as they are
_SAMPLING = ("min_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
             "frequency_penalty", "seed", "stop_token_ids", "ignore_eos", "include_stop_str_in_output",
             "skip_special_tokens")


def _bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param, code)


def parse(body, chat: bool, tokenizer, served_models: set[str], max_model_len: int, vocab_size: int) -> ApiRequest:
    req = _convert(body, ChatCompletionRequest if chat else CompletionRequest)
    name = unsupported(req)
    if name is not None:
        raise _bad(f"'{name}' is not supported by this server", name, "unsupported_parameter")
    if req.model not in served_models:
        served = ", ".join(sorted(served_models))
        raise ApiError(404, f"The model '{req.model:.200}' does not exist (served: {served})", "model",
                       "model_not_found")
    prompts = _chat_prompts(req.messages, tokenizer) if chat else _completion_prompts(req.prompt, tokenizer)
    _check_prompts(prompts, "messages" if chat else "prompt", max_model_len, vocab_size)
    if req.stop_token_ids and max(req.stop_token_ids) >= vocab_size:  # the sampler indexes logits with them
        raise _bad(f"stop_token_ids must be in [0, {vocab_size})", "stop_token_ids")
    max_tokens = _max_tokens(req, chat, prompts, max_model_len)
    n = req.n or 1
    if len(prompts) * n > MAX_PROMPTS:
        raise _bad(f"prompts x n must be at most {MAX_PROMPTS}", "n")
    if req.stream_options is not None and not req.stream:
        raise _bad("'stream_options' is only allowed with stream: true", "stream_options")
    logprobs = _chat_logprobs(req) if chat else req.logprobs
    stop = req.stop if isinstance(req.stop, list) else [req.stop] if req.stop else []
    given = {k: v for k in _SAMPLING if (v := getattr(req, k)) is not None}
    if req.logit_bias:
        given["logit_bias"] = _logit_bias(req.logit_bias, vocab_size)
    guided = _guided(req)
    if guided is not None:
        given["guided"] = guided
    params = SamplingSpec(max_tokens=max_tokens, stop=stop, logprobs=logprobs, **given)
    include_usage = req.stream_options is not None and req.stream_options.include_usage
    return ApiRequest(chat, req.model, prompts, params, n, bool(req.stream), include_usage, logprobs, req.user,
                      req.ttft_ms, req.tpot_ms, bool(req.return_token_ids), req.slo_class)


def _logit_bias(bias: dict[str, float], vocab_size: int) -> dict[int, float]:
    out = {}
    for k, v in bias.items():
        try:
            t = int(k)
        except ValueError:
            raise _bad(f"logit_bias keys must be token ids, got {k[:40]!r}", "logit_bias") from None
        if not 0 <= t < vocab_size:
            raise _bad(f"logit_bias: token id {t} is outside the vocabulary [0, {vocab_size})", "logit_bias")
        out[t] = float(v)
    return out


def _guided(req) -> str | None:
    """The one grammar the request's output must follow (engine/grammar.py), validated; None: free."""
    rf = req.response_format
    given = [(name, v) for name in ("guided_json", "guided_regex", "guided_choice", "guided_grammar")
             if (v := getattr(req, name)) is not None]
    if isinstance(rf, (ResponseFormatJsonObject, ResponseFormatJsonSchema)):
        given.insert(0, ("response_format", rf))
    if not given:
        return None
    if len(given) > 1:
        raise _bad(f"'{given[1][0]}' cannot be combined with '{given[0][0]}': one output constraint per request",
                   given[1][0])
    name, v = given[0]
    try:
        if name == "response_format":
            if isinstance(v, ResponseFormatJsonObject) or v.json_schema.schema_ is None:
                g, name = grammar.json_schema(grammar.ANY_OBJECT, name), "response_format"
            else:
                name = "response_format.json_schema.schema"
                g = grammar.json_schema(v.json_schema.schema_, name)
        elif name == "guided_json":
            g = grammar.json_schema(v, name)
        elif name == "guided_regex":
            g = grammar.regex(v, name)
        elif name == "guided_choice":
            g = grammar.choice(v, name)
        else:
            g = grammar.grammar(v, name)
        return grammar.check(g, name)
    except InvalidRequestError as e:
        raise _bad(str(e), e.param or name) from None


def _convert(body, struct: type[CompletionRequest | ChatCompletionRequest]):
    """The body as `struct`. Unknown and missing top-level fields are found here, by name: msgspec's
    errors for them do not name the field as a path."""
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object")
    fields = msgspec.structs.fields(struct)
    known = {f.encode_name for f in fields}
    for k in body:
        if k not in known:
            raise _bad(f"Unrecognized request argument supplied: {k:.80}", k)
    for f in fields:
        if f.required and body.get(f.encode_name) is None:
            raise _bad(f"'{f.encode_name}' is required", f.encode_name)
    try:
        return msgspec.convert(body, struct)
    except msgspec.ValidationError as e:
        raise _bad(str(e), _error_path(e)) from None


def _error_path(e: msgspec.ValidationError) -> str | None:
    """Where a msgspec error is ("... - at `$.messages[0].role`" -> messages[0].role): msgspec says so
    only in its message."""
    _, at, path = str(e).rpartition(" - at `$")
    return (path.rstrip("`").lstrip(".").replace("[...]", "") or None) if at else None  # [...]: a dict's value


def _completion_prompts(prompt: Prompt, tokenizer) -> list[list[int]]:
    if isinstance(prompt, str):
        return [tokenizer.encode(prompt)]
    kinds = {type(p) for p in prompt}
    if kinds == {int}:
        return [prompt]
    if len(kinds) > 1:
        raise _bad("'prompt' must be a string, an array of strings, an array of token ids, or an array of "
                   "token-id arrays, not a mix", "prompt")
    if len(prompt) > MAX_PROMPTS:
        raise _bad(f"at most {MAX_PROMPTS} prompts per request", "prompt")
    return [tokenizer.encode(p) for p in prompt] if kinds == {str} else prompt


def _chat_prompts(messages: list[ChatMessage], tokenizer) -> list[list[int]]:
    clean = []
    for i, m in enumerate(messages):
        content = "".join(p.text for p in m.content) if isinstance(m.content, list) else m.content
        if content is None:
            raise _bad(f"messages[{i}].content must be a string or text parts", f"messages[{i}].content")
        clean.append({"role": "system" if m.role == "developer" else m.role, "content": content})
    try:
        text = tokenizer.apply_chat_template(clean)
    except InvalidRequestError as e:
        raise _bad(str(e), "messages") from None
    return [tokenizer.encode(text, add_special_tokens=False)]


def _check_prompts(prompts: list[list[int]], param: str, max_model_len: int, vocab_size: int) -> None:
    for p in prompts:
        if not p:
            raise _bad("the prompt is empty after tokenization", param)
        if any(not 0 <= t < vocab_size for t in p):
            raise _bad(f"token ids must be in [0, {vocab_size})", "prompt")
        if len(p) >= max_model_len:
            raise _bad(f"This model's maximum context length is {max_model_len} tokens; the prompt has "
                       f"{len(p)} tokens (and at least one must be generated)", param, "context_length_exceeded")


def _max_tokens(req: CompletionRequest | ChatCompletionRequest, chat: bool, prompts: list[list[int]],
                max_model_len: int) -> int:
    """The request's limit, or the default (16 for completions, the rest of the context for chat)."""
    name, value = "max_tokens", req.max_tokens
    if chat and req.max_completion_tokens is not None:
        name, value = "max_completion_tokens", req.max_completion_tokens
    longest = max(len(p) for p in prompts)
    room = max_model_len - longest
    if value is None:
        return room if chat else min(16, room)
    if value > room:
        raise _bad(f"This model's maximum context length is {max_model_len} tokens; {name} = {value} plus "
                   f"the prompt's {longest} tokens exceed it", name, "context_length_exceeded")
    return value


def _chat_logprobs(req: ChatCompletionRequest) -> int | None:
    if req.top_logprobs is not None and not req.logprobs:
        raise _bad("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    return (req.top_logprobs or 0) if req.logprobs else None


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


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0, kv_tokens: int = 0) -> dict:
    """OpenAI's usage object; `prompt_tokens_details.cached_tokens`: prompt tokens whose KV the worker
    that prefilled found in its prefix cache; `kv_transfer_tokens` (tandem's): prompt tokens whose KV was
    shipped from a prefill worker to a decode worker (not those the decode worker held)."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}, "kv_transfer_tokens": kv_tokens}
