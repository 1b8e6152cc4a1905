"""Load a Hugging Face checkpoint directory's safetensors into a (possibly sharded) model.

Files are memory-mapped (`safe_open`); each parameter's `weight_loader` reads only this rank's slice
through a lazy slice, so a TP rank never materialises the whole tensor and a PP stage skips the
layers it does not hold.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open

from engine.errors import ModelConfigError
from engine.layers.linear import materialize
from engine.model import LlamaForCausalLM

# checkpoint name suffix -> (our parameter suffix, shard id)
_STACKED = {
    "self_attn.q_proj": ("self_attn.qkv_proj", "q"),
    "self_attn.k_proj": ("self_attn.qkv_proj", "k"),
    "self_attn.v_proj": ("self_attn.qkv_proj", "v"),
    "mlp.gate_proj": ("mlp.gate_up_proj", 0),
    "mlp.up_proj": ("mlp.gate_up_proj", 1),
}
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
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    for file in safetensors_files(model_dir):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                if _IGNORED.search(name):
                    continue
                target = _map_name(model, name)
                if target is None:
                    continue  # another pipeline stage's tensor
                pname, shard = target
                param = params.get(pname)
                if param is None:
                    raise ModelConfigError(f"{file}: tensor {name!r} has no place in the model "
                                           f"({model.cfg.architecture})")
                try:
                    loader = getattr(param, "weight_loader", default_weight_loader)
                    loader(param, f.get_slice(name), shard)
                except ValueError as e:
                    raise ModelConfigError(f"{file}: tensor {name!r}: {e}") from None
                loaded.add(f"{pname}:{shard}")
    expected = set()
    for pname in params:
        for shard in _shards_of(pname):
            expected.add(f"{pname}:{shard}")
    missing = sorted(expected - loaded)
    if missing:
        raise ModelConfigError(f"{model_dir}: checkpoint lacks tensors for {missing[:8]}"
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


def _map_name(model: LlamaForCausalLM, name: str):
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
    return f"layers.{local}.{rest}", None


def build_model(cfg, model_dir, ctx=None, dtype: torch.dtype = torch.float32, device="cpu",
                pp_partition=None) -> LlamaForCausalLM:
    from engine.parallel import SINGLE
    with torch.device(device):
        model = LlamaForCausalLM(cfg, ctx or SINGLE, dtype, pp_partition)
    load_weights(model, model_dir)
    return model.eval()
