"""Batched sampling: grammar masks, logit bias, penalties, temperature, top-k / top-p / min-p,
per-request seeds, logprobs.

Logprobs are those of the model's raw distribution (before penalties and temperature), like vLLM's
default. Random draws use the exponential-race trick (argmax of p / Exp(1) noise), with the noise of
a seeded request drawn from its own generator, so its samples do not depend on its batch-mates.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.sampling_params import SamplingParams


@dataclass
class SamplingRow:
    params: SamplingParams
    token_ids: list[int]  # prompt + output so far
    num_prompt_tokens: int
    generator: torch.Generator | None  # None: the sampler's shared generator


@dataclass
class TokenLogprobs:
    logprob: float  # of the chosen token
    top: list[tuple[int, float]]  # (token id, logprob), best first; empty unless asked for


@dataclass
class PromptLogprobs:
    """Logprobs of a run of prompt tokens, each under the logits of the position before it."""
    start: int  # prompt index of logprobs[0] (>= 1: the first prompt token has none)
    logprobs: list[TokenLogprobs]


def token_logprobs(logprobs: torch.Tensor, tokens: torch.Tensor, ks: list[int | None]) -> list[TokenLogprobs | None]:
    """logprobs [N, V] (log_softmax of raw logits), tokens [N] -> each row's TokenLogprobs of its token,
    with its top-k alternatives (k = ks[i]; None: no logprobs for that row)."""
    kmax = max((k or 0) for k in ks)
    top_v, top_i = logprobs.topk(kmax, dim=-1) if kmax else (None, None)
    chosen = logprobs.gather(1, tokens.view(-1, 1)).squeeze(1).tolist()
    out: list[TokenLogprobs | None] = []
    for i, k in enumerate(ks):
        if k is None:
            out.append(None)
            continue
        top = list(zip(top_i[i, :k].tolist(), top_v[i, :k].tolist())) if k else []
        out.append(TokenLogprobs(chosen[i], top))
    return out


class Sampler:
    def __init__(self, eos_token_ids: tuple[int, ...] = (), seed: int = 0, device="cpu"):
        self.eos_token_ids = list(eos_token_ids)
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow], mask=None):
        """logits [N, V] -> (token ids [N] as a list, per-row TokenLogprobs or None). `mask(logits)`:
        sets what guided rows may not sample to -inf, in place (engine/guided.py)."""
        src, logits = logits, logits.float()
        n = logits.shape[0]
        want_lp = [r.params.logprobs is not None for r in rows]
        raw_lp = torch.log_softmax(logits, dim=-1) if any(want_lp) else None
        if mask is not None:
            if logits is src:
                logits = logits.clone()  # .float() made no copy: the caller's tensor stays as it was
            mask(logits)

        logits = self._apply_penalties_and_bans(logits, rows)
        greedy = [r.params.greedy for r in rows]
        tokens = logits.max(dim=-1).indices  # the first maximum, as argmax; 2.5x faster on CPU over 49k logits
        if not all(greedy):
            rand = [i for i, g in enumerate(greedy) if not g]
            sub = logits[rand]
            probs = self._filtered_probs(sub, [rows[i].params for i in rand])
            noise = torch.empty_like(probs)
            for j, i in enumerate(rand):
                noise[j].exponential_(generator=rows[i].generator or self.generator)
            tokens[rand] = (probs / noise).max(dim=-1).indices
        token_list = tokens.tolist()

        lps: list[TokenLogprobs | None] = [None] * n
        if raw_lp is not None:
            lps = token_logprobs(raw_lp, tokens, [r.params.logprobs for r in rows])
        return token_list, lps

    def _apply_penalties_and_bans(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        cloned = False
        for i, r in enumerate(rows):
            p = r.params
            n_out = len(r.token_ids) - r.num_prompt_tokens
            ban = n_out < p.min_tokens
            if not (p.adjusts_logits or ban):
                continue
            if not cloned:
                logits, cloned = logits.clone(), True
            row = logits[i]
            if p.logit_bias:
                ids = torch.tensor(list(p.logit_bias), dtype=torch.long, device=row.device)
                row[ids] += torch.tensor(list(p.logit_bias.values()), dtype=row.dtype, device=row.device)
            if p.has_penalties:
                out_ids = torch.tensor(r.token_ids[r.num_prompt_tokens:], dtype=torch.long, device=row.device)
                if p.repetition_penalty != 1.0:
                    seen = torch.tensor(sorted(set(r.token_ids)), dtype=torch.long, device=row.device)
                    vals = row[seen]
                    row[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
                if out_ids.numel() and (p.presence_penalty or p.frequency_penalty):
                    counts = torch.bincount(out_ids, minlength=row.shape[0]).to(row.dtype)
                    row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)
            if ban:
                stop_ids = ([] if p.ignore_eos else self.eos_token_ids) + p.stop_token_ids
                if stop_ids:
                    kept = row[stop_ids].clone()
                    row[stop_ids] = float("-inf")
                    if p.guided and bool((row == float("-inf")).all()):  # its grammar allows only the end
                        row[stop_ids] = kept
        return logits

    @staticmethod
    def _filtered_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
        temps = torch.tensor([p.temperature for p in params], dtype=logits.dtype,
                             device=logits.device).unsqueeze(1)
        logits = logits / temps
        if any(p.top_k > 0 or p.top_p < 1.0 for p in params):
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            vocab = logits.shape[-1]
            ks = torch.tensor([p.top_k if p.top_k > 0 else vocab for p in params], device=logits.device)
            pos = torch.arange(vocab, device=logits.device).unsqueeze(0)
            drop = pos >= ks.unsqueeze(1)
            top_ps = torch.tensor([p.top_p for p in params], dtype=logits.dtype, device=logits.device)
            sorted_probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
            before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass strictly before each token
            drop |= before > top_ps.unsqueeze(1)
            drop[:, 0] = False  # always keep the best token
            logits = torch.full_like(logits, float("-inf")).scatter(1, order,
                                                                    sorted_logits.masked_fill(drop, float("-inf")))
        probs = logits.softmax(dim=-1)
        if any(p.min_p > 0 for p in params):
            min_ps = torch.tensor([p.min_p for p in params], dtype=probs.dtype, device=probs.device)
            thresh = probs.max(dim=-1, keepdim=True).values * min_ps.unsqueeze(1)
            probs = probs.masked_fill(probs < thresh, 0.0)
        return probs
