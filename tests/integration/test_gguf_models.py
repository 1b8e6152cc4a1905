"""GGUF files served as they are stored: a random Llama whose tensors mix every K-quant and legacy
format equals transformers on its dequantized conversion, in one process and over TP x PP ranks, and so
do a random qwen3 and phi3 file; HF checkpoints quantized at load into q8_0 / q4_0 equal transformers on
the same rounded weights."""

from pathlib import Path

import pytest
import torch
from helpers import assert_greedy_equal, check_cpu_kernel, hf_greedy, make_tiny_gguf

from engine import CacheConfig, DeviceConfig, EngineConfig, LLMEngine, SamplingParams, SchedulerConfig
from engine.config import ParallelConfig
from engine.errors import ModelFetchError
from engine.gguf import convert_gguf, metadata_dir
from engine.model_store import resolve_model

pytestmark = pytest.mark.integration

# every format the kernel takes, mixed inside merged projections (q/k beside v, gate beside up)
TYPES = {"attn_q": "Q4_K", "attn_k": "Q4_K", "attn_v": "Q6_K", "attn_output": "Q5_K", "ffn_gate": "Q4_0",
         "ffn_up": "Q4_1", "ffn_down": "Q6_K", "token_embd": "Q8_0", "output": "F16"}
PROMPTS = [[5, 17, 42, 99, 123, 7, 8], [200, 31, 64] * 9, list(range(3, 40)), [9, 9, 9, 10]]


@pytest.fixture(scope="module")
def gguf_model(tmp_path_factory):
    check_cpu_kernel("gguf_linear")
    root = tmp_path_factory.mktemp("gguf")
    path = make_tiny_gguf(root / "tiny-mix.gguf", TYPES)
    return path, resolve_model(str(path)), convert_gguf(path, root / "tiny-mix-f32", progress=False)


def engine(model_dir, tp=1, pp=1, kv="auto", max_len=None, **kw):
    # fp32, as the transformers reference computes (`auto` would be bf16 on a CPU with AMX)
    return LLMEngine(EngineConfig(str(model_dir), cache=CacheConfig(block_size=4, num_blocks=96, kv_cache_dtype=kv),
                                  device=DeviceConfig(dtype="float32"), scheduler=SchedulerConfig(max_model_len=max_len),
                                  parallel=ParallelConfig(tp=tp, pp=pp, timeout_s=30, pipeline_min_seqs=1), **kw))


def greedy(eng, n=16):
    res = eng.generate(PROMPTS, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, logprobs=0))
    return [r["outputs"][0] for r in res]


@pytest.fixture(scope="module")
def single(gguf_model):
    eng = engine(gguf_model[1])
    try:
        model = eng.executor.runner.model
        kept = {name: m.gguf.types for name, m in model.named_modules() if getattr(m, "gguf", None) is not None}
        return greedy(eng), kept
    finally:
        eng.shutdown()


def test_conversion_matches_transformers_gguf_loader(gguf_model):
    """Our fp32 conversion (the reference every test compares with) against transformers' own GGUF
    loader, tensor for tensor: block formats, Q/K row order, tied and untied heads. (The default
    model's tokenizer: tests/integration/test_smollm2.py.)"""
    pytest.importorskip("accelerate")  # transformers needs it to read GGUF
    from transformers import AutoModelForCausalLM

    path, _, converted = gguf_model
    theirs = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    ours = AutoModelForCausalLM.from_pretrained(str(converted), dtype=torch.float32)
    sd_theirs, sd_ours = theirs.state_dict(), ours.state_dict()
    assert sd_ours.keys() == sd_theirs.keys()
    for name, t in sd_ours.items():
        assert torch.equal(t, sd_theirs[name]), name


