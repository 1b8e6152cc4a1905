import numpy as np

from engine.gguf import _hf_name, unpermute_rope_rows


def llama_cpp_permute(w, n_head):
    """llama.cpp's convert_hf_to_gguf permutation of Q/K rows (the operation we invert)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_unpermute_inverts_llama_cpp_permute():
    rng = np.random.default_rng(0)
    for n_head, head_dim in [(9, 64), (3, 64), (4, 8)]:
        w = rng.standard_normal((n_head * head_dim, 24)).astype(np.float32)
        assert np.array_equal(unpermute_rope_rows(llama_cpp_permute(w, n_head), n_head), w)
        assert not np.array_equal(llama_cpp_permute(w, n_head), w)


def test_tensor_names():
    assert _hf_name("token_embd.weight") == "model.embed_tokens.weight"
    assert _hf_name("blk.7.attn_k.weight") == "model.layers.7.self_attn.k_proj.weight"
    assert _hf_name("blk.0.ffn_down.weight") == "model.layers.0.mlp.down_proj.weight"
    assert _hf_name("blk.0.mystery.weight") is None
    assert _hf_name("blk.2.attn_q_norm.weight", "qwen3") == "model.layers.2.self_attn.q_norm.weight"
    assert _hf_name("blk.2.attn_q_norm.weight") is None  # not a llama tensor
    assert _hf_name("blk.1.attn_qkv.weight", "phi3") == "model.layers.1.self_attn.qkv_proj.weight"
    assert _hf_name("blk.1.ffn_up.weight", "phi3") == "model.layers.1.mlp.gate_up_proj.weight"  # gate, then up
    assert _hf_name("blk.1.ffn_up.weight", "qwen3") == "model.layers.1.mlp.up_proj.weight"


def test_tensor_index_reads_what_gguf_reader_reads(tmp_path):
    """The loader's header walk (scalars and tensors, arrays stepped over) against gguf's own reader, on
    a file mixing every weight format, with alignment 64 and string/int arrays in the metadata."""
    from gguf import GGUFReader, GGUFWriter
    from helpers import make_tiny_gguf

    from engine.gguf import TensorIndex, open_gguf, tensors

    types = {"attn_q": "Q4_K", "attn_k": "Q5_K", "attn_v": "Q6_K", "attn_output": "Q4_0", "ffn_gate": "Q4_1",
             "ffn_up": "F16", "ffn_down": "BF16", "token_embd": "Q8_0", "output": "F32"}
    f = make_tiny_gguf(tmp_path / "m.gguf", types, hidden=256, intermediate=256, layers=1)
    ours, theirs = open_gguf(f, metadata=False), GGUFReader(str(f))
    assert isinstance(ours, TensorIndex) and len(ours.tensors) == len(theirs.tensors)
    for a, b in zip(tensors(ours), tensors(theirs)):
        assert (a[0], a[1], a[3]) == (b[0], b[1], b[3])
        assert a[2].dtype == b[2].dtype and a[2].shape == b[2].shape and np.array_equal(a[2], b[2]), a[0]
    assert ours.scalars["llama.block_count"] == 1
    assert ours.scalars == {k: v.contents() for k, v in theirs.fields.items()
                            if not k.startswith("GGUF.") and not isinstance(v.contents(), list)}

    w = GGUFWriter(str(tmp_path / "a.gguf"), "llama")
    w.add_uint32("general.alignment", 64)
    w.add_array("some.ints", [1, 2, 3])
    w.add_array("some.strings", ["x", "yy", ""])
    w.add_float64("some.f64", 0.25)
    w.add_tensor("t", np.arange(10, dtype=np.float32))
    w.add_tensor("u", np.arange(7, dtype=np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    idx = TensorIndex(tmp_path / "a.gguf")
    assert idx.scalars["some.f64"] == 0.25 and "some.ints" not in idx.scalars
    assert np.array_equal(idx.tensors[0].data, np.arange(10)) and np.array_equal(idx.tensors[1].data, np.arange(7))


def test_qwen2_pre_tokenizer_splits_as_transformers_qwen2_tokenizer(tmp_path):
    """A qwen3 GGUF's tokenizer (pre-tokenizer `qwen2`) against transformers' Qwen2Tokenizer (Qwen3's) on
    one vocabulary whose merges cross the places where Qwen2's split and GPT-2's differ (digit runs,
    punctuation before letters, upper-case contractions, newlines), so that a wrong split shows."""
    from gguf import GGUFReader, GGUFWriter
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import Qwen2Tokenizer

    from engine.gguf import _tokenizer_files

    alphabet = sorted(ByteLevel.alphabet())
    merges = [("1", "2"), ("Ġ", "1"), ("=", "t"), ("'", "L"), ("'L", "L"), ("Ċ", "Ċ"), ("ĉ", "t"), ("h", "e"),
              ("Ġ", "t"), ("Ġt", "he"), ("Ã", "©")]
    tokens = ["<|endoftext|>", *alphabet, *(a + b for a, b in merges)]
    vocab = {t: i for i, t in enumerate(tokens)}

    def encoder(pre):
        path = tmp_path / f"{pre}.gguf"
        w = GGUFWriter(str(path), "qwen3")
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_token_list(tokens)
        w.add_token_types([3] + [1] * (len(tokens) - 1))
        w.add_token_merges([f"{a} {b}" for a, b in merges])
        w.add_eos_token_id(0)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        from tokenizers import Tokenizer
        return Tokenizer.from_str(_tokenizer_files(GGUFReader(str(path)), path)[0])

    ours, gpt2 = encoder("qwen2"), encoder("default")
    theirs = Qwen2Tokenizer(vocab=vocab, merges=merges)
    texts = ["The theater in 2024: 12 123 tokens!", "I'LL see x=the\n\n\tthe", "cafe\u0301 naïve — ok?",
             "  leading spaces and trailing  ", "x=1;y=122\r\nz"]
    for text in texts:
        assert ours.encode(text).ids == theirs.encode(text, add_special_tokens=False), text
    assert any(gpt2.encode(t).ids != ours.encode(t).ids for t in texts)  # the splits do differ here
