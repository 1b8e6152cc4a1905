"""parse(): OpenAI request bodies into ApiRequests, or ApiErrors that name the parameter (no server, a
fake tokenizer). tests/integration/test_gateway.py sends the same bad bodies through HTTP."""

import math

import pytest

from common.sampling import SamplingSpec
from engine.errors import InvalidRequestError
from gateway.openai_api import ApiError, parse

MAX_LEN, VOCAB = 64, 1000


class Tok:
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return ([1] if add_special_tokens else []) + [100 + ord(c) % 100 for c in text]

    chat_template = None  # no template of its own for tools: SmolLM2's layout

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, tools=None) -> str:
        assert tools is None
        if messages[-1]["role"] == "tool":
            raise InvalidRequestError("the template has no tool role")
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + ("<assistant>" * add_generation_prompt)

    def decode(self, ids, skip_special_tokens=True) -> str:
        return "".join(chr(t) for t in ids)

    def id_to_token(self, t):
        return chr(t)


def completion(**kw):
    return parse({"model": "m", "prompt": "hi", **kw}, False, Tok(), {"m"}, MAX_LEN, VOCAB)


def chat(**kw):
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **kw}
    return parse(body, True, Tok(), {"m"}, MAX_LEN, VOCAB)


def error(fn, *a, **kw) -> ApiError:
    with pytest.raises(ApiError) as e:
        fn(*a, **kw)
    assert set(e.value.body()["error"]) == {"message", "type", "param", "code"} and e.value.message
    return e.value


def test_a_completion_carries_its_sampling_parameters():
    r = completion(max_tokens=5, temperature=0.5, top_p=0.9, top_k=-1, seed=3, stop="\n", n=2, logprobs=2,
                   stop_token_ids=[7], ignore_eos=True, min_tokens=1, user="u", ttft_ms=200, slo_class="gold",
                   return_token_ids=True)
    assert r.prompts == [[1, 104, 105]] and r.n == 2 and r.logprobs == 2 and not r.stream
    assert r.params == SamplingSpec(max_tokens=5, temperature=0.5, top_p=0.9, top_k=-1, seed=3, stop=["\n"],
                                    logprobs=2, stop_token_ids=[7], ignore_eos=True, min_tokens=1)
    assert (r.user, r.ttft_ms, r.tpot_ms, r.slo_class, r.return_token_ids) == ("u", 200, None, "gold", True)


def test_null_means_not_given_and_defaults_apply():
    r = completion(temperature=None, n=None, stop=None, stream=None, echo=None, max_tokens=None)
    assert r.params == SamplingSpec(max_tokens=16) and r.n == 1 and not r.stream
    assert completion(stop="").params.stop == []
    assert chat().params.max_tokens == MAX_LEN - len(chat().prompts[0])  # chat: the rest of the context


def test_structured_outputs_become_one_grammar():
    from engine import grammar
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    rf = {"type": "json_schema", "json_schema": {"name": "thing", "schema": schema, "strict": True}}
    assert chat(response_format=rf).params.guided == grammar.json_schema(schema, "x")
    assert completion(guided_json=schema).params.guided == grammar.json_schema(schema, "x")
    assert completion(guided_json='{"type": "integer"}').params.guided == grammar.json_schema({"type": "integer"}, "x")
    anything = grammar.json_schema(grammar.ANY_OBJECT, "x")
    assert chat(response_format={"type": "json_object"}).params.guided == anything
    assert chat(response_format={"type": "json_schema", "json_schema": {"name": "any"}}).params.guided == anything
    assert chat(response_format={"type": "text"}).params.guided is None
    assert completion(guided_regex="[ab]+").params.guided == grammar.regex("[ab]+", "x")
    assert completion(guided_choice=["yes", "no"]).params.guided == grammar.choice(["yes", "no"], "x")
    assert completion(guided_grammar='root ::= "a"').params.guided == grammar.grammar('root ::= "a"', "x")
    assert completion(logit_bias={"5": 100, "7": -1.5}).params.logit_bias == {5: 100.0, 7: -1.5}


@pytest.mark.parametrize("prompt,want", [
    ("ab", [[1, 197, 198]]), (["a", "b"], [[1, 197], [1, 198]]), ([5, 6], [[5, 6]]),
    ([[5], [6, 7]], [[5], [6, 7]]),
])
def test_prompt_shapes(prompt, want):
    assert completion(prompt=prompt).prompts == want


def test_chat_messages_text_parts_and_roles():
    parts = [{"type": "text", "text": "be "}, {"type": "text", "text": "brief"}]
    r = chat(messages=[{"role": "developer", "content": parts}, {"role": "user", "content": "hi", "name": "ann"}],
             stream=True, stream_options={"include_usage": True}, logprobs=True, top_logprobs=3,
             max_completion_tokens=4, max_tokens=9, tool_choice="none")
    assert r.prompts == [Tok().encode("<system>be brief<user>hi<assistant>", add_special_tokens=False)]
    assert r.stream and r.include_usage and r.logprobs == 3 and r.params.logprobs == 3 and r.params.max_tokens == 4
    assert chat(logprobs=True).logprobs == 0 and chat(logprobs=False).logprobs is None


