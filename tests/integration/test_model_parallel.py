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