def test_a_gguf_path_is_a_model_directory(gguf_model):
    path, model_dir, _ = gguf_model
    assert model_dir.name == "tiny-mix"  # the name it is served as
    assert (model_dir / "model.gguf").resolve() == path.resolve()
    assert {"config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= \
        {p.name for p in model_dir.iterdir()}
    assert resolve_model(str(path)) == model_dir  # written once


def test_weights_stay_in_their_formats_and_greedy_equals_transformers(gguf_model, single):
    outs, kept = single
    assert kept["embed_tokens"] == ["Q8_0"] and kept["lm_head"] == ["F16"]
    assert kept["layers.0.self_attn.qkv_proj"] == ["Q4_K", "Q6_K"]
    assert kept["layers.1.mlp.gate_up_proj"] == ["Q4_0", "Q4_1"]
    assert kept["layers.1.self_attn.o_proj"] == ["Q5_K"] and kept["layers.1.mlp.down_proj"] == ["Q6_K"]
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(gguf_model[2]), dtype=torch.float32).eval()
    for i, (p, out) in enumerate(zip(PROMPTS, outs)):
        ref = hf_greedy(hf, p, 16)
        tie = assert_greedy_equal(out["token_ids"], ref, f"prompt {i}")
        n = 16 if tie is None else tie
        diff = max(abs(lp.logprob - want) for lp, want in zip(out["logprobs"][:n], ref.logprobs[:n]))
        # the dense engine on the converted copy differs from transformers by up to 2.3e-4 on this model
        # too (logits of a 256-wide random model): fp32 rounding, not the formats
        assert diff < 5e-4, f"prompt {i}: logprob differs by {diff:.2e}"


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_parallel_ranks_equal_one_process(gguf_model, single, tp, pp):
    """TP splits rows (whole rows of blocks) and columns (o_proj, down_proj: 128 columns a rank is not
    whole 256-weight K-quant blocks, so those shards load dense): the same tokens either way."""
    eng = engine(gguf_model[1], tp, pp)
    try:
        assert [o["token_ids"] for o in greedy(eng)] == [o["token_ids"] for o in single[0]]
    finally:
        eng.shutdown()


def test_quantization_on_a_gguf_is_refused(gguf_model):
    with pytest.raises(ValueError, match="GGUF"):
        EngineConfig(str(gguf_model[1]), quantization="q8_0")


def test_an_unsupported_gguf_is_named(tmp_path):
    from gguf import GGUFWriter

    path = tmp_path / "other.gguf"
    w = GGUFWriter(str(path), "mamba")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelFetchError, match=r"other\.gguf.*general\.architecture.*mamba"):
        metadata_dir(path, tmp_path / "out")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf")
    with pytest.raises(ModelFetchError, match="not a readable GGUF"):
        resolve_model(str(tmp_path / "junk.gguf"))


@pytest.mark.parametrize("name", ["q8_0", "q4_0"])
def test_quantization_at_load_equals_transformers_on_the_rounded_weights(tiny_llama, name):
    check_cpu_kernel("gguf_linear")
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize
    from transformers import AutoModelForCausalLM

    eng = engine(tiny_llama, quantization=name)
    try:
        outs = greedy(eng, 12)
        model = eng.executor.runner.model
        assert model.layers[0].mlp.down_proj.gguf.types == [name.upper()]
    finally:
        eng.shutdown()
    hf = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32).eval()
    qtype = GGMLQuantizationType[name.upper()]
    with torch.no_grad():
        for pname, p in hf.named_parameters():
            if p.dim() == 2 and "embed_tokens" not in pname:  # linear layers and the LM head
                p.copy_(torch.from_numpy(dequantize(quantize(p.numpy(), qtype), qtype)))
    for i, (p, out) in enumerate(zip(PROMPTS, outs)):
        assert_greedy_equal(out["token_ids"], hf_greedy(hf, p, 12), f"prompt {i}")


def test_default_model_is_served_from_its_gguf(smollm2_dir):
    from engine.gguf import gguf_file

    assert gguf_file(smollm2_dir) is not None and Path(smollm2_dir).name == "SmolLM2-135M-Instruct"
    assert not list(Path(smollm2_dir).glob("*.safetensors"))


