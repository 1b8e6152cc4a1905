"""Load a model directory's weights into a (possibly sharded) model: a Hugging Face checkpoint's
safetensors, or the GGUF file a GGUF model directory links (engine/gguf.py).

Safetensors files are memory-mapped (`safe_open`); each parameter's `weight_loader` reads only this
rank's slice through a lazy slice, so a TP rank never materialises the whole tensor and a PP stage
skips the layers it does not hold. GGUF weights keep their block formats (`place_gguf`: this rank's
rows, or its columns where they are whole blocks).

Checkpoints store q, k, v (and gate, up) either apart (Llama, Qwen) or fused in one tensor (Phi-3's
`qkv_proj`, `gate_up_proj`; GGUF's `attn_qkv`, and phi3's `ffn_up`). A fused tensor is cut into its
sections by rows (`split_fused`), and each section then loads as the separate tensor would: every TP
rank takes its own heads of q, of k and of v, its own rows of gate and of up.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open

from engine.errors import ModelConfigError
from engine.gguf import gguf_file, open_gguf, tensors
from engine.layers.linear import RowSection, materialize
from engine.layers.quantization import finish_gguf, gguf_placeable, place_gguf
from engine.model import LlamaForCausalLM

# checkpoint name suffix -> (our parameter suffix, shard id)
_STACKED = {
    "self_attn.q_proj": ("self_attn.qkv_proj", "q"),
    "self_attn.k_proj": ("self_attn.qkv_proj", "k"),
    "self_attn.v_proj": ("self_attn.qkv_proj", "v"),
    "mlp.gate_proj": ("mlp.gate_up_proj", 0),
    "mlp.up_proj": ("mlp.gate_up_proj", 1),
}
# checkpoint name suffix -> our parameter suffix, for tensors that hold all the shards (shard id FUSED)
_FUSED_NAMES = ("self_attn.qkv_proj", "mlp.gate_up_proj")
FUSED = "fused"
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_IGNORED = re.compile(r"(rotary_emb\.inv_freq|\.rotary_emb\.)")


def safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ModelConfigError(f"{index}: invalid index ({e})") from None
        files = sorted({model_dir / f for f in weight_map.values()})
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise ModelConfigError(f"{index}: lists missing files {missing}")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelConfigError(f"{model_dir}: no *.safetensors files (only safetensors checkpoints load)")
    return files


def load_weights(model: LlamaForCausalLM, model_dir: str | Path) -> None:
    model_dir = Path(model_dir)
    if (gguf := gguf_file(model_dir)) is not None:
        return load_gguf_weights(model, gguf)
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    loaded: set[str] = set()
    for file in safetensors_files(model_dir):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                if _IGNORED.search(name):
                    continue
                if (target := _place(model, params, file, name)) is None:
                    continue  # another pipeline stage's tensor
                pname, shard, param = target
                whole = f.get_slice(name)
                try:
                    loader = getattr(param, "weight_loader", default_weight_loader)
                    for sub, start, rows in split_fused(modules[pname.rsplit(".", 1)[0]], shard,
                                                        whole.get_shape()[0]):
                        loader(param, whole if sub == shard else RowSection(whole, start, rows), sub)
                        loaded.add(f"{pname}:{sub}")
                except ValueError as e:
                    raise ModelConfigError(f"{file}: tensor {name!r}: {e}") from None
    check_all_loaded(model, loaded, model_dir)


def split_fused(owner, shard, rows: int) -> list[tuple]:
    """(shard id, first row, rows) of each section of a checkpoint tensor of `rows` rows for module `owner`:
    the sections of a fused tensor (shard FUSED), or the one tensor as it is."""
    if shard != FUSED:
        return [(shard, 0, rows)]
    sections = owner.checkpoint_sections()
    if sum(n for _, n in sections) != rows:
        raise ValueError(f"{rows} rows, not the {' + '.join(str(n) for _, n in sections)} of its fused projections")
    out, start = [], 0
    for sub, n in sections:
        out.append((sub, start, n))
        start += n
    return out


def load_gguf_weights(model, gguf_path: str | Path) -> None:
    """The GGUF file's tensors into `model` (this rank's part): weights of linear layers, the embedding
    and the LM head kept in their block formats where the CPU kernel takes them, the rest dequantized
    into the parameters' dtype."""
    import numpy as np
    from gguf.quants import dequantize

    gguf_path = Path(gguf_path)
    reader = open_gguf(gguf_path, metadata=False)
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    loaded: set[str] = set()
    for name, qtype, data, shape in tensors(reader):
        if (target := _place(model, params, gguf_path, name)) is None:
            continue  # another pipeline stage's tensor
        pname, shard, param = target
        owner = modules[pname.rsplit(".", 1)[0]]
        try:
            dense = None
            for sub, start, rows in split_fused(owner, shard, shape[0]):
                if len(shape) == 2 and gguf_placeable(owner, param, sub, qtype.name, shape[1]):
                    raw = np.array(data[start:start + rows]).view(np.uint8).reshape(rows, -1)  # F16 / BF16 too
                    place_gguf(owner, sub, qtype.name, torch.from_numpy(raw), [rows, shape[1]])
                else:
                    if dense is None:
                        dense = torch.from_numpy(dequantize(data, qtype).astype(np.float32).reshape(shape))
                    getattr(param, "weight_loader", default_weight_loader)(
                        param, dense if sub == shard else RowSection(dense, start, rows), sub)
                loaded.add(f"{pname}:{sub}")
        except ValueError as e:
            raise ModelConfigError(f"{gguf_path}: tensor {name!r}: {e}") from None
    check_all_loaded(model, loaded, gguf_path)
    finish_gguf(model)


