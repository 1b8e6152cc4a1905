"""Builders shared by tests: tiny random-weight checkpoints and a Hugging Face greedy reference."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def write_byte_tokenizer(out: Path, num_merges: int = 40) -> int:
    """A byte-level BPE tokenizer: 3 specials, 256 bytes, a few merges. Returns its vocab size."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = ByteLevel.alphabet()
    alphabet.sort()
    vocab = {s: i for i, s in enumerate(SPECIALS)}
    for ch in alphabet:
        vocab[ch] = len(vocab)
    merges = []
    pairs = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("e", "r"), ("a", "n"), ("o", "n"),
             ("Ġ", "a"), ("r", "e"), ("Ġ", "s"), ("e", "n"), ("a", "t"), ("o", "r"), ("Ġ", "w")]
    for a, b in pairs[:num_merges]:
        merges.append((a, b))
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": None, "eos_token": "<|im_end|>", "chat_template": CHAT_TEMPLATE}))
    return len(vocab)


def longrope_factors(head_dim: int, original: int) -> dict:
    """Phi-3 style LongRoPE settings for a tiny model: short factors near 1, long ones growing with the
    wavelength (as Phi-3's do), `original` the pretraining context."""
    n = head_dim // 2
    return {"rope_type": "longrope", "short_factor": [1.0 + 0.05 * i for i in range(n)],
            "long_factor": [1.0 + 1.5 * i for i in range(n)], "original_max_position_embeddings": original}


def make_tiny_model(out: Path, arch: str = "llama", seed: int = 0, **overrides) -> Path:
    """Random-weight Llama, Qwen2, Qwen3 or Phi-3 with GQA, saved as a Hugging Face directory. Qwen3 gets a
    head_dim (32) other than hidden_size / heads (16) and random q/k norm weights; Phi-3 gets LongRoPE
    factors with original_max_position_embeddings 64 (of 512) unless `overrides` say otherwise."""
    import torch
    import transformers as tf

    vocab = write_byte_tokenizer(out)
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  rms_norm_eps=1e-5, eos_token_id=2, bos_token_id=None, tie_word_embeddings=False)
    common.update(overrides)
    common["vocab_size"] = max(common["vocab_size"], vocab)
    torch.manual_seed(seed)
    if arch == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**common))
    elif arch == "qwen2":
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(**common))
    elif arch == "qwen3":
        model = tf.Qwen3ForCausalLM(tf.Qwen3Config(**{"head_dim": 32, **common}))
    elif arch == "phi3":
        original = common.pop("original_max_position_embeddings", 64)
        head_dim = common["hidden_size"] // common["num_attention_heads"]
        common.setdefault("rope_parameters", {**longrope_factors(head_dim, original), "rope_theta": 10000.0})
        model = tf.Phi3ForCausalLM(tf.Phi3Config(original_max_position_embeddings=original, pad_token_id=0, **common))
    else:
        raise ValueError(arch)
    # NOTE: default init (std 0.02) gives near-uniform logits, i.e. a numerical tie at every step;
    # larger weights give a peaked distribution whose greedy path is well defined.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                p.uniform_(0.5, 1.5)  # Qwen3's per-head norms: weights that tell one dimension from another
                continue
            if "norm" in name:
                continue  # RMSNorm weights stay 1
            p.normal_(0.0, 0.15 if p.dim() > 1 else 0.1)
    model.save_pretrained(str(out), safe_serialization=True)
    return out


@dataclass
class Reference:
    tokens: list[int]
    gaps: list[float]  # top-1 minus top-2 logit at each step
    logprobs: list[float]  # logprob of the chosen token


def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> Reference:
    """Hugging Face greedy decoding, one prompt at a time (no padding), with tie margins."""
    import torch

    tokens, gaps, lps = [], [], []
    with torch.no_grad():
        out = model(torch.tensor([prompt_ids]), use_cache=True)
        for _ in range(max_new_tokens):
            logits = out.logits[0, -1].float()
            top2 = logits.topk(2)
            tok = int(top2.indices[0])
            tokens.append(tok)
            gaps.append(float(top2.values[0] - top2.values[1]))
            lps.append(float(torch.log_softmax(logits, -1)[tok]))
            out = model(torch.tensor([[tok]]), past_key_values=out.past_key_values, use_cache=True)
    return Reference(tokens, gaps, lps)


