"""The OpenAPI document is generated from the request Structs (gateway/openai_schema.py): it states
their bounds and lists every field."""

import msgspec

from gateway.openai_api import ApiError
from gateway.openai_schema import ChatCompletionRequest, CompletionRequest, ErrorResponse, openapi

REQUESTS = (CompletionRequest, ChatCompletionRequest)


def _schemas() -> tuple[dict, dict]:
    spec = openapi(["tiny", "big"], 2048)
    return spec, spec["components"]["schemas"]


def _alt(prop: dict, type_: str) -> dict:
    """The `type_` alternative of a nullable property."""
    return next(a for a in prop.get("anyOf", [prop]) if a.get("type") == type_)


def test_every_field_of_every_request_is_documented():
    spec, schemas = _schemas()
    for struct, path in zip(REQUESTS, ("/v1/completions", "/v1/chat/completions")):
        body = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        schema = schemas[body["$ref"].rsplit("/", 1)[1]]
        names = [f.encode_name for f in msgspec.structs.fields(struct)]
        assert set(schema["properties"]) == set(names), struct
        assert set(schema["required"]) == {f.encode_name for f in msgspec.structs.fields(struct) if f.required}
        assert schema["additionalProperties"] is False  # unknown fields are refused


def test_the_bounds_are_the_structs():
    _, schemas = _schemas()
    for struct in REQUESTS:
        props = schemas[struct.__name__]["properties"]
        assert _alt(props["temperature"], "number") == {"type": "number", "minimum": 0, "maximum": 2}
        assert _alt(props["top_p"], "number") == {"type": "number", "exclusiveMinimum": 0, "maximum": 1}
        assert _alt(props["presence_penalty"], "number")["maximum"] == 2
        assert _alt(props["n"], "integer") == {"type": "integer", "minimum": 1, "maximum": 16}
        assert props["model"]["enum"] == ["big", "tiny"]  # what the gateway serves
        assert _alt(props["max_tokens"], "integer") == {"type": "integer", "minimum": 1, "maximum": 2047}
    chat = schemas["ChatCompletionRequest"]["properties"]
    assert _alt(chat["top_logprobs"], "integer")["maximum"] == 20
    assert _alt(chat["max_completion_tokens"], "integer")["maximum"] == 2047
    assert _alt(schemas["CompletionRequest"]["properties"]["logprobs"], "integer")["maximum"] == 5
    roles = schemas["ChatMessage"]["properties"]["role"]["enum"]
    assert sorted(roles) == ["assistant", "developer", "system", "tool", "user"]


def test_errors_are_documented_by_the_struct_that_writes_them():
    spec, schemas = _schemas()
    ref = spec["paths"]["/v1/completions"]["post"]["responses"]["400"]["content"]["application/json"]["schema"]
    assert ref == {"$ref": "#/components/schemas/ErrorResponse"}
    assert set(schemas["ErrorDetail"]["required"]) == {"message", "type", "param", "code"}
    body = ApiError(400, "no", "temperature").body()
    assert msgspec.convert(body, ErrorResponse).error.param == "temperature"
    assert body == {"error": {"message": "no", "type": "invalid_request_error", "param": "temperature", "code": None}}
