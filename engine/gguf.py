"""llama.cpp GGUF files (Llama architecture, byte-level BPE tokenizer): served as they are, or converted.

A GGUF file is a model directory's worth in one file: `metadata_dir` writes what its metadata holds
(config.json, generation_config.json, tokenizer.json, tokenizer_config.json with the chat template)
into a small directory beside a link to the file, `model.gguf`. Every part of tandem that reads a
model directory reads that one; the engine's loader (engine/loader.py, through `tensors`) keeps the
weights in their block formats (engine/layers/quantization.py's `GGUFWeight`, engine/kernels/
gguf_linear.c) and converts only the small F32 tensors (norms). This module imports no torch: the
gateway reads models through it.

`convert_gguf` writes a plain Hugging Face checkpoint instead, dequantized to fp32 with
`gguf.quants.dequantize`: the same numbers, for transformers and other peers.

llama.cpp stores the rows of the Q and K projections permuted for its RoPE kernel (interleaved pairs
instead of HF's two halves); both paths undo that permutation (on whole rows, so quantized rows move
as they are). The tokenizer is rebuilt from the GGUF vocabulary and merges as a `tokenizers`
byte-level BPE. transformers is not needed.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from engine.errors import ModelFetchError

_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_BLK = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")
# llama.cpp pre-tokenizer names we can rebuild
_PRE_TOKENIZERS = ("smollm", "gpt2", "default")


def unpermute_rope_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's convert-time `permute` of Q/K rows: [(h, 2, d/2)] -> HF [(h, d/2, 2)]."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def open_gguf(gguf_path: Path):
    from gguf import GGUFReader
    try:
        reader = GGUFReader(str(gguf_path))
    except Exception as e:
        raise ModelFetchError(f"{gguf_path}: not a readable GGUF file ({e})") from None
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ModelFetchError(f"{gguf_path}: field 'general.architecture' = {arch!r}: only 'llama' loads")
    return reader


def _heads(reader) -> tuple[int, int]:
    n_head = int(_field(reader, "llama.attention.head_count"))
    return n_head, int(_field(reader, "llama.attention.head_count_kv", n_head))


def _config(reader, torch_dtype: str) -> dict:
    g = lambda k, d=None: _field(reader, f"llama.{k}", d)  # noqa: E731
    n_head, n_kv = _heads(reader)
    names = {t.name for t in reader.tensors}
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": int(g("embedding_length")),
        "intermediate_size": int(g("feed_forward_length")),
        "num_hidden_layers": int(g("block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "max_position_embeddings": int(g("context_length", 2048)),
        "rms_norm_eps": float(g("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(g("rope.freq_base", 10000.0)),
        "vocab_size": len(_field(reader, "tokenizer.ggml.tokens")),
        "tie_word_embeddings": "output.weight" not in names,
        "hidden_act": "silu",
        "torch_dtype": torch_dtype,
        "attention_bias": False,
        "mlp_bias": False,
    }


def _write_dir(reader, gguf_path: Path, out_dir: Path, torch_dtype: str, fill, extra: dict | None = None) -> Path:
    """config, generation config and tokenizer files from the metadata into out_dir, plus what `fill(tmp)`
    writes, atomically (built beside it, then renamed)."""
    import shutil

    config = {**_config(reader, torch_dtype), **(extra or {})}
    tok_json, tok_cfg, eos_ids, bos_id = _tokenizer_files(reader, gguf_path)
    config["bos_token_id"] = bos_id
    config["eos_token_id"] = eos_ids[0]
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    fill(tmp)
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    (tmp / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": bos_id, "eos_token_id": eos_ids}, indent=2))
    (tmp / "tokenizer.json").write_text(tok_json)
    (tmp / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir


GGUF_LINK = "model.gguf"  # in a metadata directory: the link to the file


def metadata_dir(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """A model directory for the GGUF file: its metadata as Hugging Face files, and `model.gguf`, a link
    to the file (its weights load from there, as they are stored)."""
    gguf_path, out_dir = Path(gguf_path).resolve(), Path(out_dir)
    reader = open_gguf(gguf_path)
    kinds = {t.tensor_type.name for t in reader.tensors}
    dtype = "bfloat16" if kinds <= {"BF16", "F32"} else "float16" if kinds <= {"F16", "F32"} else "float32"
    # the formats, in the model's identity: a Q4_1 and a Q8_0 file of one model share no KV
    extra = {"tandem_weights": "gguf:" + ",".join(sorted(kinds))}
    return _write_dir(reader, gguf_path, out_dir, dtype, lambda tmp: (tmp / GGUF_LINK).symlink_to(gguf_path), extra)


def gguf_file(model_dir: str | Path) -> Path | None:
    """The GGUF file a model directory serves (its `model.gguf` link, or its only *.gguf file when it
    has no safetensors), or None."""
    model_dir = Path(model_dir)
    if (model_dir / GGUF_LINK).exists():
        return model_dir / GGUF_LINK
    files = sorted(model_dir.glob("*.gguf"))
    if len(files) == 1 and not any(model_dir.glob("*.safetensors")):
        return files[0]
    return None


def tensors(reader):
    """(Hugging Face name, ggml type name, [rows, row bytes] raw data or dense array, [out, in] shape) of
    each tensor, Q and K rows unpermuted."""
    n_head, n_kv = _heads(reader)
    for t in reader.tensors:
        name = _hf_name(t.name)
        if name is None:
            raise ModelFetchError(f"tensor {t.name!r} has no Hugging Face name")
        shape = [int(x) for x in reversed(t.shape)]  # ggml lists dims innermost first
        data = t.data
        if len(shape) == 2:
            data = data.reshape(shape[0], -1)
            if name.endswith("q_proj.weight"):
                data = unpermute_rope_rows(data, n_head)
            elif name.endswith("k_proj.weight"):
                data = unpermute_rope_rows(data, n_kv)
        yield name, t.tensor_type, data, shape


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, progress: bool = True) -> Path:
    """A Hugging Face checkpoint directory of the GGUF file, its weights dequantized to fp32."""
    from gguf.quants import dequantize
    from safetensors.numpy import save_file
    from tqdm import tqdm

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    reader = open_gguf(gguf_path)

    def weights(tmp: Path) -> None:
        dense = {}
        for name, qtype, data, shape in tqdm(tensors(reader), total=len(reader.tensors), desc="converting weights",
                                             unit="tensor", disable=not progress):
            dense[name] = np.ascontiguousarray(dequantize(data, qtype).astype(np.float32).reshape(shape))
        save_file(dense, str(tmp / "model.safetensors"), metadata={"format": "pt"})

    return _write_dir(reader, gguf_path, out_dir, "float32", weights)


def _hf_name(name: str) -> str | None:
    if name in _NAMES:
        return _NAMES[name]
    m = _BLK.match(name)
    if m and m.group(2) in _BLOCK:
        return f"model.layers.{m.group(1)}.{_BLOCK[m.group(2)]}.{m.group(3)}"
    return None


def _tokenizer_files(reader, gguf_path: Path):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    kind = _field(reader, "tokenizer.ggml.model")
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    if kind != "gpt2" or pre not in _PRE_TOKENIZERS:
        raise ModelFetchError(f"{gguf_path}: tokenizer {kind!r} with pre-tokenizer {pre!r} is not supported "
                              f"(byte-level BPE 'gpt2' with {_PRE_TOKENIZERS})")
    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    types = list(_field(reader, "tokenizer.ggml.token_type"))
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                               fuse_unk=False, byte_fallback=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level]) \
        if pre == "smollm" else byte_level
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    CONTROL, USER_DEFINED = 3, 4
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, ty in zip(tokens, types) if ty == USER_DEFINED])

    bos = _field(reader, "tokenizer.ggml.bos_token_id")
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    eos_ids: list[int] = []
    # NOTE: chat GGUFs often record the turn-start token as eos; the turn-end and end-of-text
    # tokens, when the vocabulary has them, are what a Hugging Face config would list.
    for special in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>"):
        if special in tokens:
            eos_ids.append(tokens.index(special))
    if eos is not None and int(eos) not in eos_ids:
        eos_ids.append(int(eos))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tokens[bos] if bos is not None else None,
        "eos_token": tokens[eos_ids[0]] if eos_ids else None,
        "add_bos_token": False,  # byte-level BPE models (GPT-2 family) add no BOS in Hugging Face
        "model_max_length": int(_field(reader, "llama.context_length", 2048)),
    }
    template = _field(reader, "tokenizer.chat_template")
    if template:
        cfg["chat_template"] = template
    return tok.to_str(), cfg, eos_ids, (int(bos) if bos is not None else None)
