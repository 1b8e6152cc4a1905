"""Tool calling (torch-free): how a model's prompt shows tools, how its output is read back as OpenAI
tool calls, and the grammar that makes a required or named call certain.

The format follows the model's chat template:

    template mentions      format    the model writes
    [TOOL_CALLS]           mistral   [TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]
    <tool_call>            hermes    <tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call> (one per call)
    <|python_tag|>/ipython llama3    {"name": ..., "parameters": {...}} (";"-separated when several)
    none of these          smollm2   <tool_call>[{"name": ..., "arguments": {...}}, ...]</tool_call>

A template that renders `tools` itself gets them (and the conversation's `tool_calls` and `tool`
messages) as Hugging Face templates take them. One that does not, SmolLM2's among them, gets them from
here, in SmolLM2's own function-calling layout: the tools as JSON in the system message, earlier calls
as the assistant's `<tool_call>[...]</tool_call>` text, results as `tool` turns.

`tool_choice` "required" or a named function constrains the output to the format's calls whose
arguments follow the function's `parameters` schema (a Lark grammar with embedded JSON schemas,
engine/grammar.py); "auto" leaves the model free and parses what it writes; "none" parses nothing.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from engine import grammar


@dataclass(frozen=True)
class ToolFormat:
    name: str
    start: str  # the text that opens the calls ("": a JSON object that starts the output)
    args_key: str  # the call object's key for the arguments
    open: str  # grammar: before the calls, between two, after them
    sep: str
    close: str
    parallel: bool = True  # the format can hold several calls

    def lark(self, tools: list[dict], parallel: bool, answer: dict | bool | None = None) -> str:
        """The Lark grammar (llguidance's dialect) of one or more calls of `tools`; or, with `answer` (a
        JSON schema), either those calls or a JSON answer that follows it."""
        options = [{"type": "object", "properties": {"name": {"const": t["name"]},
                                                     self.args_key: t.get("parameters") or {"type": "object"}},
                    "required": ["name", self.args_key], "additionalProperties": False} for t in tools]
        call = {"anyOf": options} if len(options) > 1 else options[0]
        call["x-guidance"] = grammar.JSON_OPTIONS
        parts = [json.dumps(self.open)] if self.open else []
        parts.append("call")
        if parallel and self.parallel:
            parts.append(f"({json.dumps(self.sep)} call)*")
        if self.close:
            parts.append(json.dumps(self.close))
        text = (f"start: calls{' | answer' if answer is not None else ''}\n"
                f"calls: {' '.join(parts)}\n"
                f"call: %json {json.dumps(call)}\n")
        if answer is not None:
            schema = {**answer, "x-guidance": grammar.JSON_OPTIONS} if isinstance(answer, dict) else answer
            text += f"answer: %json {json.dumps(schema)}\n"
        return text


SMOLLM2 = ToolFormat("smollm2", "<tool_call>", "arguments", "<tool_call>[", ", ", "]</tool_call>")
HERMES = ToolFormat("hermes", "<tool_call>", "arguments", "<tool_call>\n", "\n</tool_call>\n<tool_call>\n",
                    "\n</tool_call>")
MISTRAL = ToolFormat("mistral", "[TOOL_CALLS]", "arguments", "[TOOL_CALLS][", ", ", "]")
LLAMA3 = ToolFormat("llama3", "", "parameters", "", "; ", "")


def detect(template: str | None) -> ToolFormat:
    t = template or ""
    if "[TOOL_CALLS]" in t:
        return MISTRAL
    if "<tool_call>" in t:
        return HERMES
    if "<|python_tag|>" in t or "ipython" in t:
        return LLAMA3
    return SMOLLM2


def renders_tools(template: str | None) -> bool:
    """Whether the chat template shows `tools` to the model itself."""
    return bool(template) and re.search(r"\btools\b", template) is not None


# ---- the prompt --------------------------------------------------------------------------------------
SYSTEM = """You can call functions to answer. Their signatures, as JSON, are between <tools> and </tools>:
<tools>{tools}</tools>
To call one or more, reply with only this, and nothing else:
<tool_call>[{{"name": "function name", "arguments": {{"argument": "value"}}}}]</tool_call>
If no function fits, answer in plain text."""


def function_list(tools: list[dict]) -> list[dict]:
    """Functions as the prompt shows them: name, description and parameters, those given."""
    return [{k: v for k, v in (("name", t["name"]), ("description", t.get("description")),
                                ("parameters", t.get("parameters"))) if v is not None} for t in tools]


def render(messages: list[dict], tools: list[dict] | None, fmt: ToolFormat, native: bool) -> list[dict]:
    """`tools`: function_list()'s. Chat messages (OpenAI's, checked) as the chat template takes them. `native`: the template renders
    tools, tool calls and tool results itself (Hugging Face's conventions: a call's arguments as an
    object). Otherwise they are written into the messages in SmolLM2's layout."""
    out = []
    for m in messages:
        calls = m.get("tool_calls") or []
        if native:
            m = dict(m)
            if calls:
                m["tool_calls"] = [{"id": c["id"], "type": "function", "function": {
                    "name": c["function"]["name"], "arguments": _args_object(c["function"]["arguments"])}}
                    for c in calls]
            if m.get("content") is None:
                m["content"] = ""
            out.append(m)
            continue
        content = m.get("content") or ""
        if calls:
            listed = [{"name": c["function"]["name"], "arguments": _args_object(c["function"]["arguments"])}
                      for c in calls]
            content = (content + "\n" if content else "") + f"<tool_call>{json.dumps(listed)}</tool_call>"
        out.append({"role": m["role"], "content": content})
    if tools and not native:
        text = SYSTEM.format(tools=json.dumps(tools))
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + text}
        else:
            out.insert(0, {"role": "system", "content": text})
    return out


