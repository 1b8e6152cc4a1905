"""llama.cpp GGUF files (architectures llama, qwen3 and phi3; byte-level BPE tokenizers): served as they
are, or converted.

A GGUF file is a model directory's worth in one file: `metadata_dir` writes what its metadata holds
(config.json, generation_config.json, tokenizer.json, tokenizer_config.json with the chat template)
into a small directory beside a link to the file, `model.gguf`. Every part of tandem that reads a
model directory reads that one; the engine's loader (engine/loader.py, through `tensors`) keeps the
weights in their block formats (engine/layers/quantization.py's `GGUFWeight`, engine/kernels/
gguf_linear.c) and converts only the small F32 tensors (norms). This module imports no torch: the
gateway reads models through it.

`convert_gguf` writes a plain Hugging Face checkpoint instead, dequantized to fp32 with
`gguf.quants.dequantize`: the same numbers, for transformers and other peers.

llama.cpp stores the rows of a llama file's Q and K projections permuted for its RoPE kernel
(interleaved pairs instead of HF's two halves); both paths undo that permutation (on whole rows, so
quantized rows move as they are). qwen3 and phi3 files keep HF's order (llama.cpp's NEOX RoPE). phi3
files keep Phi-3's fused projections (`attn_qkv`; `ffn_up` holds gate then up), named as Phi-3's HF
checkpoints name them, and its LongRoPE factors as two tensors, read into the config. The tokenizer is rebuilt from the GGUF vocabulary and merges as a `tokenizers`
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
# general.architecture -> (HF architecture, model_type, tensor kinds named otherwise than in _BLOCK)
ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", "llama", {}),
    "qwen3": ("Qwen3ForCausalLM", "qwen3", {"attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}),
    "phi3": ("Phi3ForCausalLM", "phi3", {"attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"}),
}
_ROPE_FACTORS = {"rope_factors_short.weight": "short_factor", "rope_factors_long.weight": "long_factor"}
# llama.cpp pre-tokenizer names we can rebuild
_PRE_TOKENIZERS = ("smollm", "gpt2", "default", "qwen2")
# Qwen2's (and Qwen3's) split, as transformers' Qwen2Tokenizer has it: single digits, case-blind contractions
_QWEN2_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""


def unpermute_rope_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's convert-time `permute` of Q/K rows: [(h, 2, d/2)] -> HF [(h, d/2, 2)]."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _field(reader, key, default=None):
    if isinstance(reader, TensorIndex):
        return reader.scalars.get(key, default)
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


class TensorIndex:
    """What loading weights needs of a GGUF file: its scalar metadata and its tensors (name, ggml type,
    ggml-order shape, the data as a memory-mapped array shaped as gguf's reader shapes it).

    gguf's `GGUFReader` also builds every metadata array, the vocabulary and merges included: 5-10 s
    of a worker's start on a 2-core machine for a 49k-token vocabulary. This walks the header once and
    steps over arrays by their lengths (tens of milliseconds). The layout is GGUF v2/v3's: magic,
    version, tensor count, KV count, the KV pairs, the tensor infos, then the data, aligned to
    `general.alignment` (32 by default)."""

    _SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
    _STRING, _ARRAY = 8, 9

    def __init__(self, path: Path):
        import struct

        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
        from gguf.gguf_reader import quant_shape_to_byte_shape

        self._mm = mm = np.memmap(path, mode="r")
        buf = memoryview(mm)
        if bytes(buf[:4]) != b"GGUF":
            raise ValueError("no GGUF magic")
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version}")
        pos = 24

        def string() -> str:
            nonlocal pos
            (n,) = struct.unpack_from("<Q", buf, pos)
            pos += 8 + n
            return bytes(buf[pos - n:pos]).decode("utf-8")

        def skip_or_read(vtype: int):
            nonlocal pos
            if vtype == self._STRING:
                return string()
            if vtype == self._ARRAY:
                etype, count = struct.unpack_from("<IQ", buf, pos)
                pos += 12
                if etype == self._STRING:
                    for _ in range(count):
                        pos += 8 + struct.unpack_from("<Q", buf, pos)[0]
                else:
                    pos += count * struct.calcsize(self._SCALARS[etype])
                return None  # arrays: the tokenizer's; metadata_dir reads those through gguf
            fmt = self._SCALARS[vtype]
            (v,) = struct.unpack_from(fmt, buf, pos)
            pos += struct.calcsize(fmt)
            return v

        self.scalars: dict = {}
        for _ in range(n_kv):
            key = string()
            (vtype,) = struct.unpack_from("<I", buf, pos)
            pos += 4
            if (v := skip_or_read(vtype)) is not None:
                self.scalars[key] = v
        infos = []
        for _ in range(n_tensors):
            name = string()
            (n_dims,) = struct.unpack_from("<I", buf, pos)
            dims = struct.unpack_from(f"<{n_dims}Q", buf, pos + 4)
            ttype, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * n_dims)
            pos += 4 + 8 * n_dims + 12
            infos.append((name, list(dims), GGMLQuantizationType(ttype), offset))
        align = int(self.scalars.get("general.alignment", 32))
        start = -(-pos // align) * align
        dense = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16}
        self.tensors = []
        for name, dims, ttype, offset in infos:
            block, type_size = GGML_QUANT_SIZES[ttype]
            n = int(np.prod(dims))
            np_dims = tuple(reversed(dims))
            lo = start + offset
            if ttype in dense:
                data = mm[lo:lo + n * np.dtype(dense[ttype]).itemsize].view(dense[ttype]).reshape(np_dims)
            else:
                data = mm[lo:lo + n * type_size // block].reshape(quant_shape_to_byte_shape(np_dims, ttype))
            self.tensors.append(_IndexedTensor(name, ttype, dims, data))


class _IndexedTensor:
    __slots__ = ("name", "tensor_type", "shape", "data")

    def __init__(self, name, tensor_type, shape, data):
        self.name, self.tensor_type, self.shape, self.data = name, tensor_type, shape, data


def open_gguf(gguf_path: Path, metadata: bool = True):
    """The file's reader: gguf's `GGUFReader` (every field) or, with metadata=False, a `TensorIndex`
    (scalars and tensors only: what the loader needs, in a fraction of the time)."""
    try:
        if metadata:
            from gguf import GGUFReader
            reader = GGUFReader(str(gguf_path))
        else:
            reader = TensorIndex(Path(gguf_path))
    except Exception as e:
        raise ModelFetchError(f"{gguf_path}: not a readable GGUF file ({e})") from None
    arch = _field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise ModelFetchError(f"{gguf_path}: field 'general.architecture' = {arch!r}: only "
                              f"{', '.join(repr(a) for a in ARCHITECTURES)} load")
    return reader


def _arch(reader) -> str:
    return _field(reader, "general.architecture")


def _heads(reader) -> tuple[int, int]:
    arch = _arch(reader)
    n_head = int(_field(reader, f"{arch}.attention.head_count"))
    return n_head, int(_field(reader, f"{arch}.attention.head_count_kv", n_head))


def _config(reader, torch_dtype: str) -> dict:
    arch = _arch(reader)
    g = lambda k, d=None: _field(reader, f"{arch}.{k}", d)  # noqa: E731
    n_head, n_kv = _heads(reader)
    names = {t.name for t in reader.tensors}
    hf_arch, model_type, _ = ARCHITECTURES[arch]
    extra: dict = {}
    if _field(reader, "tokenizer.ggml.padding_token_id") is not None:  # transformers' Phi3Config: 32000 if unset
        extra["pad_token_id"] = int(_field(reader, "tokenizer.ggml.padding_token_id"))
    if g("attention.key_length") is not None:
        extra["head_dim"] = int(g("attention.key_length"))
    if arch == "phi3":
        if g("attention.sliding_window"):  # 0: none (Phi-4)
            extra["sliding_window"] = int(g("attention.sliding_window"))
        extra["original_max_position_embeddings"] = int(g("rope.scaling.original_context_length",
                                                         g("context_length", 4096)))
        factors = {key: [float(x) for x in np.asarray(t.data).reshape(-1)]
                   for t in reader.tensors if (key := _ROPE_FACTORS.get(t.name))}
        if factors:
            extra["rope_scaling"] = {"rope_type": "longrope", **factors}
            if g("rope.scaling.attn_factor") is not None:
                extra["rope_scaling"]["attention_factor"] = float(g("rope.scaling.attn_factor"))
    return {
        "architectures": [hf_arch],
        "model_type": model_type,
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
        **extra,
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
    each weight tensor, a llama file's Q and K rows unpermuted (phi3's RoPE factors: in the config)."""
    n_head, n_kv = _heads(reader)
    arch = _arch(reader)
    for t in reader.tensors:
        if arch == "phi3" and t.name in _ROPE_FACTORS:
            continue
        name = _hf_name(t.name, arch)
        if name is None:
            raise ModelFetchError(f"tensor {t.name!r} has no Hugging Face name ({arch})")
        shape = [int(x) for x in reversed(t.shape)]  # ggml lists dims innermost first
        data = t.data
        if len(shape) == 2:
            data = data.reshape(shape[0], -1)
            if arch == "llama" and name.endswith("q_proj.weight"):
                data = unpermute_rope_rows(data, n_head)
            elif arch == "llama" and name.endswith("k_proj.weight"):
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


def _hf_name(name: str, arch: str = "llama") -> str | None:
    if name in _NAMES:
        return _NAMES[name]
    m = _BLK.match(name)
    kinds = {**_BLOCK, **ARCHITECTURES[arch][2]}
    if m and m.group(2) in kinds:
        return f"model.layers.{m.group(1)}.{kinds[m.group(2)]}.{m.group(3)}"
    return None


def _tokenizer_files(reader, gguf_path: Path):
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

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
    if pre == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre == "qwen2":
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        tok.pre_tokenizer = byte_level
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
        "model_max_length": int(_field(reader, f"{_arch(reader)}.context_length", 2048)),
    }
    template = _field(reader, "tokenizer.chat_template")
    if template:
        cfg["chat_template"] = template
    return tok.to_str(), cfg, eos_ids, (int(bos) if bos is not None else None)
