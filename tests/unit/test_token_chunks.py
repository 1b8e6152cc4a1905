"""TokenChunks as workers build them from engine outputs (common/worker_io.py) and as they travel."""

from common.messages import VERSION, TokenChunk, decode_chunk, encode
from common.worker_io import output_chunks
from engine.llm_engine import CompletionOutput, RequestOutput
from engine.sampler import TokenLogprobs

PROMPT_LPS = [None, TokenLogprobs(-1.5, [(7, -0.5), (9, -1.0)]), TokenLogprobs(-0.25, [(3, -0.25), (7, -2.0)])]


def test_prompt_logprobs_round_trip():
    chunk = TokenChunk(VERSION, "r", 2, 0, [5], "a", None, None, "", "w",
                       prompt_logprobs=[None, (-1.5, [(7, -0.5), (9, -1.0)])])
    assert decode_chunk(encode(chunk)) == chunk
    assert decode_chunk(encode(TokenChunk(VERSION, "r", 2, 3, [5], "a"))).prompt_logprobs is None


def test_output_chunks_put_prompt_logprobs_on_sample_0s_first_chunk_only():
    first_index: dict = {}
    first = RequestOutput("r", [1, 2, 3], [CompletionOutput(0, "a", [5]), CompletionOutput(1, "b", [6])], False,
                          prompt_logprobs=PROMPT_LPS)
    c0, c1 = output_chunks(first, 0, first_index, "w")
    assert (c0.index, c1.index) == (0, 0)
    assert c0.prompt_logprobs == [None, (-1.5, [(7, -0.5), (9, -1.0)]), (-0.25, [(3, -0.25), (7, -2.0)])]
    assert c1.prompt_logprobs is None
    later = RequestOutput("r", [1, 2, 3], [CompletionOutput(0, "c", [8])], False)
    (c,) = output_chunks(later, 0, first_index, "w")
    assert c.index == 1 and c.prompt_logprobs is None
    # a decode worker's chunks start at index 1 (the prefill worker sent index 0 and the prompt's logprobs)
    (c,) = output_chunks(RequestOutput("q", [1, 2, 3], [CompletionOutput(0, "a", [5])], False,
                                       prompt_logprobs=PROMPT_LPS), 0, {("q", 0): 1}, "w")
    assert c.index == 1 and c.prompt_logprobs is None
