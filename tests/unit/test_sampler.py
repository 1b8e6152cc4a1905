import math

import torch

from engine.sampler import Sampler, SamplingRow
from engine.sampling_params import SamplingParams


def row(tokens=(1, 2), n_prompt=2, gen=None, **kw):
    return SamplingRow(SamplingParams(**kw), list(tokens), n_prompt, gen)


def test_greedy_is_argmax_and_logprobs_are_raw():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    toks, lps = Sampler()(logits, [row(temperature=0, logprobs=2)])
    assert toks == [1]
    ref = torch.log_softmax(logits[0], -1)
    assert math.isclose(lps[0].logprob, float(ref[1]), abs_tol=1e-6)
    assert [t for t, _ in lps[0].top] == [1, 3]


def test_top_k_one_and_tiny_top_p_reduce_to_greedy():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    best = logits.argmax(-1).tolist()
    s = Sampler(seed=1)
    assert s(logits, [row(temperature=1.0, top_k=1) for _ in range(4)])[0] == best
    assert s(logits, [row(temperature=1.0, top_p=1e-6) for _ in range(4)])[0] == best
    assert s(logits, [row(temperature=1.0, min_p=1.0) for _ in range(4)])[0] == best


def test_top_k_restricts_the_support():
    logits = torch.tensor([[5.0, 4.9, 4.8, -1.0, -2.0, -3.0]])
    s = Sampler(seed=3)
    seen = {s(logits, [row(temperature=5.0, top_k=3)])[0][0] for _ in range(200)}
    assert seen == {0, 1, 2}


def test_top_p_keeps_the_smallest_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    s = Sampler(seed=3)
    seen = {s(logits, [row(temperature=1.0, top_p=0.7)])[0][0] for _ in range(300)}
    assert seen == {0, 1}  # 0.5 < 0.7, 0.5 + 0.3 >= 0.7


def test_seeded_rows_are_reproducible_and_independent_of_batch_mates():
    torch.manual_seed(0)
    logits = torch.randn(3, 100)

    def draw(rows_before):
        g = torch.Generator().manual_seed(1234)
        rows = [row(temperature=1.0) for _ in range(rows_before)] + [row(temperature=1.0, gen=g)]
        out = []
        for _ in range(5):
            batch = torch.cat([logits[1:1 + rows_before], logits[:1]])  # the seeded row is last
            toks, _ = Sampler(seed=rows_before)(batch, rows)
            out.append(toks[-1])
        return out

    assert draw(0) == draw(2)


def test_penalties():
    logits = torch.tensor([[2.0, 1.9, -1.0, 0.0]])
    # repetition penalty divides positive logits of seen tokens: token 0 (seen) drops below 1
    toks, _ = Sampler()(logits, [row(tokens=(0, 0), n_prompt=1, temperature=0, repetition_penalty=2.0)])
    assert toks == [1]
    toks, _ = Sampler()(logits, [row(tokens=(3, 0), n_prompt=1, temperature=0, presence_penalty=0.5)])
    assert toks == [1]
    toks, _ = Sampler()(logits, [row(tokens=(3, 0, 0, 0), n_prompt=1, temperature=0, frequency_penalty=0.04)])
    assert toks == [1]  # 2.0 - 3 * 0.04 < 1.9
    toks, _ = Sampler()(logits, [row(tokens=(3, 0), n_prompt=1, temperature=0, frequency_penalty=0.04)])
    assert toks == [0]


def test_min_tokens_bans_eos_and_stop_ids():
    logits = torch.tensor([[0.0, 5.0, 4.0, 1.0]])
    s = Sampler(eos_token_ids=(1,))
    assert s(logits, [row(temperature=0, min_tokens=2)])[0] == [2]
    assert s(logits, [row(temperature=0, min_tokens=2, stop_token_ids=[2])])[0] == [3]
    assert s(logits, [row(tokens=(1, 2, 9, 9), temperature=0, min_tokens=2)])[0] == [1]
