"""Tokenizer (`tokenizers`), chat templates (jinja2, sandboxed) and incremental detokenization."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from engine.errors import InvalidRequestError, ModelConfigError


def _token_content(tok) -> str | None:
    if isinstance(tok, dict):
        return tok.get("content")
    return tok


class Tokenizer:
    def __init__(self, model_dir: str | Path):
        from tokenizers import Tokenizer as HFTokenizer

        model_dir = Path(model_dir)
        tj = model_dir / "tokenizer.json"
        if not tj.is_file():
            raise ModelConfigError(f"{tj}: missing (tandem reads the fast-tokenizer file tokenizer.json)")
        try:
            self._tok = HFTokenizer.from_file(str(tj))
        except Exception as e:  # tokenizers raises plain Exception subclasses
            raise ModelConfigError(f"{tj}: cannot be read ({e})") from None
        cfg = {}
        tc = model_dir / "tokenizer_config.json"
        if tc.is_file():
            try:
                cfg = json.loads(tc.read_text())
            except json.JSONDecodeError as e:
                raise ModelConfigError(f"{tc}: not valid JSON ({e})") from None
        self.chat_template: str | None = cfg.get("chat_template")
        if isinstance(self.chat_template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in self.chat_template}
            self.chat_template = named.get("default") or next(iter(named.values()), None)
        ct = model_dir / "chat_template.jinja"
        if self.chat_template is None and ct.is_file():
            self.chat_template = ct.read_text()
        self.bos_token = _token_content(cfg.get("bos_token"))
        self.eos_token = _token_content(cfg.get("eos_token"))
        self.add_bos_token = bool(cfg.get("add_bos_token", False))
        self.bos_token_id = self._tok.token_to_id(self.bos_token) if self.bos_token else None
        self.eos_token_id = self._tok.token_to_id(self.eos_token) if self.eos_token else None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self._template = None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self.add_bos_token and self.bos_token_id is not None \
                and (not ids or ids[0] != self.bos_token_id):
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(i)

    def token_to_id(self, t: str) -> int | None:
        return self._tok.token_to_id(t)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None) -> str:
        """`tools`: OpenAI's tool objects, for a template that renders them (Hugging Face's convention)."""
        if not self.chat_template:
            raise InvalidRequestError("this model has no chat template; use the completions API",
                                      param="messages")
        if not isinstance(messages, list) or not messages:
            raise InvalidRequestError("messages must be a non-empty list", param="messages")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise InvalidRequestError(f"messages[{i}] must be an object with a string 'role'",
                                          param=f"messages[{i}]")
        if self._template is None:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = _raise_template_error
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            self._template = env.from_string(self.chat_template)
        try:
            extra = {"tools": tools} if tools else {}
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         bos_token=self.bos_token or "", eos_token=self.eos_token or "", **extra)
        except InvalidRequestError:
            raise
        except Exception as e:  # a template error is the request's fault (bad roles, order)
            raise InvalidRequestError(f"chat template failed: {e}", param="messages") from None


def eos_token_ids(model_cfg, model_dir) -> tuple[int, ...]:
    """The ids that end generation: the config's (generation_config.json or config.json), else the
    tokenizer's eos token."""
    if model_cfg.eos_token_ids:
        return tuple(model_cfg.eos_token_ids)
    tok = Tokenizer(model_dir)
    return (tok.eos_token_id,) if tok.eos_token_id is not None else ()


def _raise_template_error(msg: str):
    raise InvalidRequestError(f"chat template: {msg}", param="messages")


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas that never split a UTF-8 character.

    Decodes a short window (`prefix_offset`..end) and emits only what extends the window's text
    already emitted; a window ending in U+FFFD (an incomplete byte sequence) waits for more tokens.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], skip_special_tokens: bool = True,
                 held: int = 0):
        """`held`: trailing prompt tokens whose text was never emitted (a request resumed elsewhere
        mid-character, e.g. after a migration): it comes out with the first new token's text."""
        self.tok = tokenizer
        self.skip = skip_special_tokens
        held = max(0, min(held, len(prompt_ids)))
        self.ids = list(prompt_ids[-(6 + held):])  # context so leading spaces decode as they will in place
        self.prefix_offset = 0
        self.read_offset = len(self.ids) - held
        self.text = ""

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix = self.tok.decode(self.ids[self.prefix_offset:self.read_offset], self.skip)
        full = self.tok.decode(self.ids[self.prefix_offset:], self.skip)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            delta = full[len(prefix):]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            self.text += delta
            return delta
        return ""
