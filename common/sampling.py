"""A request's sampling parameters as they travel: in a PrefillRequest (requester -> P) and in a
Handoff (P -> D). Torch-free.

The fields, names and defaults are engine.sampling_params.SamplingParams' (tests/unit/test_sampling_spec.py
holds them equal). The types are checked when a message decodes; the bounds are not: the worker builds
a SamplingParams from the spec, which checks them, and an invalid one is answered with an error chunk.
Requests that come through the gateway are valid already (gateway/openai_schema.py's bounds lie within
the engine's)."""

from __future__ import annotations

import msgspec


class SamplingSpec(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    n: int = 1
    max_tokens: int | None = 16  # None: up to the context length
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = []
    stop_token_ids: list[int] = []
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None  # None: none; 0: the chosen token only; k: plus top-k alternatives
    skip_special_tokens: bool = True
    logit_bias: dict[int, float] = {}  # token id -> added to its logit
    guided: str | None = None  # an llguidance grammar (engine/grammar.py) the output must follow
    guided_start: int = 0  # trailing prompt tokens that are earlier output under `guided` (a resumed request)
    prompt_logprobs: int | None = None  # None: none; k: each prompt token's logprob (but the first's) and top-k