def _args_object(arguments: str):
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments


# ---- reading calls back ------------------------------------------------------------------------------
_STRING_END = re.compile(r'[^"\\]*(?:\\.[^"\\]*)*"', re.S)  # a string's rest after its opening quote
_STRUCTURE = re.compile(r'["{}\[\]]')  # what a nested value's depth can change at


def _skip_string(s: str, i: int) -> int | None:
    """s[i] is '"': the index after the closing quote, or None if the string is not closed yet.
    (Regular expressions walk the text: a streamed call's text is scanned again at every delta.)"""
    m = _STRING_END.match(s, i + 1)
    return m.end() if m else None


def _skip_value(s: str, i: int) -> int | None:
    """The end of the JSON value at s[i] (whitespace skipped before it), or None if it is not complete."""
    n = len(s)
    while i < n and s[i] in " \t\r\n":
        i += 1
    if i >= n:
        return None
    c = s[i]
    if c == '"':
        return _skip_string(s, i)
    if c in "{[":
        depth = 0
        while True:
            m = _STRUCTURE.search(s, i)
            if m is None:
                return None
            i = m.start()
            c = s[i]
            if c == '"':
                j = _skip_string(s, i)
                if j is None:
                    return None
                i = j
                continue
            depth += 1 if c in "{[" else -1
            if depth == 0:
                return i + 1
            i += 1
    j = i
    while j < n and s[j] not in ",}] \t\r\n":
        j += 1
    return j if j < n else None  # a number or literal may go on until something follows it


def _depth(text: str, state) -> tuple[int, bool, bool]:
    """The nesting of an object or array value after `text` more of it: (depth, in a string, the next
    character escaped), from `state` (None: its start). Depth 0 after its first bracket: it closed."""
    depth, in_str, esc = state or (0, False, False)
    escaped_at = 0 if esc else -1  # the one position a backslash escapes
    for m in _TOKEN.finditer(text):
        p, c = m.start(), m.group()
        if in_str:
            if p == escaped_at:
                continue
            if c == "\\":
                escaped_at = p + 1
            elif c == '"':
                in_str = False
        elif c == '"':
            in_str = True
        elif c in "{[":
            depth += 1
        elif c in "}]":
            depth -= 1
            if depth == 0:
                return (0, False, False)
    return (depth, in_str, escaped_at == len(text))


