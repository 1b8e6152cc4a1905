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
