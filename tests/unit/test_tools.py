"""Tool calling's parts (gateway/tools.py): the format a chat template implies, the prompt's layout, the
calls read back from an output whole or streamed, and the grammars that make required calls certain
(checked with llguidance on SmolLM2's tokenizer)."""

import json
from pathlib import Path

import pytest

from engine import grammar
from gateway import tools
from gateway.tools import HERMES, LLAMA3, MISTRAL, SMOLLM2, ToolStream

WEATHER = {"name": "get_weather", "description": "Weather now",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                           "unit": {"enum": ["c", "f"]}},
                          "required": ["city"], "additionalProperties": False}}
TIME = {"name": "get_time", "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}}}
NAMES = {"get_weather", "get_time"}


def output(fmt, calls: list[tuple[str, dict]], before: str = "") -> str:
    objs = [{"name": n, fmt.args_key: a} for n, a in calls]
    if fmt is SMOLLM2:
        return before + "<tool_call>" + json.dumps(objs) + "</tool_call>"
    if fmt is HERMES:
        return before + "\n".join(f"<tool_call>\n{json.dumps(o)}\n</tool_call>" for o in objs)
    if fmt is MISTRAL:
        return before + "[TOOL_CALLS]" + json.dumps(objs)
    return "; ".join(json.dumps(o) for o in objs)


def test_the_template_picks_the_format():
    assert tools.detect(None) is SMOLLM2
    assert tools.detect("{% for m in messages %}<|im_start|>{{ m.content }}{% endfor %}") is SMOLLM2
    assert tools.detect("{%- if tools %}<tools>{{ tools }}</tools> <tool_call>{% endif %}") is HERMES
    assert tools.detect("{{ '[AVAILABLE_TOOLS]' }}{{ '[TOOL_CALLS]' }}") is MISTRAL
    assert tools.detect("<|start_header_id|>ipython<|end_header_id|>") is LLAMA3
    assert tools.renders_tools("{% if tools %}x{% endif %}") and not tools.renders_tools("{{ messages }}")


def test_smollm2_layout_puts_tools_in_the_system_message_and_calls_in_the_text():
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
            {"role": "tool", "content": "21 C", "tool_call_id": "c1"}]
    out = tools.render(msgs, [WEATHER], SMOLLM2, native=False)
    assert out[0]["content"].startswith("Be brief.") and json.dumps(tools.function_list([WEATHER])) in out[0]["content"]
    assert out[2] == {"role": "assistant",
                      "content": '<tool_call>[{"name": "get_weather", "arguments": {"city": "Paris"}}]</tool_call>'}
    assert out[3] == {"role": "tool", "content": "21 C"}
    native = tools.render(msgs, [WEATHER], HERMES, native=True)
    assert native[2]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"} and native[2]["content"] == ""
    assert native[0] == msgs[0]  # a template that renders tools gets them itself


@pytest.mark.parametrize("fmt", [SMOLLM2, HERMES, MISTRAL, LLAMA3])
def test_calls_are_read_back_whole(fmt):
    calls = [("get_weather", {"city": "Paris", "unit": "c"}), ("get_time", {"tz": "CET"})]
    if fmt is LLAMA3:
        calls = calls[:1]
    content, got = tools.parse(fmt, output(fmt, calls, "" if fmt is LLAMA3 else "Let me check. "), NAMES)
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in got] == calls
    assert all(c["id"].startswith("call_") and c["type"] == "function" for c in got)
    assert content == (None if fmt is LLAMA3 else "Let me check.")
    assert len({c["id"] for c in got}) == len(got)


@pytest.mark.parametrize("text", ["Just text.", "<tool_call>[{\"name\": \"get_weather\", \"arguments\": {\"city\"",
                                  "<tool_call>[{\"name\": \"nope\", \"arguments\": {}}]</tool_call>",
                                  "<tool_call>[{\"name\": \"get_weather\", \"arguments\": [1]}]</tool_call>"])
def test_anything_else_is_content(text):
    assert tools.parse(SMOLLM2, text, NAMES) == (text, [])


def stream(fmt, text: str, step: int = 1):
    s = ToolStream(fmt, NAMES)
    content, deltas = "", []
    for i in range(0, len(text), step):
        c, d = s.feed(text[i:i + step], final=i + step >= len(text))
        content += c
        deltas += d
    return content, deltas


def assemble(deltas):
    calls: dict[int, dict] = {}
    for d in deltas:
        c = calls.setdefault(d["index"], {"id": None, "name": None, "arguments": ""})
        if "id" in d:
            assert c["id"] is None and c["arguments"] == ""  # id and name come first, once
            c["id"], c["name"] = d["id"], d["function"]["name"]
        else:
            assert c["id"] is not None
        c["arguments"] += d["function"].get("arguments", "")
    return [calls[i] for i in sorted(calls)]


@pytest.mark.parametrize("fmt", [SMOLLM2, HERMES, MISTRAL, LLAMA3])
@pytest.mark.parametrize("step", [1, 3, 1000])
def test_streamed_calls_follow_openais_delta_shape(fmt, step):
    calls = [("get_weather", {"city": "Saint-\u00c9tienne, \"FR\" {x}"}), ("get_time", {})]
    if fmt is LLAMA3:
        calls = calls[:1]
    before = "" if fmt is LLAMA3 else "Checking. "
    content, deltas = stream(fmt, output(fmt, calls, before), step)
    got = assemble(deltas)
    assert [(c["name"], json.loads(c["arguments"])) for c in got] == calls
    assert content.strip() == before.strip()
    assert deltas[0]["id"].startswith("call_") and deltas[0]["type"] == "function"


