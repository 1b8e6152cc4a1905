"""Vocab-parallel embedding and LM head: each TP rank holds a contiguous range of vocabulary rows."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.layers.linear import narrow
from engine.parallel import SINGLE, ParallelContext
from engine.partition import split_evenly


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, ctx: ParallelContext = SINGLE,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        self.ctx = ctx
        self.vocab_size = vocab_size
        self.vocab_start, self.vocab_end = split_evenly(vocab_size, ctx.tp_size, ctx.tp_rank)
        self.compute_dtype = dtype
        self.weight = nn.Parameter(torch.empty(self.vocab_end - self.vocab_start, hidden_size, dtype=dtype),
                                   requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        self.gguf = None  # the rows in a GGUF block format (engine/layers/quantization.py), weight then None

    def weight_loader(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        t = narrow(loaded, 0, self.vocab_start, self.vocab_end - self.vocab_start)
        if tuple(t.shape) != tuple(param.shape):
            raise ValueError(f"embedding: checkpoint shape {tuple(t.shape)} does not fit {tuple(param.shape)}")
        param.data.copy_(t)

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        if self.gguf is None:
            return F.embedding(ids, self.weight)
        return self.gguf.take(ids).to(self.compute_dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.ctx.tp_size == 1:
            return self._lookup(ids)
        mask = (ids < self.vocab_start) | (ids >= self.vocab_end)
        local = (ids - self.vocab_start).masked_fill(mask, 0)
        y = self._lookup(local).masked_fill(mask.unsqueeze(-1), 0)
        return self.ctx.all_reduce(y)

    def quantize_lm_head(self, method) -> None:
        """A copy of the rows for the LM head in `method`'s layout (quantized or packed); the embedding
        lookup keeps the plain rows."""
        from engine.layers.linear import ReplicatedLinear

        head = ReplicatedLinear(self.weight.shape[1], self.weight.shape[0], False, self.ctx, self.weight.dtype)
        head.weight.data = self.weight.data.clone()
        head.linear_method = method
        method.process_weights_after_loading(head)
        self.quantized_head = head

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        head = getattr(self, "quantized_head", None)
        if self.gguf is not None:
            from engine.layers.quantization import GGUF_METHOD
            logits = GGUF_METHOD.apply(self, hidden, None)
        else:
            logits = head(hidden) if head is not None else F.linear(hidden, self.weight)  # [N, vocab_local]
        if self.ctx.tp_size == 1:
            return logits
        # uneven splits: pad each shard to the largest, gather, then drop the padding
        max_rows = -(-self.vocab_size // self.ctx.tp_size)
        if logits.shape[-1] < max_rows:
            logits = F.pad(logits, (0, max_rows - logits.shape[-1]))
        full = self.ctx.all_gather_last_dim(logits)
        bounds = [split_evenly(self.vocab_size, self.ctx.tp_size, r) for r in range(self.ctx.tp_size)]
        return torch.cat([full[..., r * max_rows: r * max_rows + (e - s)] for r, (s, e) in enumerate(bounds)], -1)


class ParallelLMHead(VocabParallelEmbedding):
    """An untied LM head: the same row split as the embedding, used only through compute_logits."""
