"""Typed configuration: one struct per concern, validated where it is built.

`ModelConfig` is read from a Hugging Face `config.json`; every field we depend on is checked, and
fields that would change the computation in ways we don't implement are refused by name rather than
silently ignored.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from engine.errors import ModelConfigError

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Phi3ForCausalLM": "phi3",
}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "longrope")
SUPPORTED_ACTIVATIONS = ("silu",)
DTYPES = ("float32", "bfloat16", "float16")
# what a user may ask for: a dtype, or `auto` (engine/platform.py: resolve_dtype, on the worker's own host)
DTYPE_CHOICES = ("auto", *DTYPES)
KV_CACHE_DTYPES = ("auto", "int8", "fp8_e4m3")  # engine/kv_quant.py


@dataclass(frozen=True)
class RopeScaling:
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    # longrope (Phi-3; `su` in older configs): a divisor per frequency for contexts up to
    # original_max_position_embeddings (short) and one for longer ones (long), and a factor on cos and sin
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()
    attention_factor: float = 1.0
    # NOTE: Hugging Face picks short or long per forward pass, by the longest sequence in it (and its
    # generate() recomputes the KV cache when a sequence crosses over). A paged cache shared between
    # sequences, prefixes and workers needs one choice for all: the long factors iff the context limit
    # exceeds original_max_position_embeddings (vLLM's and llama.cpp's choice). `ModelConfig.with_context_limit`
    # sets it from the engine's max_model_len.
    use_long_factor: bool = False


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a Llama-family decoder. Built by `ModelConfig.from_dir` or directly in tests."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    attention_bias: bool = False  # bias on q/k/v (Qwen2) -- o_proj never has one in Qwen2
    qk_norm: bool = False  # RMSNorm over each head of q and k before RoPE (Qwen3)
    o_proj_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    sliding_window: int | None = None
    weights: str = ""  # how the weights are stored where not plain tensors: "gguf:Q4_1,Q8_0,..." (engine/gguf.py)
    path: str | None = None

    @property
    def max_model_len(self) -> int:
        # NOTE: sliding-window attention is not implemented; within the window full attention is
        # exact, so the usable context is capped at the window.
        if self.sliding_window:
            return min(self.max_position_embeddings, self.sliding_window)
        return self.max_position_embeddings

    def with_context_limit(self, max_model_len: int | None) -> ModelConfig:
        """This config for an engine whose context ends at `max_model_len` (None: the model's own): with
        longrope, the factor set that context takes (see RopeScaling.use_long_factor)."""
        rope = self.rope_scaling
        if rope.rope_type != "longrope":
            return self
        limit = min(max_model_len or self.max_model_len, self.max_model_len)
        return replace(self, rope_scaling=replace(rope, use_long_factor=limit > rope.original_max_position_embeddings))

    def identity(self) -> str:
        """Every field but the path, as canonical JSON: the same checkpoint gives the same string on any
        host, wherever its directory is (a seed for prefix-block hashes)."""
        fields = asdict(self)
        del fields["path"]
        return json.dumps(fields, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> ModelConfig:
        path = Path(path)
        cfg_file = path / "config.json"
        if not path.is_dir():
            raise ModelConfigError(f"model directory {str(path)!r} does not exist")
        if not cfg_file.is_file():
            raise ModelConfigError(f"{cfg_file}: missing (a Hugging Face checkpoint needs config.json)")
        try:
            raw = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as e:
            raise ModelConfigError(f"{cfg_file}: not valid JSON ({e})") from None
        gen_file = path / "generation_config.json"
        gen = {}
        if gen_file.is_file():
            try:
                gen = json.loads(gen_file.read_text())
            except json.JSONDecodeError as e:
                raise ModelConfigError(f"{gen_file}: not valid JSON ({e})") from None
        return cls.from_dict(raw, source=str(cfg_file), generation=gen, path=str(path))

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config", generation: dict | None = None,
                  path: str | None = None) -> ModelConfig:
        def need(name: str, typ=int):
            if name not in raw or raw[name] is None:
                raise ModelConfigError(f"{source}: required field {name!r} is missing")
            v = raw[name]
            if typ is int and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
                raise ModelConfigError(f"{source}: field {name!r} must be a positive integer, got {v!r}")
            return v

        archs = raw.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise ModelConfigError(
                f"{source}: field 'architectures' = {archs!r} is not supported; "
                f"supported: {sorted(SUPPORTED_ARCHITECTURES)}")
        act = raw.get("hidden_act", "silu")
        if act not in SUPPORTED_ACTIVATIONS:
            raise ModelConfigError(f"{source}: field 'hidden_act' = {act!r} is not supported "
                                   f"(supported: {SUPPORTED_ACTIVATIONS})")
        if raw.get("pretraining_tp", 1) not in (1, None):
            raise ModelConfigError(f"{source}: field 'pretraining_tp' = {raw['pretraining_tp']!r} "
                                   "is not supported (only 1)")
        hidden = need("hidden_size")
        heads = need("num_attention_heads")
        kv_heads = raw.get("num_key_value_heads") or heads
        if not isinstance(kv_heads, int) or heads % kv_heads:
            raise ModelConfigError(f"{source}: field 'num_key_value_heads' = {kv_heads!r} must divide "
                                   f"num_attention_heads = {heads}")
        # Qwen3's config class defaults head_dim to 128, not hidden_size // num_attention_heads
        head_dim = raw.get("head_dim") or (128 if arch == "Qwen3ForCausalLM" else hidden // heads)
        if not isinstance(head_dim, int) or isinstance(head_dim, bool) or head_dim <= 0 or head_dim % 2:
            raise ModelConfigError(f"{source}: field 'head_dim' = {head_dim!r} must be a positive even integer "
                                   "(RoPE rotates pairs)")
        max_pos = raw.get("max_position_embeddings") or 2048
        rope = _parse_rope(raw, source, arch, head_dim, max_pos)
        if raw.get("partial_rotary_factor", 1.0) != 1.0:
            raise ModelConfigError(f"{source}: field 'partial_rotary_factor' = "
                                   f"{raw['partial_rotary_factor']!r} is not supported (only 1.0)")
        sliding = None
        windowed_layers = arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM")  # use_sliding_window, max_window_layers
        if arch in ("MistralForCausalLM", "Phi3ForCausalLM") or (windowed_layers and raw.get("use_sliding_window")):
            sliding = raw.get("sliding_window")
        if windowed_layers and raw.get("use_sliding_window") and \
                raw.get("max_window_layers", 0) < raw.get("num_hidden_layers", 0):
            raise ModelConfigError(f"{source}: field 'use_sliding_window' = true with max_window_layers "
                                   "below num_hidden_layers is not supported")
        generation = generation or {}
        eos = generation.get("eos_token_id", raw.get("eos_token_id"))
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if isinstance(eos, int) else ())
        attn_bias = bool(raw.get("attention_bias", False)) or arch == "Qwen2ForCausalLM"
        model = cls(
            architecture=arch,
            vocab_size=need("vocab_size"),
            hidden_size=hidden,
            intermediate_size=need("intermediate_size"),
            num_hidden_layers=need("num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            max_position_embeddings=max_pos,
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=float(raw.get("rope_theta", (raw.get("rope_parameters") or {}).get("rope_theta", 10000.0))),
            rope_scaling=rope,
            attention_bias=attn_bias,
            qk_norm=arch == "Qwen3ForCausalLM",
            o_proj_bias=bool(raw.get("attention_bias", False)) and arch != "Qwen2ForCausalLM",
            mlp_bias=bool(raw.get("mlp_bias", False)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            eos_token_ids=eos_ids,
            bos_token_id=generation.get("bos_token_id", raw.get("bos_token_id")),
            sliding_window=sliding,
            weights=str(raw.get("tandem_weights", "")),
            path=path,
        )
        return model.with_context_limit(None)


def _parse_rope(raw: dict, source: str, arch: str, head_dim: int, max_pos: int) -> RopeScaling:
    key = "rope_scaling" if raw.get("rope_scaling") is not None else "rope_parameters"  # transformers 5's name
    rs = raw.get(key)
    if not rs:
        return RopeScaling()
    rtype = rs.get("rope_type", rs.get("type", "default"))
    if rtype == "su":  # longrope's first name (early Phi-3 configs)
        rtype = "longrope"
    if rtype not in SUPPORTED_ROPE_TYPES:
        raise ModelConfigError(f"{source}: field '{key}.rope_type' = {rtype!r} is not supported "
                               f"(supported: {SUPPORTED_ROPE_TYPES})")
    if rs.get("partial_rotary_factor", 1.0) != 1.0:
        raise ModelConfigError(f"{source}: field '{key}.partial_rotary_factor' = "
                               f"{rs['partial_rotary_factor']!r} is not supported (only 1.0)")
    if rtype != "longrope":
        return RopeScaling(
            rope_type=rtype,
            factor=float(rs.get("factor", 1.0)),
            low_freq_factor=float(rs.get("low_freq_factor", 1.0)),
            high_freq_factor=float(rs.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(rs.get("original_max_position_embeddings", 8192)),
        )
    # transformers' _compute_longrope_parameters, with Phi3Config's rule that a top-level
    # original_max_position_embeddings (default 4096) wins over the one inside the rope settings
    if arch == "Phi3ForCausalLM":
        original = raw.get("original_max_position_embeddings", 4096)
    else:
        original = rs.get("original_max_position_embeddings", raw.get("original_max_position_embeddings", max_pos))
    if not isinstance(original, int) or isinstance(original, bool) or original <= 0:
        raise ModelConfigError(f"{source}: field 'original_max_position_embeddings' = {original!r} must be a "
                               "positive integer")
    factors = {}
    for name in ("short_factor", "long_factor"):
        f = rs.get(name)
        if not isinstance(f, list) or len(f) != head_dim // 2 or \
                not all(isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0 for x in f):
            raise ModelConfigError(f"{source}: field '{key}.{name}' = {f!r:.80} must be a list of "
                                   f"{head_dim // 2} positive numbers (one per pair of the head's {head_dim} dims)")
        factors[name] = tuple(float(x) for x in f)
    attention_factor = rs.get("attention_factor")
    if attention_factor is None:
        factor = rs.get("factor") or max_pos / original
        attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    return RopeScaling(rope_type="longrope", factor=float(rs.get("factor") or max_pos / original),
                       original_max_position_embeddings=original, attention_factor=float(attention_factor),
                       **factors)


def option(default: Any, help: str, *, name: str | None = None, choices: tuple[str, ...] | None = None,
           parse=None) -> Any:
    """A field users set. cluster/options.py makes a flag and a cluster-file key of it: `--block-size` and
    `block_size` (a switch that is on by default is turned off with `--no-NAME`). `name`: the flag's and
    key's name where it is not the field's; `choices`: the values allowed; `parse`: turns the text a user writes
    into the field's value (sizes). A field without it is set in code only (tests, tuning)."""
    return field(default=default, metadata={"help": help, "name": name, "choices": choices, "parse": parse})


def parse_size(value: str | int | None) -> int | None:
    """'2GiB', '512MiB', '1.5GB', '1000000' -> bytes."""
    if value is None or isinstance(value, int):
        return value
    s = str(value).strip()
    units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
             "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "b": 1, "": 1}
    num = s.rstrip("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
    unit = s[len(num):].strip().lower()
    if unit not in units:
        raise ValueError(f"size {value!r}: unknown unit {unit!r} (use B, KiB, MiB, GiB, KB, MB, GB)")
    try:
        n = float(num)
    except ValueError:
        raise ValueError(f"size {value!r} is not a number with a unit") from None
    if n <= 0:
        raise ValueError(f"size {value!r} must be positive")
    return int(n * units[unit])


@dataclass(frozen=True)
class CacheConfig:
    """KV cache: block size and how much memory it takes (bytes, or a fraction of what is free)."""

    block_size: int = option(16, "tokens per KV block (a power of two)")
    # bytes; wins over the fraction
    kv_cache_memory: int | None = option(None, "KV cache size, e.g. 512MiB or 2GiB; unset: a share of the "
                                         "free memory", parse=parse_size)
    kv_cache_memory_fraction: float = 0.9  # of free device memory (GPU), after weights
    cpu_kv_cache_default: int = 2**30  # CPU default when no size is given (zeroing it costs time)
    enable_prefix_caching: bool = option(True, "reuse the KV of shared prompt prefixes", name="prefix_caching")
    kv_cache_dtype: str = option("auto", "what the KV cache stores: auto = the model's dtype; int8, fp8_e4m3 = one "
                                 "byte a value and an fp32 scale per token and KV head (~3.8x the tokens of fp32 "
                                 "at head size 64; lossy)", choices=KV_CACHE_DTYPES)
    num_blocks: int | None = None  # exact block count: overrides the memory budget (tests, profiling)

    def __post_init__(self):
        if self.num_blocks is not None and self.num_blocks <= 0:
            raise ValueError(f"num_blocks = {self.num_blocks!r} must be positive")
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size = {self.block_size!r} must be a positive power of two")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ValueError(f"kv_cache_memory = {self.kv_cache_memory!r} must be positive")
        if not 0 < self.kv_cache_memory_fraction <= 1:
            raise ValueError(f"kv_cache_memory_fraction = {self.kv_cache_memory_fraction!r} "
                             "must be in (0, 1]")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype = {self.kv_cache_dtype!r} must be one of {KV_CACHE_DTYPES}")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = option(256, "running sequences at most")
    max_num_batched_tokens: int = option(2048, "token budget per step (chunked prefill splits longer prompts)")
    max_model_len: int | None = option(None, "context limit, prompt + output (default: the model's)")

    def __post_init__(self):
        if self.max_num_seqs <= 0:
            raise ValueError(f"max_num_seqs = {self.max_num_seqs!r} must be positive")
        if self.max_num_batched_tokens <= 0:
            raise ValueError(f"max_num_batched_tokens = {self.max_num_batched_tokens!r} must be positive")


@dataclass(frozen=True)
class DeviceConfig:
    device: str = option("cpu", "cpu, cuda or cuda:N")
    dtype: str = option("auto", "dtype of weights, activations and KV cache; auto = bfloat16 on a GPU that computes "
                               "it (else float16) and on a CPU with AVX-512 bf16 or AMX, else float32",
                        choices=DTYPE_CHOICES)
    # 2 threads made small models 15-40x slower when several processes shared 2 cores
    num_threads: int = option(1, "torch intra-op threads per process", name="threads")
    seed: int = 0
    tune_malloc: bool = True  # CPU: keep freed memory in the heap (engine/platform.py)
    packed_linear: bool = option(True, "CPU: dense weights prepacked for oneDNN where it supports the dtype")
    # engine/kernels/gguf_linear.c
    int8_activations: bool = option(False, "CPU, GGUF Q4_0/Q4_1/Q8_0 weights: round a small batch's activations to "
                                           "int8 per 32 values for the matmul, as llama.cpp does (faster, lossy)")

    def __post_init__(self):
        if self.dtype not in DTYPE_CHOICES:
            raise ValueError(f"dtype = {self.dtype!r} must be one of {DTYPE_CHOICES}")
        if self.num_threads <= 0:
            raise ValueError(f"num_threads = {self.num_threads!r} must be positive")


QUANTIZATIONS = ("none", "int8", "q8_0", "q4_0")
SPECULATIVE = ("none", "ngram")


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding (engine/spec_decode.py)."""

    method: str = option("none", "speculative decoding: ngram = guess the next tokens from an earlier occurrence of "
                         "the last few (prompt lookup); draft:PATH = a draft model with the target's tokenizer "
                         "guesses them (greedy, its own KV cache); exact: the output is the one without it",
                         name="speculative")
    num_tokens: int = option(4, "tokens a speculating sequence guesses per step", name="num_speculative_tokens")
    draft_quantization: str = option("none", "the draft model's weight quantization at load (as --quantization; a "
                                     "draft's rounding changes only which guesses hold)", choices=QUANTIZATIONS)
    ngram_min: int = 2  # the shortest suffix the n-gram lookup matches
    ngram_max: int = 4  # ... and the longest (tried first)
    # below this, each step speculates when the engine's measured step times say it pays
    # (engine/spec_decode.py SpeculationPolicy)
    max_batch: int = option(64, "decoding sequences above which a step never speculates (below, the engine's "
                            "measured step times decide)", name="speculative_max_batch")

    def __post_init__(self):
        if self.method not in SPECULATIVE and not (self.method.startswith("draft:") and self.method[6:]):
            raise ValueError(f"speculative = {self.method!r} must be one of {SPECULATIVE} or draft:PATH")
        if not 1 <= self.num_tokens <= 16:
            raise ValueError(f"num_speculative_tokens = {self.num_tokens!r} must be in [1, 16]")
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise ValueError(f"ngram sizes must satisfy 1 <= ngram_min ({self.ngram_min}) <= ngram_max "
                             f"({self.ngram_max})")
        if self.draft_quantization not in QUANTIZATIONS:
            raise ValueError(f"draft_quantization = {self.draft_quantization!r} must be one of {QUANTIZATIONS}")
        if self.max_batch < 0:
            raise ValueError(f"speculative_max_batch = {self.max_batch!r} must be >= 0")

    @property
    def enabled(self) -> bool:
        return self.method != "none"

    @property
    def draft(self) -> str | None:
        """The draft model's path (`draft:PATH`), or None."""
        return self.method[6:] if self.method.startswith("draft:") else None


@dataclass(frozen=True)
class ParallelConfig:
    """Tensor and pipeline parallelism of one model replica (one worker): tp * pp rank processes."""

    tp: int = option(1, "tensor-parallel ranks of the worker")
    pp: int = option(1, "pipeline stages of the worker")
    timeout_s: float = 60.0  # every collective between the ranks; a dead rank is noticed within this
    micro_batches: int | None = None  # per step through the pipeline stages (None: pp)
    pipeline_steps: bool = True  # pp > 1: up to pp steps in flight, each on its share of the batch
    # ... from this many sequences per share (a cut batch reads the weights once per share: measured on
    # SmolLM2, pp = 2, 2 CPU cores: 4 + 4 sequences 0.88x the uncut steps, 8 + 8 1.02x, 12 + 12
    # 1.09x, 24 + 24 1.29x)
    pipeline_min_seqs: int = 12

    def __post_init__(self):
        if self.tp < 1 or self.pp < 1:
            raise ValueError(f"tp = {self.tp!r}, pp = {self.pp!r} must be positive integers")
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s = {self.timeout_s!r} must be positive")


KV_TRANSPORTS = ("auto", "tcp", "zmq", "nccl", "gloo")


@dataclass(frozen=True)
class KVTransferConfig:
    """How a disaggregated worker's ranks move KV pages (kvtransfer/; read by prefill/ and decode/,
    carried to every rank with the rest of the config). The engine itself does not use it."""

    transport: str = option(
        "auto", "how KV payloads move between workers: auto = nccl on CUDA, else tcp (pages on a plain stream "
        "socket, received straight into the cache); zmq = pages as ZeroMQ frames; gloo = the torch.distributed "
        "path on CPU (control messages always take ZeroMQ)", name="kv_transport", choices=KV_TRANSPORTS)
    host: str = "127.0.0.1"  # interface every rank's KV endpoint binds to (the worker's --host)
    timeout_s: float = 30.0  # joining a torch.distributed pair group, and each payload on it

    def __post_init__(self):
        if self.transport not in KV_TRANSPORTS:
            raise ValueError(f"kv transport = {self.transport!r} must be one of {KV_TRANSPORTS}")

    def resolved(self, device: str) -> str:
        """The transport `auto` means on `device`; a clear error for nccl without CUDA."""
        t = self.transport
        if t == "auto":
            t = "nccl" if device.startswith("cuda") else "tcp"
        if t == "nccl" and not device.startswith("cuda"):
            raise ValueError(f"kv transport nccl needs a CUDA device, not {device!r} (use gloo, tcp or zmq on CPU)")
        return t

    def backend(self, device: str) -> str | None:
        """The torch.distributed backend KV payloads take, or None (ZeroMQ: frames, or the tcp stream)."""
        t = self.resolved(device)
        return None if t in ("zmq", "tcp") else t

    def stream(self, device: str) -> bool:
        """Whether pages take a plain stream socket (the tcp transport: kvtransfer/stream.py)."""
        return self.resolved(device) == "tcp"


@dataclass(frozen=True)
class EngineConfig:
    model: str  # a checkpoint directory
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)
    # engine/layers/quantization.py
    quantization: str = option("none", "weight quantization of linear layers at load (int8: weight-only, per "
                               "channel; q8_0, q4_0: GGUF's block formats); a GGUF model's weights stay as stored",
                               choices=QUANTIZATIONS)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    kv_transfer: KVTransferConfig = field(default_factory=KVTransferConfig)
    speculative: SpeculativeConfig = field(default_factory=SpeculativeConfig)

    def __post_init__(self):
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization = {self.quantization!r} must be one of {QUANTIZATIONS}")
        from engine.gguf import gguf_file
        if self.quantization != "none" and gguf_file(self.model) is not None:
            raise ValueError(f"quantization = {self.quantization!r}: model {self.model!r} is a GGUF file, whose "
                             f"weights are served in the formats it stores (quantization = 'none')")
