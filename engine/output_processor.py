"""OutputProcessor: a step's token ids -> RequestOutputs (text, stop strings, logprobs, finish reasons).

The engine's core (LLMEngine.step_core) schedules, runs the model and advances the scheduler; what it
hands on is a CoreStep: the requests added and aborted since the last one, then one SeqUpdate per
scheduled sequence (its new token, logprobs, the scheduler's finish: eos, stop token, length). This
class turns those into the deltas a client sees, as vLLM v1's output processor does:

    CoreStep --process()--> events applied in order (add: a detokenizer seeded with the prompt;
                            abort: state dropped), then per update: prompt logprobs stored, the token
                            detokenized, stop strings searched, the text cut at a hit
             --> RequestOutputs (held-back text for a stop string still forming) + StopHits

A stop string is found here, not in the scheduler: a StopHit tells the core to finish that sequence
(LLMEngine.report_stop). Inline (LLMEngine.step) that happens before the next schedule(); on a worker's
output thread the core may already have computed one more token for it, which arrives here for a
sequence already finished and is dropped, so the client sees the same stream either way.

Only the thread calling process() touches this object; it reads no Sequence (the core's), only the
plain values in CoreStep.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from engine.sampling_params import SamplingParams
from engine.tokenizer import IncrementalDetokenizer

if TYPE_CHECKING:
    from engine.sampler import PromptLogprobs, TokenLogprobs
    from engine.tokenizer import Tokenizer


@dataclass
class CompletionOutput:
    index: int
    text: str  # new text since the last output of this sequence
    token_ids: list[int]  # new token ids since the last output
    logprobs: list[TokenLogprobs] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0  # prompt tokens the prefix cache held at admission (OpenAI's cached_tokens)
    # SamplingParams.prompt_logprobs: one per prompt token (the first's None), on the output that carries
    # sample 0's first token; None on every other
    prompt_logprobs: list[TokenLogprobs | None] | None = None


# ---- what the core hands on -----------------------------------------------------------------------
@dataclass
class RequestAdded:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    seq_ids: list[int]  # by sample index
    held_tokens: int = 0  # a resumed request: trailing prompt tokens whose text was never decoded
    held_text: str = ""  # a resumed request: text decoded earlier but not emitted
    first_token: int | None = None  # prefilled elsewhere: that token was sampled and reported there


@dataclass
class RequestAborted:
    request_id: str


@dataclass
class SeqUpdate:
    """One scheduled sequence's part of a step."""
    seq_id: int
    request_id: str
    # drawn in this step: one, more with speculation, none for a prompt chunk that samples nothing
    token_ids: list[int]
    logprobs: list[TokenLogprobs] | None = None  # of each of them
    prompt_logprobs: PromptLogprobs | None = None
    finish_reason: str | None = None  # the scheduler's: "stop" (eos, stop token) | "length"
    stop_reason: int | None = None  # the eos or stop token id
    num_cached_tokens: int = 0


@dataclass
class CoreStep:
    events: list[RequestAdded | RequestAborted] = field(default_factory=list)  # before the updates
    updates: list[SeqUpdate] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)  # requests the core finished (worker bookkeeping)


@dataclass
class StopHit:
    """A stop string ended a sequence: the core must finish it (FINISHED_STOPPED)."""
    seq_id: int
    stop: str


# ---- the processor --------------------------------------------------------------------------------
@dataclass
class _Seq:
    index: int
    detok: IncrementalDetokenizer
    text: str = ""  # full (possibly truncated at a stop string) text
    emitted_chars: int = 0
    emitted_tokens: int = 0
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0
    # by prompt position, as the steps computing the prompt score them (a recomputation writes over)
    prompt_logprobs: list[TokenLogprobs | None] | None = None


