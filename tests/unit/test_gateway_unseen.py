"""What a migrated request hands the next attempt: the text and tokens the client has not seen."""

import pytest
from helpers import write_byte_tokenizer

from engine.tokenizer import IncrementalDetokenizer, Tokenizer
from gateway.generation import Generation
from gateway.server import Gateway


class _Gw:
    def __init__(self, tok):
        self.tokenizer = tok

    text_of = Gateway.text_of


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    write_byte_tokenizer(d)
    return Tokenizer(d)


@pytest.mark.parametrize("hold", [0, 1, 3])
@pytest.mark.parametrize("cut", range(1, 14))
def test_unseen_is_what_the_stream_held_back(tok, cut, hold):
    """The stream emitted the text of tokens[:cut] minus a trailing partial character (detokenizer)
    and minus `hold` characters (a worker holding back for stop strings)."""
    prompt = tok.encode("say:")
    ids = tok.encode("é日本 a€b ü xyz")
    detok = IncrementalDetokenizer(tok, prompt)
    decoded = "".join(detok.add(t) for t in ids[:cut])
    seen = decoded[:max(0, len(decoded) - hold)]
    g = Generation(_Gw(tok), "g", prompt, None, "m", (None, None))
    g.tokens, g.text = ids[:cut], seen
    held_tokens, held_text = g._unseen()
    assert seen + held_text == decoded
    # the next worker, resuming with those, completes the text exactly
    nxt = IncrementalDetokenizer(tok, prompt + ids[:cut], held=held_tokens)
    assert seen + held_text + "".join(nxt.add(t) for t in ids[cut:]) == "é日本 a€b ü xyz"