def _place(model, params: dict, source, name: str):
    """(parameter name, shard id, parameter) of checkpoint tensor `name`, or None where this stage does
    not hold it; ModelConfigError where the model has no place for it."""
    target = map_name(model, name)
    if target is None:
        return None
    pname, shard = target
    param = params.get(pname)
    if param is None:
        raise ModelConfigError(f"{source}: tensor {name!r} has no place in the model ({model.cfg.architecture})")
    return pname, shard, param


def check_all_loaded(model, loaded: set[str], source) -> None:
    """Raises ModelConfigError naming the parameters (`name:shard`) that `loaded` lacks."""
    expected = {f"{pname}:{shard}" for pname, _ in model.named_parameters() for shard in _shards_of(pname)}
    missing = sorted(expected - loaded)
    if missing:
        raise ModelConfigError(f"{source}: checkpoint lacks tensors for {missing[:8]}"
                               f"{' ...' if len(missing) > 8 else ''}")


def default_weight_loader(param, loaded, shard_id=None) -> None:
    t = materialize(loaded)
    if tuple(t.shape) != tuple(param.shape):
        raise ValueError(f"checkpoint shape {tuple(t.shape)} does not fit parameter {tuple(param.shape)}")
    param.data.copy_(t)


def _shards_of(pname: str):
    if "qkv_proj" in pname:
        return ("q", "k", "v")
    if "gate_up_proj" in pname:
        return (0, 1)
    return (None,)


def map_name(model: LlamaForCausalLM, name: str):
    """(our parameter name, shard id) of checkpoint tensor `name`; None where this stage does not hold
    it; (name, None) for a name we do not know (the caller reports it)."""
    cfg = model.cfg
    if name == "model.embed_tokens.weight":
        if model.embed_tokens is not None:
            return "embed_tokens.weight", None
        return None
    if name == "lm_head.weight":
        if cfg.tie_word_embeddings:
            return None  # some tied checkpoints still carry a copy
        return ("lm_head.weight", None) if model.lm_head is not None else None
    if name == "model.norm.weight":
        return ("norm.weight", None) if model.norm is not None else None
    m = _LAYER.match(name)
    if not m:
        return (name, None)  # unknown: reported by the caller
    idx, rest = int(m.group(1)), m.group(2)
    if idx >= cfg.num_hidden_layers:
        return (name, None)
    if not model.layer_start <= idx < model.layer_end:
        return None
    local = idx - model.layer_start
    for src, (dst, shard) in _STACKED.items():
        if rest.startswith(src + "."):
            return f"layers.{local}.{dst}{rest[len(src):]}", shard
    for fused in _FUSED_NAMES:
        if rest.startswith(fused + "."):
            return f"layers.{local}.{rest}", FUSED
    return f"layers.{local}.{rest}", None


def build_model(cfg, model_dir, ctx=None, dtype: torch.dtype = torch.float32, device="cpu",
                pp_partition=None) -> LlamaForCausalLM:
    from engine.parallel import SINGLE
    with torch.device(device):
        model = LlamaForCausalLM(cfg, ctx or SINGLE, dtype, pp_partition)
    load_weights(model, model_dir)
    return model.eval()