@dataclass
class _Request:
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[_Seq]


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._requests: dict[str, _Request] = {}
        self._seqs: dict[int, tuple[_Request, _Seq]] = {}  # unfinished sequences, by seq_id

    @property
    def num_requests(self) -> int:
        return len(self._requests)

    def add(self, ev: RequestAdded) -> None:
        p = ev.params
        req = _Request(ev.prompt_token_ids, p, [])
        for i, seq_id in enumerate(ev.seq_ids):
            st = _Seq(i, IncrementalDetokenizer(self.tokenizer, ev.prompt_token_ids, p.skip_special_tokens,
                                                ev.held_tokens), text=ev.held_text)
            if ev.first_token is not None:
                st.detok.add(ev.first_token)  # its text is in what the prefill worker emitted plus held_text
                st.emitted_tokens = 1
            elif p.prompt_logprobs is not None and i == 0:  # the first sample reports them
                st.prompt_logprobs = [None] * len(ev.prompt_token_ids)
            req.seqs.append(st)
            self._seqs[seq_id] = (req, st)
        self._requests[ev.request_id] = req

    def abort(self, request_id: str) -> None:
        req = self._requests.pop(request_id, None)
        if req is not None:
            for seq_id in [k for k, (r, _) in self._seqs.items() if r is req]:
                del self._seqs[seq_id]

    def process(self, step: CoreStep) -> tuple[list[RequestOutput], list[StopHit]]:
        for ev in step.events:
            if isinstance(ev, RequestAdded):
                self.add(ev)
            else:
                self.abort(ev.request_id)
        stops: list[StopHit] = []
        touched: dict[str, list[tuple[_Seq, list[int]]]] = {}
        for u in step.updates:
            entry = self._seqs.get(u.seq_id)
            if entry is None:  # aborted, or finished (a token computed after its stop string: dropped)
                continue
            req, st = entry
            st.num_cached_tokens = u.num_cached_tokens
            plp = u.prompt_logprobs
            if plp is not None and st.prompt_logprobs is not None:
                st.prompt_logprobs[plp.start:plp.start + len(plp.logprobs)] = plp.logprobs
            if not u.token_ids:
                continue
            tokens = []
            for n, token in enumerate(u.token_ids):
                tokens.append(token)
                if u.logprobs is not None:
                    st.logprobs.append(u.logprobs[n])
                if n == len(u.token_ids) - 1 and u.finish_reason is not None:
                    st.finish_reason, st.stop_reason = u.finish_reason, u.stop_reason
                hit = self._detokenize(req.params, st, token)
                if hit is not None:  # the tokens after it in this step are dropped
                    stops.append(StopHit(u.seq_id, hit))
                    break
            if st.finish_reason is not None:
                del self._seqs[u.seq_id]
            touched.setdefault(u.request_id, []).append((st, tokens))
        return [self._output(rid, sts) for rid, sts in touched.items()], stops

    def _detokenize(self, params: SamplingParams, st: _Seq, token: int) -> str | None:
        """Adds `token`'s text; a stop string in it (searched across the previous text too) finishes
        the sequence there: returns that stop string."""
        delta = st.detok.add(token)
        st.text += delta
        stops = params.stop
        if not (stops and delta and st.finish_reason is None):
            return None
        search_from = max(0, len(st.text) - len(delta) - max(map(len, stops)) + 1)
        hit = None
        for s in stops:
            k = st.text.find(s, search_from)
            if k != -1 and (hit is None or k < hit[0]):
                hit = (k, s)
        if hit is None:
            return None
        k, s = hit
        st.text = st.text[:k + len(s)] if params.include_stop_str_in_output else st.text[:k]
        st.finish_reason, st.stop_reason = "stop", s
        return s

    def _output(self, request_id: str, touched: list[tuple[_Seq, list[int]]]) -> RequestOutput:
        req = self._requests[request_id]
        params = req.params
        outs = []
        prompt_lps = None
        for st, tokens in touched:
            if st.prompt_logprobs is not None and st.emitted_tokens == 0:  # its first token goes out now
                prompt_lps, st.prompt_logprobs = st.prompt_logprobs, None
            done = st.finish_reason is not None
            # text a stop string could still start with waits for the next tokens
            hold = 0 if done or not params.stop else max(map(len, params.stop)) - 1
            upto = max(st.emitted_chars, len(st.text) - hold)
            text = st.text[st.emitted_chars:upto]
            st.emitted_chars = upto
            st.emitted_tokens += len(tokens)
            lps = None
            if params.logprobs is not None:
                lps, st.logprobs = st.logprobs, []
            outs.append(CompletionOutput(st.index, text, tokens, lps, st.finish_reason, st.stop_reason))
        finished = all(st.finish_reason is not None for st in req.seqs)
        if finished:
            del self._requests[request_id]
        cached = max((st.num_cached_tokens for st in req.seqs), default=0)
        return RequestOutput(request_id, req.prompt_token_ids, outs, finished, cached, prompt_lps)
