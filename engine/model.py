"""Llama-family decoder (Llama 2/3, Mistral, Qwen2, Qwen3, Phi-3, SmolLM2), tensor- and pipeline-parallel
aware. Qwen3 adds an RMSNorm over each head of q and k before RoPE; Phi-3 differs only in its checkpoint
(fused projections, engine/loader.py) and its RoPE (engine/layers/rotary.py).

A pipeline stage holds layers [layer_start, layer_end); the first stage embeds, the last one
normalises and owns the LM head. The forward takes flattened ragged tokens and returns hidden states;
`compute_logits` runs only on the rows that are sampled.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.attention import AttentionMetadata, fused_decode_attention, fused_decode_kernel, paged_attention
from engine.config import ModelConfig
from engine.kernels import decode_step
from engine.kv_quant import cache_format
from engine.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from engine.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from engine.layers.norm import RMSNorm
from engine.layers.rotary import RotaryEmbedding, fused_elementwise
from engine.parallel import SINGLE, ParallelContext
from engine.partition import stage_layers


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, ctx: ParallelContext, dtype: torch.dtype, rotary: RotaryEmbedding):
        super().__init__()
        self.qkv_proj = QKVParallelLinear(cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads,
                                          cfg.num_key_value_heads, cfg.attention_bias, ctx, dtype)
        self.o_proj = RowParallelLinear(cfg.num_attention_heads * cfg.head_dim, cfg.hidden_size,
                                        cfg.o_proj_bias, ctx, dtype)
        self.num_heads = self.qkv_proj.num_heads
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.head_dim = cfg.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.scale = self.head_dim ** -0.5
        self.rotary = rotary
        # Qwen3: one weight [head_dim] each, shared by every head (so whole on every TP rank)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, dtype) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, dtype) if cfg.qk_norm else None

    def forward(self, rope, x, kv_cache, meta: AttentionMetadata):
        T = x.shape[0]
        nq, nkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        qk = None  # q and k side by side (the fused projection): rotated in one pass
        if self.qkv_proj.split_here(x):
            q, k, v = self.qkv_proj.forward_split(x)
        else:
            qkv = self.qkv_proj(x)  # [T, (H + 2 KVH) * D]
            q, k, v = qkv[:, :nq * d], qkv[:, nq * d:(nq + nkv) * d], qkv[:, (nq + nkv) * d:]
            qk = qkv[:, :(nq + nkv) * d]
        if self.q_norm is not None:  # over each head's d values: rows of [T * heads, d]
            q = self.q_norm(q.reshape(T * nq, d))
            k = self.k_norm(k.reshape(T * nkv, d))
            v, qk = v.contiguous(), None  # the fused decode attention takes k and v with the same strides
        v = v.view(T, nkv, d)
        if meta.num_decode == T and meta.decode_lens is not None \
                and (kernel := fused_decode_kernel(x.dtype, x.device, d, kv_cache)) is not None:
            # decodes only: RoPE, the cache write and attention in one kernel call
            o = fused_decode_attention(kernel, q.view(T, nq, d), k.view(T, nkv, d), v, rope, kv_cache, meta,
                                       self.scale)
        else:
            if qk is None:
                q, k = self.rotary(rope, q.view(T, nq, d)), self.rotary(rope, k.view(T, nkv, d))
            else:
                qk = self.rotary(rope, qk.view(T, nq + nkv, d))
                q, k = qk[:, :nq], qk[:, nq:]
            o = paged_attention(q, k, v, kv_cache, meta, self.scale)
        return self.o_proj(o.reshape(T, self.q_size))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, ctx: ParallelContext, dtype: torch.dtype):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(cfg.hidden_size, [cfg.intermediate_size] * 2,
                                                       cfg.mlp_bias, ctx, dtype)
        self.down_proj = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size, cfg.mlp_bias, ctx, dtype)

    def forward(self, x):
        gate, up = self.gate_up_proj.forward_split(x)
        # the fused kernel pays in fp32 from ~64 rows (torch's fp32 silu is slow there: 6x at 256); in
        # bf16, and for decode-sized batches, torch's two ops are as fast or faster (a ctypes call costs ~4 us)
        kernels = fused_elementwise(gate) if gate.dtype == torch.float32 and gate.shape[0] >= 64 else None
        act = kernels.silu_mul(gate, up, torch.get_num_threads()) if kernels is not None else F.silu(gate) * up
        return self.down_proj(act)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, ctx: ParallelContext, dtype: torch.dtype, rotary: RotaryEmbedding):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.self_attn = Attention(cfg, ctx, dtype, rotary)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.mlp = MLP(cfg, ctx, dtype)

    def forward(self, rope, h, kv_cache, meta):
        h, x = self.post_attention_layernorm.add_forward(h, self.self_attn(rope, self.input_layernorm(h), kv_cache,
                                                                             meta))
        return h + self.mlp(x)


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, ctx: ParallelContext = SINGLE, dtype: torch.dtype = torch.float32,
                 pp_partition: list[int] | None = None):
        super().__init__()
        self.cfg = cfg
        self.ctx = ctx
        self.layer_start, self.layer_end = stage_layers(cfg.num_hidden_layers, ctx.pp_size, ctx.pp_rank,
                                                        pp_partition)
        self.is_first = ctx.pp_rank == 0
        self.is_last = ctx.pp_rank == ctx.pp_size - 1
        rotary = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling,
                                 dtype)
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, ctx, dtype) \
            if self.is_first or (self.is_last and cfg.tie_word_embeddings) else None
        self.layers = nn.ModuleList(DecoderLayer(cfg, ctx, dtype, rotary)
                                    for _ in range(self.layer_start, self.layer_end))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype) if self.is_last else None
        self.lm_head = None
        if self.is_last and not cfg.tie_word_embeddings:
            self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, ctx, dtype)
        self.rotary = rotary

    @property
    def num_local_layers(self) -> int:
        return self.layer_end - self.layer_start

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                meta: AttentionMetadata, hidden: torch.Tensor | None = None, layer_done=None) -> torch.Tensor:
        """Hidden states [T, hidden] of this stage. `hidden` comes from the previous stage (pp > 1).

        `layer_done(i)` (optional) is called after each local layer: the KV of layer
        `layer_start + i` for this step's tokens is then in the cache (layer-wise KV streaming).
        """
        h = self.embed_tokens(input_ids) if self.is_first else hidden
        rope = self.rotary.lookup(positions)
        if layer_done is None and meta.num_decode == h.shape[0] and meta.decode_lens is not None \
                and (plan := self._decode_plan(h, kv_caches)) is not None:
            # decodes only: every layer in one kernel call (engine/kernels/decode_step.c)
            cos, sin = rope
            B = h.shape[0]
            h = h.contiguous() if self.is_first else h.clone()  # updated in place
            plan[0](plan[1], h, cos.view(B, -1), sin.view(B, -1), meta.slot_blocks, meta.slot_offsets,
                    meta.decode_block_tables, meta.decode_lens, torch.get_num_threads())
        else:
            for i, layer in enumerate(self.layers):
                h = layer(rope, h, kv_caches[i], meta)
                if layer_done is not None:
                    layer_done(i)
        return self.norm(h) if self.is_last else h

    def _decode_plan(self, h: torch.Tensor, kv_caches: list[torch.Tensor]):
        """(kernel, plan) of the fused decode step where it takes this model and these caches: CPU, fp32,
        one TP rank, GGUF weights without biases in every layer, no q/k norm (Qwen3: the kernel has
        none), a head size it takes, fp32 or quantized caches (all alike). Else None. Bound once per set
        of caches."""
        key = kv_caches[0].data_ptr() if kv_caches else None
        cached = getattr(self, "_decode_step", (None, None))
        if cached[0] == key:
            return cached[1]
        plan = None
        layers = list(self.layers)
        projections = [(L.self_attn.qkv_proj, L.self_attn.o_proj, L.mlp.gate_up_proj, L.mlp.down_proj) for L in layers]
        if layers and not self.cfg.qk_norm and h.device.type == "cpu" and h.dtype == torch.float32 \
                and self.ctx.tp_size == 1 \
                and all(p.bias is None and getattr(p, "gguf", None) is not None
                        and len(p.gguf.segments) <= 4 for ps in projections for p in ps) \
                and all(c.dtype == kv_caches[0].dtype and c.is_contiguous() for c in kv_caches) \
                and (kv_caches[0].dtype == torch.float32 or cache_format(kv_caches[0]) is not None) \
                and fused_decode_kernel(h.dtype, h.device, self.cfg.head_dim, kv_caches[0]) is not None \
                and (kernel := decode_step()) is not None:
            attn = layers[0].self_attn
            desc = [{"input_norm": L.input_layernorm.weight, "post_norm": L.post_attention_layernorm.weight,
                     "qkv": qkv.gguf, "o": o.gguf, "gate_up": gu.gguf, "down": d.gguf}
                    for L, (qkv, o, gu, d) in zip(layers, projections)]
            plan = kernel, kernel.plan(desc, kv_caches[:len(layers)], self.cfg.hidden_size,
                                       layers[0].mlp.gate_up_proj.local_sizes[0], attn.num_heads,
                                       attn.num_kv_heads, attn.head_dim, layers[0].input_layernorm.eps, attn.scale)
        self._decode_step = (key, plan)
        return plan

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        head = self.lm_head if self.lm_head is not None else self.embed_tokens
        return head.compute_logits(hidden)