BAD = [
    ({"model": None}, "model"), ({"model": ""}, "model"), ({"prompt": None}, "prompt"),
    ({"prompt": 5}, "prompt"), ({"prompt": []}, "prompt"), ({"prompt": [[]]}, "prompt[0]"),
    ({"prompt": [1, "a"]}, "prompt"), ({"prompt": [-1]}, "prompt[0]"), ({"prompt": [VOCAB]}, "prompt"),
    ({"prompt": ["x"] * 65}, "prompt"), ({"prompt": "x" * MAX_LEN}, "prompt"),
    ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": "ten"}, "max_tokens"), ({"max_tokens": MAX_LEN}, "max_tokens"),
    ({"max_tokens": 2.0}, "max_tokens"),
    ({"temperature": -1}, "temperature"), ({"temperature": 2.5}, "temperature"),
    ({"temperature": "hot"}, "temperature"), ({"temperature": True}, "temperature"),
    ({"temperature": math.inf}, "temperature"), ({"temperature": math.nan}, "temperature"),
    ({"top_p": 0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -math.inf}, "frequency_penalty"), ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"min_p": math.nan}, "min_p"), ({"top_k": -2}, "top_k"),
    ({"n": 0}, "n"), ({"n": 17}, "n"), ({"prompt": ["a"] * 40, "n": 2}, "n"), ({"logprobs": 6}, "logprobs"),
    ({"stop": 3}, "stop"), ({"stop": [""]}, "stop[0]"), ({"stop": ["x"] * 17}, "stop"),
    ({"seed": 2**64}, "seed"), ({"seed": "x"}, "seed"), ({"stop_token_ids": [-1]}, "stop_token_ids[0]"),
    ({"stop_token_ids": [3, VOCAB]}, "stop_token_ids"),
    ({"min_tokens": -1}, "min_tokens"), ({"ttft_ms": 0}, "ttft_ms"), ({"tpot_ms": math.inf}, "tpot_ms"),
    ({"slo_class": ""}, "slo_class"),
    ({"best_of": 3}, "best_of"), ({"suffix": "z"}, "suffix"),
    ({"logit_bias": {"x": 1}}, "logit_bias"), ({"logit_bias": {str(VOCAB): 1}}, "logit_bias"),
    ({"logit_bias": {"5": 101}}, "logit_bias"), ({"logit_bias": {"-1": 1}}, "logit_bias"),
    ({"frobnicate": 1}, "frobnicate"), ({"messages": []}, "messages"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}}},
     "response_format.json_schema.name"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "nonsense"}}}},
     "response_format.json_schema.schema"),
    ({"guided_json": {"type": "object", "properties": 3}}, "guided_json"), ({"guided_json": "{"}, "guided_json"),
    ({"guided_regex": "a(b"}, "guided_regex"), ({"guided_regex": ""}, "guided_regex"),
    ({"guided_choice": []}, "guided_choice"), ({"guided_grammar": "root ::= ("}, "guided_grammar"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
    ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "guided_regex"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"stream": True, "stream_options": {"include_usage": 1}}, "stream_options.include_usage"),
]


@pytest.mark.parametrize("body,param", BAD)
def test_bad_completions_name_the_parameter(body, param):
    e = error(completion, **body)
    assert (e.status, e.param) == (400, param), e.message


BAD_CHAT = [
    ({"messages": []}, "messages"), ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "user"}]}, "messages[0].content"), ({"messages": [{"content": "x"}]}, "messages[0]"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages[0].content[0].type"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"),
    ({"messages": [{"role": "tool", "content": "x", "tool_call_id": "c"}]}, "messages"),
    ({"messages": [{"role": "user", "content": None, "tool_calls": []}]}, "messages[0].content"),
    ({"top_logprobs": 2}, "top_logprobs"), ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"logprobs": 1}, "logprobs"),
    ({"max_completion_tokens": 0}, "max_completion_tokens"),
    ({"max_completion_tokens": MAX_LEN}, "max_completion_tokens"),
    ({"tools": [{"type": "function"}]}, "tools[0]"), ({"tool_choice": "auto"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}]},
     "tools[0].function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}] * 2}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}],
      "tool_choice": {"type": "function", "function": {"name": "g"}}}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "required", "guided_regex": "a"},
     "guided_regex"),
    ({"prompt": "x"}, "prompt"),
]


@pytest.mark.parametrize("body,param", BAD_CHAT)
def test_bad_chats_name_the_parameter(body, param):
    e = error(chat, **body)
    assert (e.status, e.param) == (400, param), e.message


WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def test_tools_render_into_the_prompt_and_required_calls_are_guided():
    from engine import grammar
    from gateway import tools
    msgs = [{"role": "user", "content": "Weather in Oslo?"},
            {"role": "assistant", "content": None,
             "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "get_weather",
                                                                          "arguments": '{"city": "Oslo"}'}}]},
            {"role": "tool", "content": "rain", "tool_call_id": "c1"}, {"role": "user", "content": "So?"}]
    big = 4096
    r = parse({"model": "m", "messages": msgs, "tools": [WEATHER]}, True, Tok(), {"m"}, big, VOCAB)
    assert r.tool_format is tools.SMOLLM2 and r.tool_names == {"get_weather"} and r.params.guided is None  # auto
    assert r.prompts == [Tok().encode(Tok().apply_chat_template(tools.render(
        [{"role": m["role"], "content": m["content"], **({"tool_calls": m["tool_calls"]} if "tool_calls" in m else {})}
         for m in msgs], [WEATHER["function"]], tools.SMOLLM2, False)), add_special_tokens=False)]
    req = parse({"model": "m", "messages": msgs[:1], "tools": [WEATHER], "tool_choice": "required"}, True, Tok(),
                {"m"}, big, VOCAB)
    assert req.params.guided == grammar.lark(tools.SMOLLM2.lark([WEATHER["function"]], True))
    named = parse({"model": "m", "messages": msgs[:1], "tools": [WEATHER], "parallel_tool_calls": True,
                   "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}, True, Tok(), {"m"}, big,
                  VOCAB)
    assert named.params.guided == grammar.lark(tools.SMOLLM2.lark([WEATHER["function"]], False))  # one call
    none = parse({"model": "m", "messages": msgs[:1], "tools": [WEATHER], "tool_choice": "none"}, True, Tok(), {"m"},
                 big, VOCAB)
    assert none.tool_format is None and none.params.guided is None


def test_tokenize_and_detokenize_take_vllms_shapes():
    from gateway.openai_api import detokenize, tokenize
    assert tokenize({"model": "m", "prompt": "ab"}, Tok(), {"m"}, MAX_LEN) == \
        {"tokens": [1, 197, 198], "count": 3, "max_model_len": MAX_LEN}
    assert tokenize({"prompt": "ab", "add_special_tokens": False, "return_token_strs": True}, Tok(), {"m"}, MAX_LEN) \
        == {"tokens": [197, 198], "count": 2, "max_model_len": MAX_LEN, "token_strs": [chr(197), chr(198)]}
    msgs = [{"role": "user", "content": "x"}]
    assert tokenize({"messages": msgs}, Tok(), {"m"}, MAX_LEN)["tokens"] == Tok().encode("<user>x<assistant>", False)
    assert tokenize({"messages": msgs, "add_generation_prompt": False}, Tok(), {"m"}, MAX_LEN)["tokens"] == \
        Tok().encode("<user>x", False)
    assert detokenize({"model": "m", "tokens": [104, 105]}, Tok(), {"m"}, VOCAB) == {"prompt": "hi"}
    assert error(detokenize, {"tokens": [VOCAB]}, Tok(), {"m"}, VOCAB).param == "tokens"
    assert error(detokenize, {"tokens": [-1]}, Tok(), {"m"}, VOCAB).param == "tokens[0]"
    assert error(tokenize, {"model": "zz", "prompt": "a"}, Tok(), {"m"}, MAX_LEN).status == 404
    assert error(tokenize, {"prompt": "a", "messages": msgs}, Tok(), {"m"}, MAX_LEN).param == "prompt"


def test_echo_keeps_each_prompts_text():
    assert completion(echo=True, prompt=["a", "b"]).echo == ["a", "b"]
    assert completion(echo=True, prompt=[104, 105]).echo == ["hi"]
    assert completion().echo is None


def test_messages_say_what_is_wrong():
    assert "2.0" in error(completion, temperature=3).message
    assert error(completion, frobnicate=1).message == "Unrecognized request argument supplied: frobnicate"
    assert error(completion, best_of=2).code == "unsupported_parameter"
    assert "regex" in error(completion, guided_regex="a(b").message
    assert error(completion, max_tokens=MAX_LEN).code == "context_length_exceeded"
    e = error(parse, {"model": "x", "prompt": "hi"}, False, Tok(), {"m"}, MAX_LEN, VOCAB)
    assert (e.status, e.param, e.code) == (404, "model", "model_not_found")
    for body in ([1], None, "x"):
        assert error(parse, body, False, Tok(), {"m"}, MAX_LEN, VOCAB).param is None


def test_tool_schemas_with_empty_strings_and_bad_answer_schemas():
    tool = {"type": "function", "function": {"name": "f", "description": "", "parameters": {
        "type": "object", "properties": {"mode": {"enum": ["a", ""], "default": ""}}, "required": ["mode"]}}}
    msgs = [{"role": "user", "content": "x"}]
    r = parse({"model": "m", "messages": msgs, "tools": [tool], "tool_choice": "required"}, True, Tok(), {"m"},
              4096, VOCAB)
    assert r.params.guided  # the empty strings stay in the embedded schema: it compiles
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}
    e = error(parse, {"model": "m", "messages": msgs, "tools": [tool], "response_format": bad}, True, Tok(), {"m"},
              4096, VOCAB)
    assert e.param == "response_format.json_schema.schema"
