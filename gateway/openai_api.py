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
from gateway import tools as toolcalls
from gateway.openai_schema import (
    MAX_PROMPTS,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    DetokenizeRequest,
    ErrorDetail,
    ErrorResponse,
    NamedToolChoice,
    Prompt,
    ResponseFormatJsonObject,
    ResponseFormatJsonSchema,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    TokenizeResponse,
    unsupported,
)
from gateway.tools import ToolFormat


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
    tool_format: ToolFormat | None = None  # chat with tools (tool_choice not "none"): read calls from the output
    tool_names: set[str] | None = None
    echo: list[str] | None = None  # completions with echo: each prompt's text, to lead its choices' text


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
    _served(req.model, served_models)
    tools = _tools(req, tokenizer) if chat else None
    guided = _tool_grammar(req, tools) if tools is not None and tools.mode != "none" else None
    guided = guided or _guided(req)
    prompts = _chat_prompts(req.messages, tokenizer, tools) if chat else _completion_prompts(req.prompt, tokenizer)
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
    if guided is not None:
        given["guided"] = guided
    if not chat and req.echo and logprobs is not None:
        given["prompt_logprobs"] = logprobs  # the echoed prompt's tokens get logprobs too
    parsing = tools is not None and tools.mode != "none"
    if parsing and tools.format is toolcalls.MISTRAL:
        given["skip_special_tokens"] = False  # its [TOOL_CALLS] marker is a special token
    params = SamplingSpec(max_tokens=max_tokens, stop=stop, logprobs=logprobs, **given)
    include_usage = req.stream_options is not None and req.stream_options.include_usage
    return ApiRequest(chat, req.model, prompts, params, n, bool(req.stream), include_usage, logprobs, req.user,
                      req.ttft_ms, req.tpot_ms, bool(req.return_token_ids), req.slo_class,
                      tools.format if parsing else None, tools.names if parsing else None,
                      _echo(req.prompt, prompts, tokenizer) if not chat and req.echo else None)


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


GUIDED_FIELDS = ("guided_json", "guided_regex", "guided_choice", "guided_grammar")  # vLLM's extensions


def _response_schema(rf) -> dict | bool | None:
    """The JSON schema a JSON response_format asks for (any object when it names none); None: text."""
    if isinstance(rf, ResponseFormatJsonObject):
        return grammar.ANY_OBJECT
    if isinstance(rf, ResponseFormatJsonSchema):
        return rf.json_schema.schema_ if rf.json_schema.schema_ is not None else grammar.ANY_OBJECT
    return None


def _response_param(rf) -> str:
    named = isinstance(rf, ResponseFormatJsonSchema) and rf.json_schema.schema_ is not None
    return "response_format.json_schema.schema" if named else "response_format"


def _guided(req) -> str | None:
    """The one grammar the request's output must follow (engine/grammar.py), validated; None: free."""
    rf = req.response_format
    given = [(name, v) for name in GUIDED_FIELDS if (v := getattr(req, name)) is not None]
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
            name = _response_param(v)
            g = grammar.json_schema(_response_schema(v), name)
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


def _echo(prompt: Prompt, ids: list[list[int]], tokenizer) -> list[str]:
    """The prompts' text as echo returns it: as given, or decoded from token ids."""
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt[0], str):
        return list(prompt)
    return [tokenizer.decode(p, skip_special_tokens=False) for p in ids]


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


@dataclass
class _Tools:
    mode: str  # "none" | "auto" | "required" | "named"
    format: ToolFormat
    native: bool  # the chat template renders tools itself
    defs: list[dict]  # the functions: name, description, parameters
    openai: list[dict]  # the tools as given (for a template that renders them)
    names: set[str]
    named: str | None = None


def _tools(req: ChatCompletionRequest | TokenizeChatRequest, tokenizer) -> _Tools | None:
    choice = getattr(req, "tool_choice", None)
    if not req.tools:
        if choice not in (None, "none"):
            raise _bad("'tool_choice' needs 'tools'", "tool_choice")
        return None
    defs = []
    for i, t in enumerate(req.tools):
        f = t.function
        if f.parameters is not None:  # a bad schema is the request's fault, named where it is
            param = f"tools[{i}].function.parameters"
            try:
                grammar.check(grammar.json_schema(f.parameters, param), param)
            except InvalidRequestError as e:
                raise _bad(str(e), param) from None
        defs.append({"name": f.name, "description": f.description, "parameters": f.parameters})
    names = [d["name"] for d in defs]
    if len(set(names)) != len(names):
        raise _bad("tool names must be unique", "tools")
    named = None
    if isinstance(choice, NamedToolChoice):
        named = choice.function.name
        if named not in names:
            raise _bad(f"tool_choice names '{named[:64]}', which is not in 'tools'", "tool_choice")
    mode = "named" if named else (choice or "auto")
    template = getattr(tokenizer, "chat_template", None)
    defs = toolcalls.function_list(defs)  # without the fields not given
    openai = [{"type": "function", "function": d} for d in defs]
    return _Tools(mode, toolcalls.detect(template), toolcalls.renders_tools(template), defs, openai, set(names),
                  named)


