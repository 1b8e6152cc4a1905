"""Per-request sampling parameters, validated at construction (errors name the field).

The checks are the engine's own: what sampling needs to be well defined (finite numbers, temperature
>= 0, top_p in (0, 1], ...), what keeps the logits finite (temperature and the penalties bounded: a huge
or tiny divisor overflows in bf16/fp32 and turns a row into NaN) and what the sampler computes (up to
MAX_LOGPROBS alternatives). Limits of policy (OpenAI's temperature <= 2, n <= 16, at most 16 stop
strings) are the gateway's (gateway/openai_schema.py); they lie within these
(tests/unit/test_sampling_bounds.py), so a request the API accepts makes a valid SamplingParams.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from engine.errors import InvalidRequestError

MAX_LOGPROBS = 20  # alternatives per token the sampler returns


@dataclass
class SamplingParams:
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
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None  # None: none; 0: the chosen token only; k: plus top-k alternatives
    skip_special_tokens: bool = True
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    guided: str | None = None  # an llguidance grammar (engine/grammar.py) the output must follow
    guided_start: int = 0  # trailing prompt tokens that are earlier output under `guided` (a resumed request)
    prompt_logprobs: int | None = None  # None: none; k: each prompt token's logprob (but the first's) and top-k

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop] if self.stop else []  # "": no stop string
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        _check(_is_int(self.n) and self.n >= 1, "n", f"n must be a positive integer, got {self.n!r}")
        _check(self.max_tokens is None or (_is_int(self.max_tokens) and self.max_tokens >= 1), "max_tokens",
               f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        _check(_is_int(self.min_tokens) and self.min_tokens >= 0, "min_tokens",
               f"min_tokens must be a non-negative integer, got {self.min_tokens!r}")
        _check(_is_num(self.temperature) and 0.0 <= self.temperature <= 100.0, "temperature",
               f"temperature must be in [0, 100], got {self.temperature!r}")
        _check(_is_num(self.top_p) and 0.0 < self.top_p <= 1.0, "top_p",
               f"top_p must be in (0, 1], got {self.top_p!r}")
        _check(_is_int(self.top_k) and self.top_k >= 0, "top_k",
               f"top_k must be a non-negative integer (or -1 to disable), got {self.top_k!r}")
        _check(_is_num(self.min_p) and 0.0 <= self.min_p <= 1.0, "min_p",
               f"min_p must be in [0, 1], got {self.min_p!r}")
        _check(_is_num(self.repetition_penalty) and 0.0 < self.repetition_penalty <= 10.0, "repetition_penalty",
               f"repetition_penalty must be in (0, 10], got {self.repetition_penalty!r}")
        _check(_is_num(self.presence_penalty) and -2.0 <= self.presence_penalty <= 2.0, "presence_penalty",
               f"presence_penalty must be in [-2, 2], got {self.presence_penalty!r}")
        _check(_is_num(self.frequency_penalty) and -2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty",
               f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty!r}")
        _check(self.seed is None or _is_int(self.seed), "seed", f"seed must be an integer, got {self.seed!r}")
        _check(all(isinstance(s, str) and s for s in self.stop), "stop", "stop must be non-empty strings")
        _check(all(_is_int(t) and t >= 0 for t in self.stop_token_ids), "stop_token_ids",
               "stop_token_ids must be non-negative integers")
        _check(isinstance(self.logit_bias, dict) and all(
            _is_int(t) and t >= 0 and _is_num(b) and -100.0 <= b <= 100.0 for t, b in self.logit_bias.items()),
            "logit_bias", "logit_bias must map token ids to numbers in [-100, 100]")
        _check(self.guided is None or (isinstance(self.guided, str) and self.guided != ""), "guided",
               "guided must be a grammar (a non-empty string)")
        _check(_is_int(self.guided_start) and self.guided_start >= 0, "guided_start",
               f"guided_start must be a non-negative integer, got {self.guided_start!r}")
        _check(self.logprobs is None or (_is_int(self.logprobs) and 0 <= self.logprobs <= MAX_LOGPROBS),
               "logprobs", f"logprobs must be an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")
        _check(self.prompt_logprobs is None or (_is_int(self.prompt_logprobs)
                                                and 0 <= self.prompt_logprobs <= MAX_LOGPROBS), "prompt_logprobs",
               f"prompt_logprobs must be an integer in [0, {MAX_LOGPROBS}], got {self.prompt_logprobs!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5 or self.top_k == 1

    @property
    def has_penalties(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)

    @property
    def adjusts_logits(self) -> bool:
        """Penalties or a logit bias change this request's logits before sampling."""
        return self.has_penalties or bool(self.logit_bias)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check(ok: bool, param: str, msg: str) -> None:
    if not ok:
        raise InvalidRequestError(msg, param=param)
