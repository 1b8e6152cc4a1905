import pytest
from helpers import write_byte_tokenizer

from engine.errors import InvalidRequestError
from engine.tokenizer import IncrementalDetokenizer, Tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    write_byte_tokenizer(d)
    return Tokenizer(d)


def test_incremental_detokenization_never_splits_utf8(tok):
    text = "héllo wörld 🙂 ok ✓ the end"
    ids = tok.encode(text)
    assert len(ids) > len(text) // 2  # many multi-byte characters take several tokens
    detok = IncrementalDetokenizer(tok, tok.encode("prompt:"))
    deltas = [detok.add(i) for i in ids]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == text
    assert any(d == "" for d in deltas)  # the emoji's first bytes waited for the rest


def test_chat_template_and_errors(tok):
    s = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert s == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    with pytest.raises(InvalidRequestError):
        tok.apply_chat_template([])
    with pytest.raises(InvalidRequestError):
        tok.apply_chat_template([{"content": "no role"}])
    assert tok.encode("<|im_end|>", add_special_tokens=False) == [2]


@pytest.mark.parametrize("cut", range(1, 12))
def test_a_stream_resumed_mid_character_loses_no_text(tok, cut):
    """A migrated request: the first worker emitted text for tokens[:cut] except a trailing partial
    character (held tokens); the next worker gets tokens[:cut] as prompt context and `held`."""
    prompt = tok.encode("say:")
    ids = tok.encode("é日本 a€b ü")
    first = IncrementalDetokenizer(tok, prompt)
    text, held = "", 0
    for t in ids[:cut]:
        d = first.add(t)
        text += d
        held = 0 if d else held + 1
    second = IncrementalDetokenizer(tok, prompt + ids[:cut], held=held)
    for t in ids[cut:]:
        text += second.add(t)
    assert text == "é日本 a€b ü"
