"""Guided decoding's parts: grammars built and validated from request fields (engine/grammar.py), the
per-sequence matchers and their masks (engine/guided.py), and how the sampler applies them with
logit_bias and min_tokens. SmolLM2's real tokenizer; no model."""

import time
from pathlib import Path

import pytest
import torch

from engine import grammar
from engine.errors import InvalidRequestError
from engine.guided import GuidedDecoder, apply_disallowed, unpack
from engine.sampler import Sampler, SamplingRow
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence
from engine.tokenizer import Tokenizer

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 150}},
          "required": ["name", "age"], "additionalProperties": False}


@pytest.fixture(scope="module")
def tok(smollm2_dir):
    return Tokenizer(smollm2_dir)


@pytest.fixture(scope="module")
def decoder(smollm2_dir, tok):
    return GuidedDecoder((Path(smollm2_dir) / "tokenizer.json").read_text(), tok.vocab_size, (tok.eos_token_id,))


def allowed(decoder, seq) -> set[int]:
    disallowed = decoder.begin([seq])[0]()
    logits = torch.zeros(1, decoder.vocab_size)
    apply_disallowed(logits, disallowed, [0])
    return set(torch.nonzero(logits[0] == 0).flatten().tolist())


def seq_of(prompt, out, g, start=0):
    return Sequence("r", 0, list(prompt) + list(out), len(prompt), SamplingParams(guided=g, guided_start=start))


@pytest.mark.parametrize("build, param", [
    (lambda: grammar.regex("a(b", "guided_regex"), "guided_regex"),
    (lambda: grammar.json_schema({"type": "nonsense"}, "response_format.json_schema.schema"),
     "response_format.json_schema.schema"),
    (lambda: grammar.json_schema('{"type": ', "guided_json"), "guided_json"),
    (lambda: grammar.json_schema([1, 2], "guided_json"), "guided_json"),
    (lambda: grammar.grammar("root ::= ( ", "guided_grammar"), "guided_grammar"),
    (lambda: grammar.regex("a" * (grammar.MAX_GRAMMAR_CHARS + 1), "guided_regex"), "guided_regex"),
    (lambda: grammar.choice([], "guided_choice"), "guided_choice"),
])
def test_an_invalid_grammar_is_an_error_naming_the_parameter(build, param):
    with pytest.raises(InvalidRequestError) as e:
        grammar.check(build(), param)
    assert e.value.param == param


def test_pathological_grammars_are_refused_or_compiled_in_bounded_time():
    nested = {"type": "integer"}
    for _ in range(200):
        nested = {"type": "object", "properties": {"x": nested}, "required": ["x"]}
    wide = {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(3000)},
            "required": [f"p{i}" for i in range(3000)]}
    hostile = [lambda: grammar.regex("a{1,100000}", "r"), lambda: grammar.regex("((a|b){1,500}c){1,500}", "r"),
               lambda: grammar.json_schema(nested, "s"), lambda: grammar.json_schema(wide, "s")]
    for build in hostile:
        t0 = time.perf_counter()
        try:
            grammar.check(build(), "x")
        except InvalidRequestError as e:
            assert e.param in ("r", "s", "x")
        assert time.perf_counter() - t0 < 5


def test_validation_is_cached():
    g = grammar.json_schema({**SCHEMA, "title": "cached"}, "s")
    grammar.check(g, "s")
    t0 = time.perf_counter()
    for _ in range(1000):
        grammar.check(g, "s")
    assert time.perf_counter() - t0 < 0.5


def test_the_mask_follows_the_sequence_to_the_end(tok, decoder):
    g = grammar.check(grammar.json_schema(SCHEMA, "s"))
    prompt = tok.encode("Who?")
    out: list[int] = []
    text = '{"name": "Ada", "age": 36}'
    for t in tok.encode(text, add_special_tokens=False):
        seq = seq_of(prompt, out, g)
        ok = allowed(decoder, seq) if not out else allowed(decoder, seq)
        assert t in ok, (tok.decode(out), tok.decode([t]))
        assert tok.eos_token_id not in ok  # not finished yet
        decoder.release(seq.seq_id)
        out.append(t)
    seq = seq_of(prompt, out, g)
    assert allowed(decoder, seq) == {tok.eos_token_id}  # complete: it may only end


