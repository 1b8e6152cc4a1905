"""Tensor- and pipeline-parallel model shards (real processes, gloo) equal the single-process model."""

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import make_tiny_model

pytestmark = pytest.mark.integration
RANKS = str(Path(__file__).resolve().parents[1] / "mp_ranks.py")
STEPS = 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_replica(model_dir, tp, pp, out):
    port = free_port()
    procs = [subprocess.Popen([sys.executable, RANKS, str(r), str(tp), str(pp), str(port), str(model_dir),
                               str(STEPS), str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(tp * pp)]
    errs = []
    try:
        for p in procs:
            _, err = p.communicate(timeout=180)
            errs.append(err)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(e[-2000:] for e in errs)
    from safetensors.torch import load_file
    return load_file(str(out) + ".safetensors")


@pytest.fixture(scope="module")
def tiny_gqa(tmp_path_factory):
    # 4 query heads, 2 KV heads, 4 layers, untied head: TP 2 splits heads; TP 4 replicates KV heads
    return make_tiny_model(tmp_path_factory.mktemp("tiny-mp"), "llama", seed=3)


@pytest.fixture(scope="module")
def reference(tiny_gqa, tmp_path_factory):
    return run_replica(tiny_gqa, 1, 1, tmp_path_factory.mktemp("ref") / "ref")


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2), (2, 2), (4, 1)])
def test_shards_equal_the_single_process_model(tiny_gqa, reference, tmp_path, tp, pp):
    got = run_replica(tiny_gqa, tp, pp, tmp_path / "out")
    assert got["tokens"].tolist() == reference["tokens"].tolist()
    assert torch.allclose(got["logits"], reference["logits"], atol=1e-4, rtol=1e-4)


def test_qwen2_biases_and_tied_embeddings_shard(tmp_path):
    d = make_tiny_model(tmp_path / "m", "qwen2", seed=4, tie_word_embeddings=True)
    ref = run_replica(d, 1, 1, tmp_path / "ref")
    got = run_replica(d, 2, 2, tmp_path / "out")
    assert got["tokens"].tolist() == ref["tokens"].tolist()
    assert torch.allclose(got["logits"], ref["logits"], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ["qwen3", "phi3"])
def test_qwen3_and_phi3_shard(tmp_path, arch):
    """Qwen3's q/k norms (whole on each rank) and Phi-3's fused projections, cut per rank, over TP 2 x PP 2."""
    d = make_tiny_model(tmp_path / "m", arch, seed=4)
    ref = run_replica(d, 1, 1, tmp_path / "ref")
    got = run_replica(d, 2, 2, tmp_path / "out")
    assert got["tokens"].tolist() == ref["tokens"].tolist()
    assert torch.allclose(got["logits"], ref["logits"], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("tp", [2, 4])
def test_fused_checkpoint_tensors_load_as_the_separate_ones(tmp_path, tp):
    """Each TP rank's weights from Phi-3's fused qkv_proj / gate_up_proj equal those from the same numbers
    stored apart (q_proj, k_proj, v_proj, gate_proj, up_proj), KV heads replicated at tp 4 > 2 included."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    from engine.config import ModelConfig
    from engine.loader import build_model
    from engine.parallel import ParallelContext

    fused = make_tiny_model(tmp_path / "fused", "phi3", seed=7)
    cfg = ModelConfig.from_dir(fused)
    q, kv, inter = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim, \
        cfg.intermediate_size
    apart = tmp_path / "apart"
    shutil.copytree(fused, apart)
    tensors = {}
    for name, t in load_file(str(fused / "model.safetensors")).items():
        if name.endswith("qkv_proj.weight"):
            stem = name[:-len("qkv_proj.weight")]
            for part, rows in zip(("q_proj", "k_proj", "v_proj"), t.split([q, kv, kv])):
                tensors[f"{stem}{part}.weight"] = rows.clone()
        elif name.endswith("gate_up_proj.weight"):
            stem = name[:-len("gate_up_proj.weight")]
            for part, rows in zip(("gate_proj", "up_proj"), t.split([inter, inter])):
                tensors[f"{stem}{part}.weight"] = rows.clone()
        else:
            tensors[name] = t
    save_file(tensors, str(apart / "model.safetensors"), metadata={"format": "pt"})
    raw = json.loads((apart / "config.json").read_text())
    (apart / "config.json").write_text(json.dumps({**raw, "architectures": ["LlamaForCausalLM"]}))
    for rank in range(tp):
        ctx = ParallelContext(tp_rank=rank, tp_size=tp)
        a = build_model(cfg, fused, ctx).state_dict()
        b = build_model(ModelConfig.from_dir(apart), apart, ctx).state_dict()
        assert a.keys() == b.keys()
        for name, t in a.items():
            assert torch.equal(t, b[name]), (rank, name)