_TOKEN = re.compile(r'["\\{}\[\]]')


@dataclass
class _Call:
    name: str | None
    args: str  # the arguments' JSON text so far
    done: bool  # the call object is complete
    start: int
    end: int | None
    args_at: int | None = None  # where an object or array argument value starts, while it is open


def _scan_object(s: str, i: int, args_key: str) -> _Call:
    """A call object starting at s[i] == '{', read as far as it goes."""
    call = _Call(None, "", False, i, None)
    n = len(s)
    j = i + 1
    while True:
        while j < n and s[j] in " \t\r\n,":
            j += 1
        if j >= n:
            return call
        if s[j] == "}":
            call.done, call.end = True, j + 1
            return call
        if s[j] != '"':
            return call  # not JSON as expected: stop here
        k = _skip_string(s, j)
        if k is None:
            return call
        try:
            key = json.loads(s[j:k])
        except ValueError:
            return call
        while k < n and s[k] in " \t\r\n":
            k += 1
        if k >= n or s[k] != ":":
            return call
        k += 1
        while k < n and s[k] in " \t\r\n":
            k += 1
        end = _skip_value(s, k)
        if key == "name":
            if end is not None:
                try:
                    name = json.loads(s[k:end])
                except ValueError:
                    return call
                call.name = name if isinstance(name, str) else None
        elif key in (args_key, "arguments", "parameters"):
            raw = s[k:end] if end is not None else s[k:]
            if raw.startswith('"'):  # arguments given as a JSON string: its text, once complete
                call.args = _args_text(raw) if end is not None else ""
            else:
                call.args = raw
                if end is None and raw[:1] in ("{", "["):
                    call.args_at = k
        if end is None:
            return call
        j = end


def _args_text(raw: str) -> str:
    try:
        v = json.loads(raw)
    except ValueError:
        return raw
    return v if isinstance(v, str) else json.dumps(v)


def scan(region: str, args_key: str, i: int = 0) -> list[_Call]:
    """The call objects in the text after the format's start marker (from `i` on), complete or not:
    each top-level JSON object in turn, whatever separates them (list brackets, commas, tags, newlines)."""
    calls = []
    while True:
        i = region.find("{", i)
        if i == -1:
            return calls
        c = _scan_object(region, i, args_key)
        calls.append(c)
        if not c.done:
            return calls
        i = c.end


def new_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _calls_json(calls: list[_Call]) -> list[dict]:
    return [{"id": new_id(), "type": "function", "function": {"name": c.name, "arguments": c.args or "{}"}}
            for c in calls]


def _region_start(fmt: ToolFormat, text: str) -> int | None:
    """Where the calls' text starts (after the marker), or None when the output has none."""
    if fmt.start:
        k = text.find(fmt.start)
        return None if k == -1 else k + len(fmt.start)
    stripped = text.lstrip()
    if stripped.startswith("<|python_tag|>"):
        return len(text) - len(stripped) + len("<|python_tag|>")
    return len(text) - len(stripped) if stripped.startswith("{") else None


def _valid(c: _Call, names: set[str] | None) -> bool:
    if not c.done or c.name is None or (names is not None and c.name not in names):
        return False
    try:
        return isinstance(json.loads(c.args or "{}"), dict)
    except ValueError:
        return False


def parse(fmt: ToolFormat, text: str, names: set[str] | None = None) -> tuple[str | None, list[dict]]:
    """A whole output as (content, tool calls): the calls when every call object in it is complete and
    names a known function with object arguments; otherwise the text is all content."""
    k = _region_start(fmt, text)
    if k is None:
        return text, []
    calls = scan(text[k:], fmt.args_key)
    if not calls or not all(_valid(c, names) for c in calls):
        return text, []
    content = text[:k - len(fmt.start)] if fmt.start else ""
    return (content.strip() or None), _calls_json(calls)


