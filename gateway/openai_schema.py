"""The OpenAI request bodies the gateway accepts, written once (torch-free): /v1/completions and
/v1/chat/completions as msgspec Structs whose types carry their bounds. Decoding a body into one
(gateway/openai_api.py's parse) checks them; the OpenAPI document is generated from them.

Bounds are OpenAI's documented ranges where it has one (temperature 0..2, top_p 0..1, the penalties
-2..2, top_logprobs 0..20; completions' logprobs 0..5); the extensions (as vLLM's) take the engine's.
Every one lies within engine.sampling_params.SamplingParams' checks (tests/unit/test_sampling_bounds.py),
so a valid body always makes a valid SamplingParams on the worker. Every float is bounded on both sides,
which refuses NaN and infinities. `null` means "not given", as with OpenAI.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta

MAX_N = 16  # samples per prompt
MAX_PROMPTS = 64  # prompts x n per request
MAX_STOP = 16  # stop strings
MAX_LOGPROBS = 20  # chat's top_logprobs (OpenAI's limit)
MAX_COMPLETION_LOGPROBS = 5  # completions' logprobs (OpenAI's limit)

PositiveInt = Annotated[int, Meta(ge=1)]
TokenId = Annotated[int, Meta(ge=0)]
NonEmptyStr = Annotated[str, Meta(min_length=1)]
Penalty = Annotated[float, Meta(ge=-2, le=2)]
Millis = Annotated[float, Meta(gt=0, le=86_400_000)]  # at most a day
# one prompt, several prompts, token ids, or several token-id lists; a list of one kind only (parse
# checks: msgspec allows one array type in a union, so the kinds are a union inside one list)
Prompt = str | Annotated[list[str | TokenId | Annotated[list[TokenId], Meta(min_length=1)]], Meta(min_length=1)]


class StreamOptions(msgspec.Struct):
    include_usage: bool = False


class TextPart(msgspec.Struct):
    type: Literal["text"]
    text: str


class FunctionCall(msgspec.Struct):
    name: Annotated[str, Meta(min_length=1, max_length=64)]
    arguments: str  # JSON text


class ToolCall(msgspec.Struct):
    id: Annotated[str, Meta(min_length=1, max_length=128)]
    function: FunctionCall
    type: Literal["function"] = "function"


class ChatMessage(msgspec.Struct):
    """Other keys of a message are ignored; content is text only. `tool_calls`: an assistant's earlier
    calls; `tool_call_id`: which call a `tool` message answers."""
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None  # None only for an assistant message with tool_calls
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None


class FunctionDef(msgspec.Struct, forbid_unknown_fields=True):
    name: Annotated[str, Meta(min_length=1, max_length=64, pattern="^[a-zA-Z0-9_-]+$")]
    description: str | None = None
    parameters: Annotated[dict, Meta(description="a JSON schema of the arguments object")] | None = None
    strict: bool | None = None  # calls required or named always follow `parameters` here


class Tool(msgspec.Struct, forbid_unknown_fields=True):
    function: FunctionDef
    type: Literal["function"] = "function"


class NamedFunction(msgspec.Struct, forbid_unknown_fields=True):
    name: Annotated[str, Meta(min_length=1, max_length=64)]


class NamedToolChoice(msgspec.Struct, forbid_unknown_fields=True):
    function: NamedFunction
    type: Literal["function"] = "function"


MAX_TOOLS = 128


class ResponseFormatText(msgspec.Struct, tag="text", tag_field="type", forbid_unknown_fields=True):
    pass


class ResponseFormatJsonObject(msgspec.Struct, tag="json_object", tag_field="type", forbid_unknown_fields=True):
    pass


class JsonSchemaFormat(msgspec.Struct, forbid_unknown_fields=True):
    name: Annotated[str, Meta(min_length=1, max_length=64, pattern="^[a-zA-Z0-9_-]+$")]
    description: str | None = None
    schema_: Annotated[dict | bool, Meta(description="the JSON schema the output follows")] | None = \
        msgspec.field(default=None, name="schema")  # None: any JSON
    strict: bool | None = None  # the output always follows the schema here, strict or not


class ResponseFormatJsonSchema(msgspec.Struct, tag="json_schema", tag_field="type", forbid_unknown_fields=True):
    json_schema: JsonSchemaFormat


ResponseFormat = ResponseFormatText | ResponseFormatJsonObject | ResponseFormatJsonSchema
MAX_LOGIT_BIAS = 1024  # entries


class _Request(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    model: NonEmptyStr
    max_tokens: PositiveInt | None = None
    n: Annotated[int, Meta(ge=1, le=MAX_N)] | None = None
    temperature: Annotated[float, Meta(ge=0, le=2)] | None = None
    top_p: Annotated[float, Meta(gt=0, le=1)] | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    seed: Annotated[int, Meta(ge=-(2**63), le=2**63 - 1)] | None = None
    stop: str | Annotated[list[NonEmptyStr], Meta(max_length=MAX_STOP)] | None = None  # "": none
    stream: bool | None = None
    stream_options: StreamOptions | None = None  # only with stream: true
    user: str | None = None
    logit_bias: Annotated[dict[str, Annotated[float, Meta(ge=-100, le=100)]],
                          Meta(max_length=MAX_LOGIT_BIAS, description="token id -> bias added to its logit")] | None = None
    response_format: ResponseFormat | None = None
    # structured outputs, extensions (as vLLM's): at most one of these and response_format
    guided_json: Annotated[dict | bool | str, Meta(description="a JSON schema the output follows")] | None = None
    guided_regex: Annotated[str, Meta(min_length=1)] | None = None
    guided_choice: Annotated[list[str], Meta(min_length=1, max_length=1024)] | None = None
    guided_grammar: Annotated[str, Meta(min_length=1, description="Lark, or GBNF (llama.cpp's EBNF)")] | None = None
    # extensions (as vLLM's)
    top_k: Annotated[int, Meta(ge=-1, description="0 or -1: disabled")] | None = None
    min_p: Annotated[float, Meta(ge=0, le=1)] | None = None
    repetition_penalty: Annotated[float, Meta(gt=0, le=10)] | None = None
    min_tokens: Annotated[int, Meta(ge=0)] | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[TokenId] | None = None
    skip_special_tokens: bool | None = None
    include_stop_str_in_output: bool | None = None
    return_token_ids: Annotated[bool, Meta(description="each choice also carries its token ids")] | None = None
    # extensions: the request's SLOs (milliseconds to the first token, per output token) or a named class
    ttft_ms: Millis | None = None
    tpot_ms: Millis | None = None
    slo_class: Annotated[str, Meta(min_length=1, max_length=64)] | None = None


class CompletionRequest(_Request, kw_only=True):
    prompt: Prompt
    logprobs: Annotated[int, Meta(ge=0, le=MAX_COMPLETION_LOGPROBS)] | None = None
    echo: bool | None = None  # the prompt leads each choice's text (and its logprobs, with logprobs)
    best_of: int | None = None  # not supported: 1 only
    suffix: str | None = None  # not supported: "" only


class ChatCompletionRequest(_Request, kw_only=True):
    messages: Annotated[list[ChatMessage], Meta(min_length=1)]
    max_completion_tokens: PositiveInt | None = None  # wins over max_tokens
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Meta(ge=0, le=MAX_LOGPROBS)] | None = None  # needs logprobs: true
    tools: Annotated[list[Tool], Meta(max_length=MAX_TOOLS)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None  # default: auto with tools
    parallel_tool_calls: bool | None = None  # default: true
    # accepted and ignored
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    # not supported: only the values in UNSUPPORTED
    functions: list[dict] | None = None
    function_call: str | dict | None = None
    modalities: list[str] | None = None
    audio: dict | None = None
    prediction: dict | None = None
    reasoning_effort: str | None = None


class TokenizeCompletionRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """POST /tokenize with a prompt (vLLM's shape)."""
    model: NonEmptyStr | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool | None = None


class TokenizeChatRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """POST /tokenize with chat messages (vLLM's shape): the prompt the chat template makes of them."""
    model: NonEmptyStr | None = None
    messages: Annotated[list[ChatMessage], Meta(min_length=1)]
    add_generation_prompt: bool = True
    add_special_tokens: bool = False
    tools: Annotated[list[Tool], Meta(max_length=MAX_TOOLS)] | None = None
    return_token_strs: bool | None = None


class DetokenizeRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """POST /detokenize (vLLM's shape)."""
    model: NonEmptyStr | None = None
    tokens: list[TokenId]


class TokenizeResponse(msgspec.Struct, omit_defaults=True):
    tokens: list[int]
    count: int
    max_model_len: int
    token_strs: list[str] | None = None


class DetokenizeResponse(msgspec.Struct):
    prompt: str


# OpenAI parameters tandem knows but does not implement, with the values that ask for nothing of them:
# any other value is a clear 400 (code unsupported_parameter), not a silent ignore
UNSUPPORTED: dict[str, tuple] = {
    "best_of": (1,), "suffix": ("",), "functions": ([],), "function_call": ("none",),
    "modalities": (["text"],), "audio": (), "prediction": (), "reasoning_effort": (),
}


def unsupported(req: _Request) -> str | None:
    """The first parameter `req` sets to something this server does not implement."""
    for name, harmless in UNSUPPORTED.items():
        value = getattr(req, name, None)
        if value is not None and value not in harmless:
            return name
    return None


class ErrorDetail(msgspec.Struct):
    message: str
    type: str
    param: str | None  # the request field at fault, as a path (messages[0].role)
    code: str | None


class ErrorResponse(msgspec.Struct):
    error: ErrorDetail


# ---- OpenAPI -----------------------------------------------------------------------------------------
_ERRORS = ((400, "invalid request"), (401, "missing or wrong API key"), (404, "unknown model"),
           (413, "body too large"), (429, "overloaded or SLO rejection (Retry-After)"),
           (503, "no workers or no coordinator (Retry-After)"))


def _serving(schema: dict, models: list[str], max_model_len: int) -> None:
    """What only the running gateway knows: the served model names and the context length."""
    props = schema["properties"]
    props["model"]["enum"] = sorted(models)
    for name in ("max_tokens", "max_completion_tokens"):
        for alt in props.get(name, {}).get("anyOf", []):
            if alt.get("type") == "integer":
                alt["maximum"] = max_model_len - 1


def openapi(models: list[str], max_model_len: int) -> dict:
    """The gateway's OpenAPI 3.1 description: the request and error schemas generated from the Structs
    above, with the served model names and context length filled in."""
    (completion, chat, error, tok_prompt, tok_chat, detok, tok_out, detok_out), schemas = \
        msgspec.json.schema_components(
            (CompletionRequest, ChatCompletionRequest, ErrorResponse, TokenizeCompletionRequest, TokenizeChatRequest,
             DetokenizeRequest, TokenizeResponse, DetokenizeResponse), ref_template="#/components/schemas/{name}")
    for struct in (CompletionRequest, ChatCompletionRequest):
        _serving(schemas[struct.__name__], models, max_model_len)
    errors = {str(s): {"description": d, "content": {"application/json": {"schema": error}}} for s, d in _ERRORS}

    def post(summary: str, body: dict, ok: str, out: dict | None = None) -> dict:
        result = {"description": ok}
        if out is not None:
            result["content"] = {"application/json": {"schema": out}}
        return {"post": {"summary": summary,
                         "requestBody": {"required": True, "content": {"application/json": {"schema": body}}},
                         "responses": {"200": result, **errors}}}

    def get(summary: str, ok: str, *statuses: int) -> dict:
        return {"get": {"summary": summary,
                        "responses": {"200": {"description": ok}, **{str(s): errors[str(s)] for s in statuses}}}}

    return {
        "openapi": "3.1.0",
        "info": {"title": "tandem gateway (OpenAI-compatible)", "version": "1"},
        "paths": {
            "/v1/completions": post("Text completion", completion, "completion (JSON) or an SSE stream"),
            "/v1/chat/completions": post("Chat completion", chat, "chat completion (JSON) or an SSE stream"),
            "/tokenize": post("A prompt's or chat's token ids (vLLM's shape)", {"anyOf": [tok_prompt, tok_chat]},
                              "token ids", tok_out),
            "/detokenize": post("Token ids' text (vLLM's shape)", detok, "text", detok_out),
            "/v1/models": get("Served models", "model list", 401),
            "/health": get("Liveness", "ok"),
            "/ready": get("Readiness: a coordinator leader and workers are known", "ready", 503),
            "/metrics": get("Prometheus metrics", "text"),
        },
        "components": {"schemas": schemas, "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }
