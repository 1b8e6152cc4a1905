import json
import math

import pytest

from engine.config import CacheConfig, ModelConfig, parse_size
from engine.errors import ModelConfigError

BASE = {"architectures": ["LlamaForCausalLM"], "vocab_size": 100, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}


def write(tmp_path, **changes):
    cfg = dict(BASE)
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return tmp_path


def test_reads_a_llama_config(tmp_path):
    c = ModelConfig.from_dir(write(tmp_path, rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                                           "original_max_position_embeddings": 8192}))
    assert c.head_dim == 16 and c.num_key_value_heads == 2 and c.rope_scaling.rope_type == "llama3"


@pytest.mark.parametrize("changes,needle", [
    ({"architectures": ["GPT2LMHeadModel"]}, "architectures"),
    ({"hidden_size": None}, "hidden_size"),
    ({"vocab_size": -1}, "vocab_size"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling.rope_type"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"pretraining_tp": 2}, "pretraining_tp"),
])
def test_bad_fields_are_named_with_the_file(tmp_path, changes, needle):
    d = write(tmp_path, **changes)
    with pytest.raises(ModelConfigError) as e:
        ModelConfig.from_dir(d)
    assert needle in str(e.value) and "config.json" in str(e.value)


PHI3 = {"architectures": ["Phi3ForCausalLM"], "max_position_embeddings": 512, "original_max_position_embeddings": 64,
        "rope_scaling": {"type": "su", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8}}


def test_reads_qwen3_and_phi3_configs(tmp_path):
    (tmp_path / "q").mkdir()
    (tmp_path / "p").mkdir()
    q = ModelConfig.from_dir(write(tmp_path / "q", architectures=["Qwen3ForCausalLM"], head_dim=32))
    assert q.qk_norm and q.head_dim == 32 and not q.attention_bias and not q.o_proj_bias
    assert ModelConfig.from_dict({**BASE, "architectures": ["Qwen3ForCausalLM"]}).head_dim == 128  # Qwen3Config's
    p = ModelConfig.from_dir(write(tmp_path / "p", **PHI3))
    rope = p.rope_scaling
    assert rope.rope_type == "longrope" and rope.original_max_position_embeddings == 64  # 'su' is longrope
    assert rope.short_factor == (1.0,) * 8 and rope.long_factor == (2.0,) * 8
    assert rope.attention_factor == pytest.approx((1 + math.log(8) / math.log(64)) ** 0.5)  # transformers' default
    # the context limit picks the factor set: long past the original context, short within it
    assert rope.use_long_factor and not p.with_context_limit(64).rope_scaling.use_long_factor
    assert p.with_context_limit(65).rope_scaling.use_long_factor
    assert p.identity() != p.with_context_limit(64).identity()  # other KV: other prefix hashes
    assert not p.qk_norm and p.with_context_limit(64).max_model_len == 512
    windowed = ModelConfig.from_dict({**BASE, **PHI3, "sliding_window": 48})
    assert windowed.max_model_len == 48 and not windowed.rope_scaling.use_long_factor  # the window caps the context


@pytest.mark.parametrize("changes,needle", [
    ({"rope_scaling": {**PHI3["rope_scaling"], "short_factor": [1.0] * 7}}, "rope_scaling.short_factor"),
    ({"rope_scaling": {**PHI3["rope_scaling"], "long_factor": None}}, "rope_scaling.long_factor"),
    ({"rope_scaling": {**PHI3["rope_scaling"], "long_factor": [0.0] * 8}}, "rope_scaling.long_factor"),
    ({"rope_scaling": None, "rope_parameters": {**PHI3["rope_scaling"], "partial_rotary_factor": 0.75}},
     "rope_parameters.partial_rotary_factor"),
    ({"rope_scaling": {**PHI3["rope_scaling"], "type": "yarn"}}, "rope_scaling.rope_type"),
    ({"original_max_position_embeddings": 0}, "original_max_position_embeddings"),
    ({"head_dim": 15}, "head_dim"),
])
def test_bad_phi3_and_qwen3_fields_are_named_with_the_file(tmp_path, changes, needle):
    d = write(tmp_path, **{**PHI3, **changes})
    with pytest.raises(ModelConfigError) as e:
        ModelConfig.from_dir(d)
    assert needle in str(e.value) and "config.json" in str(e.value)


def test_missing_directory_and_file(tmp_path):
    with pytest.raises(ModelConfigError, match="does not exist"):
        ModelConfig.from_dir(tmp_path / "nope")
    with pytest.raises(ModelConfigError, match="config.json"):
        ModelConfig.from_dir(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelConfigError, match="not valid JSON"):
        ModelConfig.from_dir(tmp_path)


def test_identity_ignores_the_path_and_names_the_shape(tmp_path):
    for name in "abc":
        (tmp_path / name).mkdir()
    a = ModelConfig.from_dir(write(tmp_path / "a"))
    b = ModelConfig.from_dir(write(tmp_path / "b"))
    assert a.path != b.path and a.identity() == b.identity()  # one checkpoint copied to two places
    assert ModelConfig.from_dir(write(tmp_path / "c", num_hidden_layers=3)).identity() != a.identity()


def test_mistral_sliding_window_caps_the_context(tmp_path):
    c = ModelConfig.from_dir(write(tmp_path, architectures=["MistralForCausalLM"], sliding_window=256,
                                   max_position_embeddings=4096))
    assert c.max_model_len == 256


def test_sizes_and_cache_config():
    assert parse_size("2GiB") == 2 * 2**30 and parse_size("512MiB") == 512 * 2**20
    assert parse_size("1.5GB") == 1_500_000_000 and parse_size(1000) == 1000
    with pytest.raises(ValueError, match="unknown unit"):
        parse_size("3 parsecs")
    with pytest.raises(ValueError, match="block_size"):
        CacheConfig(block_size=12)


def test_cli_engine_flags_reach_the_device_config(tiny_llama):
    import argparse

    from cluster.cli_common import build_engine_config, engine_args

    p = argparse.ArgumentParser()
    engine_args(p)
    assert build_engine_config(p.parse_args(["--model", str(tiny_llama)])).device.packed_linear is True
    off = build_engine_config(p.parse_args(["--model", str(tiny_llama), "--no-packed-linear", "--threads", "2"]))
    assert off.device.packed_linear is False and off.device.num_threads == 2