class ToolStream:
    """One streamed choice: its text deltas in, (content delta, OpenAI tool_call deltas) out.

    Text that may be the start of the format's marker is held back until it is told apart. After the
    marker, each call's `id`/`name` go out once the name is complete, then its arguments' text as it
    grows. If the output ends without a readable call, what was held goes out as content."""

    def __init__(self, fmt: ToolFormat, names: set[str] | None = None):
        self.fmt, self.names = fmt, names
        self.text = ""
        self.emitted = 0  # characters of text sent as content
        self.region: int | None = None  # where the calls' text starts
        self.sent: list[list] = []  # per call: [id, name, arguments sent]
        self.done_calls = 0  # calls complete and sent in full
        self.scan_from = 0  # where in the region the first call not complete starts
        self._open: tuple[int, int, tuple] | None = None  # (call, where its open arguments start, depth)

    @property
    def calls(self) -> int:
        return len(self.sent)

    def feed(self, delta: str, final: bool = False) -> tuple[str, list[dict]]:
        self.text += delta
        if self.region is None:
            self.region = _region_start(self.fmt, self.text)
            if self.region is None:
                upto = len(self.text) if final else len(self.text) - self._held()
                out, self.emitted = self.text[self.emitted:upto], max(self.emitted, upto)
                return out, []
        content = ""
        marker_at = self.region - len(self.fmt.start) if self.fmt.start else self.region
        if marker_at > self.emitted:
            content, self.emitted = self.text[self.emitted:marker_at].rstrip() if not self.sent else "", marker_at
        deltas = []
        if self._open is not None:  # a call's arguments are still open: follow only the new text
            idx, at, depth = self._open
            depth = _depth(delta, depth)
            if depth[0] > 0:
                self._open = (idx, at, depth)
                args = self.text[self.region + at:]
                sent = self.sent[idx][2]
                if len(args) > sent:
                    deltas.append({"index": idx, "function": {"arguments": args[sent:]}})
                    self.sent[idx][2] = len(args)
                return content, deltas
            self._open = None  # closed: read the call whole once more
        found = scan(self.text[self.region:], self.fmt.args_key, self.scan_from)
        for idx, c in enumerate(found, start=self.done_calls):
            if c.name is None or (self.names is not None and c.name not in self.names):
                break
            if idx == len(self.sent):
                self.sent.append([new_id(), c.name, 0])
                deltas.append({"index": idx, "id": self.sent[idx][0], "type": "function",
                               "function": {"name": c.name, "arguments": ""}})
            args = c.args if c.done or not c.args.startswith('"') else ""
            if c.done and not args:
                args = "{}"
            sent = self.sent[idx][2]
            if len(args) > sent:
                deltas.append({"index": idx, "function": {"arguments": args[sent:]}})
                self.sent[idx][2] = len(args)
            if c.done:  # never read again
                self.done_calls, self.scan_from = idx + 1, c.end
            elif c.args_at is not None and not final:
                self._open = (idx, c.args_at, _depth(self.text[self.region + c.args_at:], None))
        if final and not self.sent:  # no call could be read: it was text after all
            content += self.text[self.emitted:]
            self.emitted = len(self.text)
        return content, deltas

    def _held(self) -> int:
        """Trailing characters that could still begin the marker."""
        if not self.fmt.start:  # llama3: a call starts the output; hold it all until its first character
            stripped = self.text.lstrip()
            if not stripped or (self.emitted == 0 and "<|python_tag|>".startswith(stripped[:14])):
                return len(self.text) - self.emitted
            return 0
        m = self.fmt.start
        for n in range(min(len(m) - 1, len(self.text)), 0, -1):
            if self.text.endswith(m[:n]):
                return n
        return 0