def test_a_marker_prefix_is_held_until_it_is_told_apart():
    s = ToolStream(SMOLLM2, NAMES)
    assert s.feed("Use <tool") == ("Use ", [])
    assert s.feed("s wisely") == ("<tools wisely", [])
    assert s.feed(" <", final=True) == (" <", [])


def test_an_unreadable_call_comes_out_as_content_at_the_end():
    text = "<tool_call>[{\"oops\": 1}]</tool_call>"
    assert stream(SMOLLM2, text) == (text, [])
    content, deltas = stream(LLAMA3, "Paris is sunny.")
    assert (content, deltas) == ("Paris is sunny.", [])


@pytest.fixture(scope="module")
def lltok(smollm2_dir):
    import llguidance
    return llguidance.LLTokenizer((Path(smollm2_dir) / "tokenizer.json").read_text())


def accepts(lltok, g: str, text: str) -> bool:
    import llguidance
    m = llguidance.LLMatcher(lltok, g)
    ids = lltok.tokenize_str(text)
    return m.validate_tokens(ids) == len(ids) and m.consume_tokens(ids) and m.is_accepting()


@pytest.mark.parametrize("fmt", [SMOLLM2, HERMES, MISTRAL, LLAMA3])
def test_the_required_grammar_admits_valid_calls_only(fmt, lltok):
    g = grammar.check(grammar.lark(fmt.lark([WEATHER, TIME], parallel=True)), "tools")
    one = output(fmt, [("get_weather", {"city": "Paris"})])
    assert accepts(lltok, g, one)
    assert not accepts(lltok, g, output(fmt, [("get_weather", {"town": "Paris"})]))  # not its schema
    assert not accepts(lltok, g, output(fmt, [("get_wind", {})]))  # no such function
    assert not accepts(lltok, g, "Sure! " + one)  # a call, nothing else
    two = output(fmt, [("get_weather", {"city": "Paris"}), ("get_time", {"tz": "UTC"})])
    assert accepts(lltok, g, two)
    single = grammar.check(grammar.lark(fmt.lark([WEATHER], parallel=False)), "tools")
    assert accepts(lltok, single, one) and not accepts(lltok, single, two)
    if fmt is not LLAMA3:
        assert tools.parse(fmt, two, NAMES)[1]


def test_auto_with_a_json_answer_admits_a_call_or_the_answer(lltok):
    answer = {"type": "object", "properties": {"reply": {"type": "string"}}, "required": ["reply"]}
    g = grammar.check(grammar.lark(SMOLLM2.lark([WEATHER], True, answer)), "tools")
    assert accepts(lltok, g, output(SMOLLM2, [("get_weather", {"city": "Oslo"})]))
    assert accepts(lltok, g, '{"reply": "hello"}')
    assert not accepts(lltok, g, "hello")


QWEN_LIKE = (  # a Hermes-style template that renders tools itself (as Qwen2.5's does), abridged
    "{%- if tools %}<|im_start|>system\nTools:\n{%- for t in tools %}\n{{ t.function | tojson }}{%- endfor %}\n"
    "Reply with <tool_call>{...}</tool_call>.<|im_end|>\n{%- endif %}"
    "{%- for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{%- if m.tool_calls %}{%- for c in m.tool_calls %}<tool_call>{{ c.function | tojson }}</tool_call>{%- endfor %}"
    "{%- endif %}<|im_end|>\n{%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}")


def test_a_template_that_renders_tools_gets_them_and_reads_back_hermes(tmp_path):
    from helpers import write_byte_tokenizer

    from engine.tokenizer import Tokenizer
    from gateway.openai_api import parse
    write_byte_tokenizer(tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": QWEN_LIKE}))
    tok = Tokenizer(tmp_path)
    tool = {"type": "function", "function": WEATHER}
    msgs = [{"role": "user", "content": "Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {
                "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
            {"role": "tool", "content": "sunny", "tool_call_id": "c1"}]
    r = parse({"model": "m", "messages": msgs, "tools": [tool]}, True, tok, {"m"}, 100_000, 10**6)
    text = tok.decode(r.prompts[0], skip_special_tokens=False)
    assert json.dumps(WEATHER, sort_keys=True) in text  # the template's own rendering (tojson sorts keys)
    assert '<tool_call>{"arguments": {"city": "Paris"}, "name": "get_weather"}</tool_call>' in text
    assert "You can call functions" not in text  # not SmolLM2's layout
    assert r.tool_format is HERMES


@pytest.mark.parametrize("fmt", [SMOLLM2, HERMES])
@pytest.mark.parametrize("step", [1, 5, 17])
def test_long_arguments_with_escapes_and_brackets_in_strings_stream_whole(fmt, step):
    """A call's open arguments are followed through the new text only (not read again per delta): their
    brackets inside strings, escaped quotes and backslashes split across deltas must not end them."""
    args = {"text": 'wo\\"rd{[ ' * 200, "nested": {"a": [1, 2, {"b": 'x"y\\'}]}}
    calls = [("get_weather", args), ("get_time", {"z": "}"})]
    content, deltas = stream(fmt, output(fmt, calls), step)
    assert [(c["name"], json.loads(c["arguments"])) for c in assemble(deltas)] == calls and content == ""