def hf_greedy_batch(model, prompts: list[list[int]], max_new_tokens: int) -> list[Reference]:
    """`hf_greedy` for several prompts in one left-padded batch (masked, positions from the mask): one
    forward per step for all of them. Padding changes the matmul shapes, so logits move by ~1e-6, far
    inside the tie margin and the logprob tolerance the callers use; a real model's many steps cost a
    quarter of the time."""
    import torch

    n = max(len(p) for p in prompts)
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    ids = torch.tensor([[pad] * (n - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (n - len(p)) + [1] * len(p) for p in prompts])
    refs = [Reference([], [], []) for _ in prompts]
    with torch.no_grad():
        out = model(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0), use_cache=True)
        for _ in range(max_new_tokens):
            logits = out.logits[:, -1].float()
            top2 = logits.topk(2)
            lps = torch.log_softmax(logits, -1)
            nxt = top2.indices[:, 0]
            for i, r in enumerate(refs):
                tok = int(nxt[i])
                r.tokens.append(tok)
                r.gaps.append(float(top2.values[i, 0] - top2.values[i, 1]))
                r.logprobs.append(float(lps[i, tok]))
            mask = torch.cat([mask, torch.ones(len(prompts), 1, dtype=mask.dtype)], 1)
            out = model(nxt[:, None], attention_mask=mask, position_ids=mask.sum(-1, keepdim=True) - 1,
                        past_key_values=out.past_key_values, use_cache=True)
    return refs


TIE = 1e-4


def assert_greedy_equal(ours: list[int], ref: Reference, label: str = "") -> int | None:
    """Token-for-token equality; a divergence is accepted only at a numerical tie (gap < 1e-4).

    Returns the index of an accepted tie (and prints it), or None when all tokens match.
    """
    n = min(len(ours), len(ref.tokens))
    assert len(ours) == len(ref.tokens), f"{label}: {len(ours)} tokens vs reference {len(ref.tokens)}"
    for i in range(n):
        if ours[i] != ref.tokens[i]:
            assert ref.gaps[i] < TIE, (f"{label}: token {i} differs ({ours[i]} vs {ref.tokens[i]}) and the "
                                       f"reference's top-2 gap {ref.gaps[i]:.2e} is not a tie")
            print(f"{label}: accepted numerical tie at token {i} (gap {ref.gaps[i]:.2e})")
            return i
    return None


def check_cpu_kernel(name: str) -> None:
    """For a test of CPU kernel `name` (engine/kernels): skip it where the kernel cannot be built for want
    of a C compiler, or is turned off (TANDEM_CPU_KERNELS); fail it, with the build's error, where a
    compiler is here and the build failed anyway (a skip would hide a broken kernel)."""
    import pytest

    from engine import kernels

    if kernels.load(name) is not None:
        return
    if not kernels.enabled(name):
        pytest.skip(f"CPU kernel {name} is turned off (TANDEM_CPU_KERNELS)")
    cc = kernels.compiler()
    if cc is None:
        pytest.skip(f"no C compiler here: CPU kernel {name} is not built")
    pytest.fail(f"CPU kernel {name} did not build though a C compiler is here ({cc}): "
                f"{kernels.build_error(name)}", pytrace=False)


