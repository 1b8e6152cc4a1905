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


def make_tiny_model(out: Path, arch: str = "llama", seed: int = 0, **overrides) -> Path:
    """Random-weight Llama or Qwen2 with GQA, saved as a Hugging Face directory."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    vocab = write_byte_tokenizer(out)
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  rms_norm_eps=1e-5, eos_token_id=2, bos_token_id=None, tie_word_embeddings=False)
    common.update(overrides)
    common["vocab_size"] = max(common["vocab_size"], vocab)
    torch.manual_seed(seed)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    else:
        raise ValueError(arch)
    # NOTE: default init (std 0.02) gives near-uniform logits, i.e. a numerical tie at every step;
    # larger weights give a peaked distribution whose greedy path is well defined.
    with torch.no_grad():
        for name, p in model.named_parameters():
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
