"""The API's bounds (gateway/openai_schema.py) lie within the engine's (engine/sampling_params.py): every
value a request may carry, at each end of each bound, makes a valid SamplingParams; and neither side
takes NaN or an infinity. The extremes come from the Structs' own type information (msgspec.inspect),
so a bound changed on either side is checked without editing this test."""

import dataclasses
import math

import msgspec
import msgspec.inspect as mi
import pytest

from engine.errors import InvalidRequestError
from engine.sampling_params import SamplingParams
from gateway.openai_schema import ChatCompletionRequest, CompletionRequest

ENGINE = {f.name: f for f in dataclasses.fields(SamplingParams)}
# API field -> the SamplingParams field it becomes, where the names differ; None: none
RENAMED = {(ChatCompletionRequest, "max_completion_tokens"): "max_tokens",
           (ChatCompletionRequest, "top_logprobs"): "logprobs",
           (ChatCompletionRequest, "logprobs"): None}  # a flag: the count is top_logprobs
FAR = 2**62  # "unbounded" probed this far out
# engine fields no API field maps to: the gateway builds them (a grammar from response_format or the
# guided_* fields; where a resumed request's output starts; prompt logprobs from echo and logprobs)
BUILT = {"guided", "guided_start", "prompt_logprobs"}


def _extremes(t) -> list:
    """The values at both ends of each bound a msgspec type accepts (far out where it has none)."""
    if isinstance(t, mi.Metadata):  # a description
        return _extremes(t.type)
    if isinstance(t, mi.UnionType):
        return [v for alt in t.types for v in _extremes(alt)]
    if isinstance(t, mi.NoneType):
        return []  # null: the engine's default
    if isinstance(t, mi.BoolType):
        return [False, True]
    if isinstance(t, mi.IntType):
        lo = t.ge if t.ge is not None else t.gt + 1 if t.gt is not None else -FAR
        hi = t.le if t.le is not None else t.lt - 1 if t.lt is not None else FAR
        return [lo, hi]
    if isinstance(t, mi.FloatType):
        lo = t.ge if t.ge is not None else math.nextafter(t.gt, math.inf) if t.gt is not None else -1e300
        hi = t.le if t.le is not None else math.nextafter(t.lt, -math.inf) if t.lt is not None else 1e300
        return [lo, hi]
    if isinstance(t, mi.StrType):
        return ["x" * max(t.min_length or 0, 1)] + ([""] if not t.min_length else [])
    if isinstance(t, mi.DictType):  # logit_bias: the gateway turns its keys into token ids
        return [{0: v} for v in _extremes(t.value_type)] + [{}]
    if isinstance(t, mi.ListType):
        n = t.max_length if t.max_length is not None else 3
        return [[v] * n for v in _extremes(t.item_type)] + ([[]] if not t.min_length else [])
    raise AssertionError(f"no extremes for {t}")


def _accepts(annotation, value) -> bool:
    try:
        msgspec.convert(value, annotation)
        return True
    except msgspec.ValidationError:
        return False


def _fields():
    return [(struct, f) for struct in (CompletionRequest, ChatCompletionRequest) for f in msgspec.structs.fields(struct)]


def _shared():
    """(struct, API field, engine field, its annotation) for every API field that reaches the engine."""
    for struct, f in _fields():
        name = RENAMED.get((struct, f.name), f.name)
        if name in ENGINE:
            yield pytest.param(struct, f.name, name, f.type, id=f"{struct.__name__}.{f.name}")


def test_every_sampling_field_has_an_api_bound_checked():
    assert {p.values[2] for p in _shared()} == set(ENGINE) - BUILT


@pytest.mark.parametrize("struct,api,name,annotation", list(_shared()))
def test_the_api_extremes_are_valid_for_the_engine(struct, api, name, annotation):
    for value in _extremes(mi.type_info(annotation)):
        assert _accepts(annotation, {str(k): v for k, v in value.items()} if isinstance(value, dict) else value), \
            (api, value)
        try:
            SamplingParams(**{name: value})
        except InvalidRequestError as e:
            pytest.fail(f"{struct.__name__}.{api} = {value!r} passes the API but not the engine: {e}")


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_no_side_takes_a_non_finite_number(value):
    floats = [f for _, f in _fields() if _accepts(f.type, 0.5)]
    assert len(floats) >= 10
    for f in floats:
        assert not _accepts(f.type, value), f.name
    for name, f in ENGINE.items():
        if f.type in ("float", "float | None"):
            with pytest.raises(InvalidRequestError):
                SamplingParams(**{name: value})
