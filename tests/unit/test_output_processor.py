"""OutputProcessor on fake token streams: no model, no tokenizer files."""

import random

from engine.output_processor import CoreStep, OutputProcessor, RequestAborted, RequestAdded, SeqUpdate, StopHit
from engine.sampler import PromptLogprobs, TokenLogprobs
from engine.sampling_params import SamplingParams

PIECES = ["<s>", "Hel", "lo", " wor", "ld", "!", " S", "TOP", "\n", "ab", "c", " ", "x", "yz", "é"]


class PieceTokenizer:
    """Token i is PIECES[i]; id 0 is special."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(PIECES[i] for i in ids if not (skip_special_tokens and i == 0))


def tokens(*pieces):
    return [PIECES.index(p) for p in pieces]


def run(params, stream, prompt=(1,), held_text="", first_token=None):
    """Feeds `stream` one token per step, then the special token 0 (no text), which the scheduler
    finishes ("length"); what follows a stop string is dropped. Returns (outputs, stop hits)."""
    proc = OutputProcessor(PieceTokenizer())
    events = [RequestAdded("r", list(prompt), params, [7], held_text=held_text, first_token=first_token)]
    outs, hits = [], []
    for t in stream:
        o, h = proc.process(CoreStep(events, [SeqUpdate(7, "r", [t])]))
        events = []
        outs += o
        hits += h
    o, h = proc.process(CoreStep([], [SeqUpdate(7, "r", [0], finish_reason="length")]))
    assert proc.num_requests == 0
    return outs + o, hits + h


def joined(outs, index=0):
    cos = [co for ro in outs for co in ro.outputs if co.index == index]
    return "".join(co.text for co in cos), [t for co in cos for t in co.token_ids], cos[-1]


def test_a_stop_string_across_tokens_cuts_the_text_and_drops_later_tokens():
    stream = tokens("Hel", "lo", " wor", "ld", "!", "!")
    outs, hits = run(SamplingParams(stop=["o w"]), stream)
    text, ids, last = joined(outs)
    assert text == "Hell" and ids == stream[:3]  # the token that completed the stop is reported
    assert (last.finish_reason, last.stop_reason) == ("stop", "o w")
    assert hits == [StopHit(7, "o w")]
    assert outs[-1].finished and len(outs) == 3  # what the core computed after the stop: dropped


def test_include_stop_str_in_output():
    outs, _ = run(SamplingParams(stop=["o w"], include_stop_str_in_output=True), tokens("Hel", "lo", " wor", "ld"))
    assert joined(outs)[0] == "Hello w"


def test_text_a_stop_string_could_start_with_is_held_back():
    outs, hits = run(SamplingParams(stop=["STOPPED"]), tokens("Hel", "lo", " S", "TOP", "!"))
    texts = [ro.outputs[0].text for ro in outs]
    # the last 6 characters (len("STOPPED") - 1) wait; the rest comes out with the finish
    assert texts == ["", "", "H", "ell", "o", " STOP!"] and not hits
    assert outs[-1].outputs[0].finish_reason == "length"


def test_a_resumed_request_emits_held_text_and_matches_a_stop_across_it():
    outs, hits = run(SamplingParams(stop=["lo w"]), tokens(" wor", "ld"), held_text="Hello")
    assert joined(outs)[0] == "Hel" and hits == [StopHit(7, "lo w")]
    outs, hits = run(SamplingParams(stop=["zz"]), tokens(" wor", "ld"), held_text="Hel")
    assert joined(outs)[0] == "Hel world" and not hits
    assert joined(outs)[1] == tokens(" wor", "ld", "<s>")


def test_a_prefilled_request_continues_after_its_first_token():
    # the prefill worker reported the token "Hel" but held its text back (a stop could start there)
    outs, hits = run(SamplingParams(stop=["lo w"]), tokens("lo", " wor", "ld"), held_text="Hel",
                     first_token=tokens("Hel")[0])
    assert joined(outs)[:2] == ("Hel", tokens("lo", " wor")) and hits == [StopHit(7, "lo w")]


def test_n_samples_finish_separately_and_the_request_once():
    proc = OutputProcessor(PieceTokenizer())
    p = SamplingParams(n=2, stop=["ld"])
    add = RequestAdded("r", [1], p, [10, 11])
    a, b = tokens("Hel", "ld"), tokens("ab", "c")
    o1, _ = proc.process(CoreStep([add], [SeqUpdate(10, "r", [a[0]]), SeqUpdate(11, "r", [b[0]])]))
    o2, h2 = proc.process(CoreStep([], [SeqUpdate(10, "r", [a[1]]), SeqUpdate(11, "r", [b[1]])]))
    assert h2 == [StopHit(10, "ld")] and not o2[0].finished
    assert [(co.index, co.finish_reason) for co in o2[0].outputs] == [(0, "stop"), (1, None)]
    o3, _ = proc.process(CoreStep([], [SeqUpdate(10, "r", [a[1]]), SeqUpdate(11, "r", [tokens("x")[0]],
                                                                            finish_reason="length")]))
    assert [co.index for co in o3[0].outputs] == [1] and o3[0].finished  # sample 0's late token dropped
    assert joined(o1 + o2 + o3, 0)[0] == "Hel" and joined(o1 + o2 + o3, 1)[0] == "abcx"
    assert proc.num_requests == 0


def test_logprobs_and_prompt_logprobs_go_out_with_their_tokens():
    proc = OutputProcessor(PieceTokenizer())
    p = SamplingParams(logprobs=1, prompt_logprobs=1)
    lp = [TokenLogprobs(-0.5 * i, [(i, -0.5 * i)]) for i in range(4)]
    plp = PromptLogprobs(1, [lp[0], lp[1]])
    add = RequestAdded("r", [1, 2, 3], p, [5])
    o1, _ = proc.process(CoreStep([add], [SeqUpdate(5, "r", [], prompt_logprobs=PromptLogprobs(1, [lp[0]]))]))
    assert o1 == []  # a prompt chunk that samples nothing: no output yet
    o2, _ = proc.process(CoreStep([], [SeqUpdate(5, "r", [4], [lp[2]], plp, num_cached_tokens=2)]))
    o3, _ = proc.process(CoreStep([], [SeqUpdate(5, "r", [5], [lp[3]], None, "length")]))
    assert o2[0].prompt_logprobs == [None, lp[0], lp[1]] and o3[0].prompt_logprobs is None
    assert o2[0].outputs[0].logprobs == [lp[2]] and o3[0].outputs[0].logprobs == [lp[3]]
    assert o2[0].num_cached_tokens == 2


def test_an_abort_drops_the_request_and_a_new_one_of_that_id_starts_clean():
    proc = OutputProcessor(PieceTokenizer())
    p = SamplingParams()
    proc.process(CoreStep([RequestAdded("r", [1], p, [1])], [SeqUpdate(1, "r", [2])]))
    out, _ = proc.process(CoreStep([RequestAborted("r"), RequestAdded("r", [1], p, [2])],
                                   [SeqUpdate(1, "r", [3]), SeqUpdate(2, "r", [4], finish_reason="length")]))
    assert [(ro.outputs[0].token_ids, ro.finished) for ro in out] == [([4], True)]
    assert proc.num_requests == 0


def test_streamed_text_equals_the_full_text_cut_at_the_first_stop():
    """Brute force: random streams and stop strings; the deltas joined equal the text decoded at once
    and cut at the earliest stop string that occurs in it, and nothing of a stop ever streams early."""
    rng = random.Random(0)
    for _ in range(400):
        stream = [rng.randrange(1, len(PIECES)) for _ in range(rng.randint(1, 12))]
        stops = ["".join(rng.choice("Helowrd!STOPabcxyz \n") for _ in range(rng.randint(1, 3)))
                 for _ in range(rng.randint(1, 2))]
        include = rng.random() < 0.5
        outs, hits = run(SamplingParams(stop=stops, include_stop_str_in_output=include), stream)
        full = "".join(PIECES[t] for t in stream)
        cut = min(((full.find(s), s) for s in stops if s in full), default=None)
        text, ids, last = joined(outs)
        if cut is None:
            assert (text, ids, last.finish_reason, hits) == (full, stream + [0], "length", [])
            continue
        k, s = cut
        # the first step whose text reaches past the stop's end
        n = next(i for i in range(1, len(stream) + 1) if len("".join(PIECES[t] for t in stream[:i])) >= k + len(s))
        assert text == full[:k + len(s) if include else k], (stream, stops)
        assert ids == stream[:n] and last.stop_reason == s and len(hits) == 1
