"""Structured-output grammars, torch-free: what a request constrains its output to, as one llguidance
grammar (a JSON document), built from the OpenAI and vLLM request fields and validated with bounded
work. The gateway builds and validates here (so a bad schema is a 400 before any worker sees it);
the workers compile the same text into matchers (engine/guided.py).

    response_format {"type": "json_object"}          -> any JSON object
    response_format {"type": "json_schema", ...}     -> that JSON schema
    guided_json (a schema)                           -> that JSON schema
    guided_regex                                     -> the regex
    guided_choice ["a", "b"]                         -> exactly one of the strings
    guided_grammar                                   -> Lark, or GBNF/EBNF (llama.cpp's), detected

JSON is generated compactly, with Python's separators (", " and ": ", no newlines): a small model
given free whitespace can spend its whole budget on it.

Why llguidance (docs/benchmarks.md, "Grammar engines"): it imports without torch, so the gateway
validates with the engine the workers run; it compiles in milliseconds under explicit limits
(LLParserLimits) where xgrammar precomputes masks for up to hundreds of milliseconds; and it takes
Lark natively.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from threading import Lock

from engine.errors import InvalidRequestError

MAX_GRAMMAR_CHARS = 256 * 1024  # a schema, regex or grammar text
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
ANY_OBJECT = {"type": "object"}

# Bounds on the work one grammar may cost (llguidance's own defaults are 5-10x these): compiling
# (lexer fuel, grammar size) and every mask step (fuel, Earley items). A grammar past them is an
# error, at validation or, for one that only blows up deep into a generation, at that step.
LIMITS = {"initial_lexer_fuel": 200_000, "step_lexer_fuel": 200_000, "step_max_items": 50_000,
          "max_lexer_states": 50_000, "max_grammar_size": 100_000, "max_items_in_row": 2000,
          "verbose_errors": False}


def limits():
    import llguidance

    return llguidance.LLParserLimits(**LIMITS)


def _bad(message: str, param: str) -> InvalidRequestError:
    return InvalidRequestError(message, param=param)


def json_schema(schema, param: str) -> str:
    """A JSON schema (a dict, a bool, or its JSON text) as a grammar."""
    import llguidance

    if isinstance(schema, str):
        _size(schema, param)
        try:
            schema = json.loads(schema)
        except ValueError as e:
            raise _bad(f"the schema is not valid JSON: {e}", param) from None
    if not isinstance(schema, (dict, bool)):
        raise _bad("a JSON schema must be an object (or true/false)", param)
    if isinstance(schema, dict) and "x-guidance" in schema:
        raise _bad("'x-guidance' options are not accepted", param)
    try:
        text = json.dumps(schema)
        _size(text, param)
        return llguidance.LLMatcher.grammar_from_json_schema(text, overrides=JSON_OPTIONS)
    except (ValueError, RecursionError) as e:  # nested too deep, or not JSON at all
        raise _bad(f"invalid JSON schema: {str(e)[:300]}", param) from None


def regex(pattern: str, param: str) -> str:
    import llguidance

    _size(pattern, param)
    return llguidance.LLMatcher.grammar_from_regex(pattern)


def choice(options: list[str], param: str) -> str:
    """Exactly one of `options` (as vLLM's guided_choice)."""
    import llguidance

    if not options:
        raise _bad("at least one choice is needed", param)
    lark = "start: " + " | ".join(json.dumps(o) for o in options)
    _size(lark, param)
    return llguidance.LLMatcher.grammar_from_lark(lark)


def grammar(text: str, param: str) -> str:
    """A Lark grammar, or a GBNF one (llama.cpp's EBNF, `root ::= ...`), told apart by its `::=`."""
    import llguidance

    _size(text, param)
    try:
        return llguidance.grammar_from("grammar", text)
    except ValueError as e:
        raise _bad(f"invalid grammar: {e}", param) from None


def lark(text: str) -> str:
    import llguidance

    return llguidance.LLMatcher.grammar_from_lark(text)


def _size(text: str, param: str) -> None:
    if len(text) > MAX_GRAMMAR_CHARS:
        raise _bad(f"at most {MAX_GRAMMAR_CHARS} characters", param)


class _Checked:
    """Grammars validated already (most requests reuse a handful of schemas): LRU, thread-safe."""

    def __init__(self, size: int = 512):
        self.size = size
        self.seen: OrderedDict[str, str] = OrderedDict()  # grammar -> error ("" when valid)
        self.lock = Lock()

    def __call__(self, grammar_text: str) -> str:
        with self.lock:
            err = self.seen.get(grammar_text)
            if err is not None:
                self.seen.move_to_end(grammar_text)
                return err
        import llguidance

        err = llguidance.LLMatcher.validate_grammar(grammar_text, None, limits=limits())
        with self.lock:
            self.seen[grammar_text] = err
            while len(self.seen) > self.size:
                self.seen.popitem(last=False)
        return err


_checked = _Checked()


def check(grammar_text: str, param: str = "guided") -> str:
    """Validates a grammar (bounded by LIMITS; cached), raising InvalidRequestError naming `param`.
    Returns the grammar."""
    if not isinstance(grammar_text, str) or not grammar_text:
        raise _bad("the grammar must be a non-empty string", param)
    _size(grammar_text, param)
    err = _checked(grammar_text)
    if err:
        raise _bad(f"invalid {_what(param)}: {err.strip()[:500]}", param)
    return grammar_text


def _what(param: str) -> str:
    if "schema" in param or param == "guided_json":
        return "JSON schema"
    if "regex" in param:
        return "regex"
    return "grammar"
