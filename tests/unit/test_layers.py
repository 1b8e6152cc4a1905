"""Layers against Hugging Face transformers' own modules, bit for bit."""

import pytest
import torch

from engine.layers.norm import RMSNorm


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rms_norm_rounds_as_transformers_does(dtype):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    g = torch.Generator().manual_seed(0)
    ours = RMSNorm(576, 1e-5, dtype)
    ours.weight.data = torch.randn(576, generator=g).to(dtype)
    theirs = LlamaRMSNorm(576, 1e-5).to(dtype)
    theirs.weight.data = ours.weight.data.clone()
    for rows in (1, 7, 300):
        x = (torch.randn(rows, 576, generator=g) * 3).to(dtype)
        if dtype == torch.float32:  # the module takes engine/kernels' fused norm (its own sum order)
            assert torch.equal(ours.torch_forward(x), theirs(x)), (dtype, rows)
            torch.testing.assert_close(ours(x), theirs(x), rtol=4e-7, atol=1e-6)
        else:
            assert torch.equal(ours(x), theirs(x)), (dtype, rows)
