"""The wire's SamplingSpec (common/) and the engine's SamplingParams cannot drift apart: same fields, same
order, same defaults; a spec that travels in a message builds the SamplingParams it was made from."""

import dataclasses

import msgspec

from common.messages import VERSION, PrefillRequest, decode_worker_message, encode
from common.sampling import SamplingSpec
from engine.sampling_params import SamplingParams


def _default(f):
    missing = (dataclasses.MISSING, msgspec.NODEFAULT)
    return f.default if f.default not in missing else f.default_factory()


def test_the_spec_has_the_engine_fields_and_defaults():
    engine = [(f.name, _default(f)) for f in dataclasses.fields(SamplingParams)]
    wire = [(f.name, _default(f)) for f in msgspec.structs.fields(SamplingSpec)]
    assert wire == engine


def test_a_spec_on_the_wire_builds_the_same_sampling_params():
    spec = SamplingSpec(max_tokens=7, temperature=0.5, top_k=-1, seed=3, stop=["\n\n"], stop_token_ids=[2],
                        logprobs=2, ignore_eos=True, logit_bias={5: -2.5}, guided='{"grammars": []}', guided_start=3)
    msg = decode_worker_message(encode(PrefillRequest(VERSION, "r", 0, [1, 2], spec, "tcp://x:1")))
    assert msg.params == spec
    params = SamplingParams(**msgspec.structs.asdict(msg.params))
    assert params == SamplingParams(max_tokens=7, temperature=0.5, top_k=0, seed=3, stop=["\n\n"],
                                    stop_token_ids=[2], logprobs=2, ignore_eos=True, logit_bias={5: -2.5},
                                    guided='{"grammars": []}', guided_start=3)
    assert SamplingParams(**msgspec.structs.asdict(SamplingSpec())) == SamplingParams()