def random_gguf_rows(qtype: str, n: int, k: int, rng, std: float = 0.15):
    """n rows of k random weights in ggml type `qtype`, as raw blocks ([n, row bytes] uint8): Q8_0, Q4_0
    and Q4_1 quantized from normal weights by gguf's quantizer; the K-quants (which it cannot make)
    random blocks with scales that give weights of about `std`."""
    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import quantize

    t = GGMLQuantizationType[qtype]
    if qtype in ("Q8_0", "Q4_0", "Q4_1", "F16", "BF16"):
        raw = quantize(rng.normal(0, std, size=(n, k)).astype(np.float32), t)
        return raw.view(np.uint8).reshape(n, -1)  # F16 / BF16 come as 16-bit numbers
    bs, tb = GGML_QUANT_SIZES[t]
    raw = rng.integers(0, 256, size=(n, k // bs, tb), dtype=np.uint8)

    def put(offset, lo, hi):
        raw[:, :, offset:offset + 2] = rng.uniform(lo, hi, size=raw.shape[:2] + (1,)).astype(np.float16) \
            .view(np.uint8).reshape(*raw.shape[:2], 2)

    if qtype == "Q6_K":
        put(208, std / 1500, std / 500)  # d * int8 scale * (q - 32)
    else:  # Q4_K, Q5_K: d * 6-bit scale * q - dmin * 6-bit min
        big = 2 if qtype == "Q4_K" else 1
        put(0, big * std / 400, big * std / 200)
        put(2, std / 100, std / 50)
    return raw.reshape(n, -1)


def make_tiny_gguf(path: Path, types: dict[str, str], seed: int = 0, hidden: int = 256, intermediate: int = 512,
                   layers: int = 2, heads: int = 4, kv_heads: int = 2, tie: bool = False, arch: str = "llama",
                   head_dim: int | None = None, original_context: int = 64) -> Path:
    """A random-weight model as a llama.cpp GGUF file, with the byte tokenizer; `types` maps GGUF tensor
    kinds (`attn_q`, `attn_k`, `attn_v`, `attn_qkv`, `attn_output`, `ffn_gate`, `ffn_up`, `ffn_down`,
    `token_embd`, `output`) to ggml types (default Q8_0). `arch`: llama (Q and K rows permuted as llama.cpp's
    converter does), qwen3 (q/k norms; head_dim, default 128 as transformers' Qwen3Config, stored as
    key_length) or phi3 (fused attn_qkv, ffn_up = gate then up, LongRoPE factor tensors with
    `original_context` of 512 positions)."""
    import math

    import numpy as np
    from gguf import GGMLQuantizationType, GGUFWriter
    from tokenizers import Tokenizer

    tdir = path.parent / (path.stem + "-tokenizer")
    write_byte_tokenizer(tdir)
    tj = json.loads((tdir / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    for t in tj["added_tokens"]:
        vocab[t["content"]] = t["id"]
    tokens = [tok for tok, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    assert len(tokens) == len(Tokenizer.from_file(str(tdir / "tokenizer.json")).get_vocab())
    rng = np.random.default_rng(seed)
    head_dim = head_dim or (128 if arch == "qwen3" else hidden // heads)
    w = GGUFWriter(str(path), arch)
    w.add_block_count(layers)
    w.add_context_length(512)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(intermediate)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    if arch == "qwen3":
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if arch == "phi3":  # as llama.cpp's converter writes Phi-3's LongRoPE
        w.add_rope_dimension_count(head_dim)
        w.add_rope_scaling_orig_ctx_len(original_context)
        w.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(512 / original_context) / math.log(original_context)))
        w.add_sliding_window(0)
        factors = longrope_factors(head_dim, original_context)
        w.add_tensor("rope_factors_long.weight", np.array(factors["long_factor"], dtype=np.float32))
        w.add_tensor("rope_factors_short.weight", np.array(factors["short_factor"], dtype=np.float32))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in tj["model"]["merges"]])
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    if arch == "phi3":
        w.add_pad_token_id(0)  # transformers' Phi3Config would take 32000, past this vocabulary
    w.add_chat_template(CHAT_TEMPLATE)

    def permute(rows, n_head):  # llama.cpp's convert-time permutation of Q/K rows
        return rows.reshape(n_head, 2, rows.shape[0] // n_head // 2, -1).swapaxes(1, 2).reshape(rows.shape)

    def tensor(name, kind, n, k):
        qtype = types.get(kind, "Q8_0")
        rows = random_gguf_rows(qtype, n, k, rng)
        if kind == "attn_q" and arch == "llama":
            rows = permute(rows, heads)
        elif kind == "attn_k" and arch == "llama":
            rows = permute(rows, kv_heads)
        w.add_tensor(name, np.ascontiguousarray(rows), raw_dtype=GGMLQuantizationType[qtype])

    tensor("token_embd.weight", "token_embd", len(tokens), hidden)
    for i in range(layers):
        w.add_tensor(f"blk.{i}.attn_norm.weight", rng.uniform(0.8, 1.2, hidden).astype(np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", rng.uniform(0.8, 1.2, hidden).astype(np.float32))
        if arch == "phi3":
            tensor(f"blk.{i}.attn_qkv.weight", "attn_qkv", (heads + 2 * kv_heads) * head_dim, hidden)
        else:
            tensor(f"blk.{i}.attn_q.weight", "attn_q", heads * head_dim, hidden)
            tensor(f"blk.{i}.attn_k.weight", "attn_k", kv_heads * head_dim, hidden)
            tensor(f"blk.{i}.attn_v.weight", "attn_v", kv_heads * head_dim, hidden)
        if arch == "qwen3":
            w.add_tensor(f"blk.{i}.attn_q_norm.weight", rng.uniform(0.5, 1.5, head_dim).astype(np.float32))
            w.add_tensor(f"blk.{i}.attn_k_norm.weight", rng.uniform(0.5, 1.5, head_dim).astype(np.float32))
        tensor(f"blk.{i}.attn_output.weight", "attn_output", hidden, heads * head_dim)
        if arch == "phi3":
            tensor(f"blk.{i}.ffn_up.weight", "ffn_up", 2 * intermediate, hidden)
        else:
            tensor(f"blk.{i}.ffn_gate.weight", "ffn_gate", intermediate, hidden)
            tensor(f"blk.{i}.ffn_up.weight", "ffn_up", intermediate, hidden)
        tensor(f"blk.{i}.ffn_down.weight", "ffn_down", hidden, intermediate)
    w.add_tensor("output_norm.weight", rng.uniform(0.8, 1.2, hidden).astype(np.float32))
    if not tie:
        tensor("output.weight", "output", len(tokens), hidden)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