def _tool_grammar(req: ChatCompletionRequest, tools: _Tools) -> str | None:
    """required / a named function: the format's calls, arguments per schema. auto with a JSON
    response_format: those calls or a JSON answer. Otherwise free (None)."""
    answer = _response_schema(req.response_format)
    others = [n for n in GUIDED_FIELDS if getattr(req, n) is not None]
    if others:
        raise _bad(f"'{others[0]}' cannot be combined with 'tools' (use response_format)", others[0])
    if tools.mode == "auto" and answer is None:
        return None
    if tools.mode in ("required", "named"):
        answer = None  # this turn is a call; the answer's format applies to a later one
    elif answer is not None:  # a bad answer schema is the response_format's fault, named so
        _guided(req)
    chosen = [d for d in tools.defs if d["name"] == tools.named] if tools.named else tools.defs
    lark = tools.format.lark(chosen, req.parallel_tool_calls is not False and tools.mode != "named", answer)
    return grammar.check(grammar.lark(lark), "tools")


def _chat_prompts(messages: list[ChatMessage], tokenizer, tools: _Tools | None = None,
                  add_generation_prompt: bool = True, add_special_tokens: bool = False) -> list[list[int]]:
    clean = []
    for i, m in enumerate(messages):
        content = "".join(p.text for p in m.content) if isinstance(m.content, list) else m.content
        if content is None and not (m.role == "assistant" and m.tool_calls):
            raise _bad(f"messages[{i}].content must be a string or text parts", f"messages[{i}].content")
        if m.tool_calls and m.role != "assistant":
            raise _bad("only assistant messages carry tool_calls", f"messages[{i}].tool_calls")
        if m.role == "tool" and not m.tool_call_id:
            raise _bad("a tool message needs the 'tool_call_id' of the call it answers", f"messages[{i}].tool_call_id")
        msg = {"role": "system" if m.role == "developer" else m.role, "content": content}
        if m.tool_calls:
            msg["tool_calls"] = [{"id": c.id, "type": "function",
                                  "function": {"name": c.function.name, "arguments": c.function.arguments}}
                                 for c in m.tool_calls]
        if m.tool_call_id:
            msg["tool_call_id"] = m.tool_call_id
        if m.name:
            msg["name"] = m.name
        clean.append(msg)
    native = tools.native if tools is not None else toolcalls.renders_tools(getattr(tokenizer, "chat_template", None))
    fmt = tools.format if tools is not None else toolcalls.detect(getattr(tokenizer, "chat_template", None))
    rendered = toolcalls.render(clean, tools.defs if tools else None, fmt, native)
    try:
        text = tokenizer.apply_chat_template(rendered, add_generation_prompt=add_generation_prompt,
                                             tools=tools.openai if tools and native else None)
    except InvalidRequestError as e:
        raise _bad(str(e), "messages") from None
    return [tokenizer.encode(text, add_special_tokens=add_special_tokens)]


def _served(model: str | None, served_models: set[str]) -> None:
    if model is not None and model not in served_models:
        served = ", ".join(sorted(served_models))
        raise ApiError(404, f"The model '{model:.200}' does not exist (served: {served})", "model", "model_not_found")


def tokenize(body, tokenizer, served_models: set[str], max_model_len: int) -> dict:
    """POST /tokenize: {"prompt"} or {"messages"} (vLLM's shapes) -> {"tokens", "count", "max_model_len"}."""
    chat = isinstance(body, dict) and "messages" in body
    req = _convert(body, TokenizeChatRequest if chat else TokenizeCompletionRequest)
    _served(req.model, served_models)
    if chat:
        tools = _tools(req, tokenizer) if req.tools else None
        ids = _chat_prompts(req.messages, tokenizer, tools, req.add_generation_prompt, req.add_special_tokens)[0]
    else:
        ids = tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens)
    strs = [tokenizer.id_to_token(t) or "" for t in ids] if req.return_token_strs else None
    return msgspec.to_builtins(TokenizeResponse(ids, len(ids), max_model_len, strs))


def detokenize(body, tokenizer, served_models: set[str], vocab_size: int) -> dict:
    """POST /detokenize: {"tokens"} -> {"prompt"} (vLLM's shapes)."""
    req = _convert(body, DetokenizeRequest)
    _served(req.model, served_models)
    if any(t >= vocab_size for t in req.tokens):
        raise _bad(f"token ids must be in [0, {vocab_size})", "tokens")
    return {"prompt": tokenizer.decode(req.tokens)}


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
    return {"tokens": tokens, "token_logprobs": [lp[0] if lp is not None else None for lp in lps],
            "top_logprobs": [top(lp[1]) if lp is not None else None for lp in lps],  # None: a prompt's first token
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