def test_a_matcher_catches_up_and_replays_a_resumed_requests_output(tok, decoder):
    g = grammar.check(grammar.json_schema(SCHEMA, "s"))
    prompt = tok.encode("Who?")
    done = tok.encode('{"name": "Ad', add_special_tokens=False)
    # one sequence, fed step by step, against a fresh one that replays the same output at once,
    # and a resumed request whose prompt carries it (guided_start)
    stepwise = seq_of(prompt, [], g)
    for t in done:
        allowed(decoder, stepwise)
        stepwise.token_ids.append(t)
    fresh = seq_of(prompt, done, g)
    resumed = Sequence("r", 0, prompt + done, len(prompt) + len(done),
                       SamplingParams(guided=g, guided_start=len(done)))
    a, b, c = allowed(decoder, stepwise), allowed(decoder, fresh), allowed(decoder, resumed)
    assert a == b == c
    assert tok.encode("a", add_special_tokens=False)[0] in a
    assert tok.eos_token_id not in a  # the string is still open


def test_masks_computed_after_the_forward_are_the_same(tok, decoder):
    g = grammar.check(grammar.json_schema(SCHEMA, "s"))
    seq = seq_of(tok.encode("?"), tok.encode('{"name": "A', add_special_tokens=False), g)
    overlapped = allowed(decoder, seq)
    decoder.release(seq.seq_id)
    decoder.overlap = False
    try:
        assert allowed(decoder, seq) == overlapped
    finally:
        decoder.overlap = True


def test_a_refused_token_leaves_only_the_end(tok, decoder):
    g = grammar.check(grammar.choice(["yes", "no"], "c"))
    seq = seq_of(tok.encode("?"), tok.encode("maybe", add_special_tokens=False), g)
    assert allowed(decoder, seq) == {tok.eos_token_id}


def test_unpacked_masks_match_the_bits_and_block_logits_past_the_vocabulary():
    torch.manual_seed(0)
    vocab, width = 70, 75  # logits wider than the tokenizer's vocabulary
    bits = torch.rand(2, vocab) < 0.5
    mask = torch.zeros(2, 3, dtype=torch.int32)
    for r in range(2):
        for t in range(vocab):
            if bits[r, t]:
                mask[r, t // 32] |= (-(1 << 31) if t % 32 == 31 else 1 << (t % 32))
    logits = torch.randn(3, width)
    before = logits.clone()
    apply_disallowed(logits, unpack(mask, width), [0, 2])
    assert torch.equal(logits[1], before[1])
    for j, r in ((0, 0), (1, 2)):
        for t in range(width):
            want = before[r, t] if t < vocab and bits[j, t] else float("-inf")
            assert logits[r, t] == want


def test_logit_bias_forces_and_bans_tokens():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    s = Sampler()
    assert s(logits, [SamplingRow(SamplingParams(temperature=0, logit_bias={2: 100}), [0], 1, None)])[0] == [2]
    assert s(logits, [SamplingRow(SamplingParams(temperature=0, logit_bias={1: -100}), [0], 1, None)])[0] == [3]
    assert logits.tolist() == [[0.0, 3.0, 1.0, 2.0]]  # the caller's tensor is untouched
    with pytest.raises(InvalidRequestError):
        SamplingParams(logit_bias={1: 101})


def test_min_tokens_gives_way_to_a_grammar_that_may_only_end():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])

    def only_eos(lg):
        lg[:, 1:] = float("-inf")
    params = SamplingParams(temperature=0, min_tokens=5, guided="g")
    assert Sampler(eos_token_ids=(0,))(logits, [SamplingRow(params, [5], 1, None)], only_eos)[0] == [0]


def test_json_object_and_choice_grammars_compile(tok, decoder):
    g = grammar.check(grammar.json_schema(grammar.ANY_OBJECT, "response_format"))
    seq = seq_of(tok.encode("?"), [], g)
    ok = allowed(decoder, seq)
    assert tok.encode("{", add_special_tokens=False)[0] in ok
    assert tok.encode("[", add_special_tokens=False)[0] not in ok
    g = grammar.check(grammar.grammar('root ::= "yes" | "no"', "guided_grammar"))
    assert tok.encode("yes", add_special_tokens=False)[0] in allowed(decoder, seq_of([1], [], g))
