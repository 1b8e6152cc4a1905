import math

import pytest

from engine.errors import InvalidRequestError
from engine.sampling_params import SamplingParams


@pytest.mark.parametrize("field,value", [
    ("n", 0), ("n", 1.5), ("max_tokens", 0), ("max_tokens", -3), ("temperature", -0.1),
    ("temperature", math.nan), ("temperature", math.inf), ("top_p", 0.0), ("top_p", 1.5), ("top_p", math.nan),
    ("top_k", -2), ("min_p", 2.0), ("repetition_penalty", 0.0), ("repetition_penalty", math.inf),
    ("presence_penalty", 3.0), ("presence_penalty", -math.inf), ("frequency_penalty", -2.5),
    ("frequency_penalty", math.nan), ("seed", "x"), ("stop", [""]), ("stop_token_ids", [-1]), ("logprobs", 21),
    ("logprobs", True), ("prompt_logprobs", -1), ("prompt_logprobs", 21), ("prompt_logprobs", 1.0),
])
def test_invalid_values_name_the_field(field, value):
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(**{field: value})
    assert e.value.param == field
    assert field.split("_")[0] in str(e.value)


def test_normalisation():
    p = SamplingParams(stop="END", top_k=-1, temperature=0)
    assert p.stop == ["END"] and p.top_k == 0 and p.greedy
    assert SamplingParams(stop="").stop == [] and SamplingParams(stop=None).stop == []
    assert SamplingParams(top_k=1, temperature=0.8).greedy
    assert not SamplingParams(temperature=0.7).greedy
    assert SamplingParams(presence_penalty=0.5).has_penalties