@pytest.mark.parametrize("kv", ["auto", "int8", "fp8_e4m3"])
def test_the_fused_decode_step_equals_the_layer_by_layer_path(gguf_model, single, monkeypatch, kv):
    """Decode-only steps run every layer in one call (engine/kernels/decode_step.c); the layer-by-layer
    path, the same kernels called from Python, gives the same tokens and logprobs within rounding (its
    silu is torch's). With an fp32 KV cache and a quantized one (--kv-cache-dtype)."""
    from engine import kernels

    calls = []
    real = kernels.DecodeStep.__call__
    monkeypatch.setattr(kernels.DecodeStep, "__call__", lambda self, *a: calls.append(1) or real(self, *a))
    eng = engine(gguf_model[1], kv=kv)
    try:
        fused = greedy(eng)
    finally:
        eng.shutdown()
    assert len(calls) >= 15  # every decode step (all prompts decode together) went through it
    monkeypatch.setattr("engine.model.decode_step", lambda: None)
    eng = engine(gguf_model[1], kv=kv)
    try:
        layered = greedy(eng)
    finally:
        eng.shutdown()
    # a quantized cache turns a last-bit difference of a k or v into a code's step now and then (fp8: 1/16)
    tol = 1e-5 if kv == "auto" else 1e-4
    for a, b in zip(fused, layered):
        assert a["token_ids"] == b["token_ids"]
        assert max(abs(x.logprob - y.logprob) for x, y in zip(a["logprobs"], b["logprobs"])) < tol


@pytest.mark.parametrize("arch", ["qwen3", "phi3"])
def test_qwen3_and_phi3_ggufs_equal_transformers(tmp_path, arch, monkeypatch):
    """qwen3 (q/k norms, head_dim 128 beside 256 / 4) and phi3 (fused attn_qkv and ffn_up, LongRoPE factors
    as tensors) files: our conversion is transformers' own GGUF reading tensor for tensor, the weights stay
    in their formats, and greedy decoding equals transformers on the conversion (context limit 64:
    LongRoPE's short factors, as transformers takes for these short sequences), phi3 over TP 2 too. The
    fused C decode step takes phi3 (its RoPE comes in as cos/sin) and refuses qwen3 (no q/k norm in it)."""
    check_cpu_kernel("gguf_linear")
    from engine import kernels

    types = {"attn_q": "Q4_K", "attn_k": "Q4_K", "attn_v": "Q6_K", "attn_qkv": "Q4_K", "attn_output": "Q5_K",
             "ffn_gate": "Q4_0", "ffn_up": "Q4_1", "ffn_down": "Q6_K", "token_embd": "Q8_0", "output": "F16"}
    path = make_tiny_gguf(tmp_path / f"tiny-{arch}.gguf", types, arch=arch)
    model_dir, converted = resolve_model(str(path)), convert_gguf(path, tmp_path / "f32", progress=False)
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(converted), dtype=torch.float32).eval()
    try:
        import accelerate  # noqa: F401  transformers needs it to read GGUF
        theirs = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        sd_theirs = theirs.state_dict()
        assert hf.state_dict().keys() == sd_theirs.keys()
        for name, t in hf.state_dict().items():
            assert torch.equal(t, sd_theirs[name]), name
    except ImportError:
        pass
    calls = []
    real = kernels.DecodeStep.__call__
    monkeypatch.setattr(kernels.DecodeStep, "__call__", lambda self, *a: calls.append(1) or real(self, *a))
    eng = engine(model_dir, max_len=64)
    try:
        attn = eng.executor.runner.model.layers[0].self_attn
        assert attn.qkv_proj.gguf.types == (["Q4_K", "Q6_K"] if arch == "qwen3" else ["Q4_K"])
        outs = greedy(eng)
    finally:
        eng.shutdown()
    assert (len(calls) > 0) == (arch == "phi3" and kernels.decode_step() is not None)
    for i, (p, out) in enumerate(zip(PROMPTS, outs)):
        assert_greedy_equal(out["token_ids"], hf_greedy(hf, p, 16), f"{arch} prompt {i}")
    if arch == "phi3":  # each rank's rows of q, k, v and of gate, up, cut out of the fused blocks
        eng = engine(model_dir, tp=2, max_len=64)
        try:
            assert [o["token_ids"] for o in greedy(eng)] == [o["token_ids"] for o in outs]
        finally:
            eng.shutdown()
