"""Random-init models built directly in 4 bits, for benchmarks: one target weight at a time is drawn on the
device, quantized and dropped, so the 16-bit model never exists."""

from __future__ import annotations

import torch
from torch import nn

from .. import kernels
from ..nn.linear4bit import Linear4bit
from .loader import buffers_to
from .targets import find_target_linears

SHAPES = {
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
                      rms_norm_eps=1e-5, tie_word_embeddings=False),
    "llama3-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                       num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
                       rms_norm_eps=1e-5, tie_word_embeddings=False),
    "llama2-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                       num_key_value_heads=8, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
                       tie_word_embeddings=False),
}


def synthetic_llama(shape: str | dict, *, layers: int | None = None, device: str | torch.device = "cuda",
                    compute_dtype: torch.dtype = torch.bfloat16, blocksize: int = 64, quant_type: str = "nf4",
                    double_quant: bool = True, std: float = 0.02, seed: int = 0,
                    attn_implementation: str = "sdpa") -> nn.Module:
    """A LlamaForCausalLM of a named shape (or a dict of LlamaConfig fields) with N(0, std) weights, its block
    linears in 4 bits and everything else in compute_dtype, on `device`, frozen, in eval mode."""
    from accelerate import init_empty_weights
    from transformers import LlamaConfig, LlamaForCausalLM

    fields = dict(SHAPES[shape]) if isinstance(shape, str) else dict(shape)
    if layers:
        fields["num_hidden_layers"] = layers
    config = LlamaConfig(**fields)
    config._attn_implementation = attn_implementation
    with init_empty_weights(include_buffers=False):
        model = LlamaForCausalLM(config)
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    targets = find_target_linears(model)
    for name in targets:
        module = model.get_submodule(name)
        w = torch.empty(module.out_features, module.in_features, device=device, dtype=compute_dtype)
        w.normal_(0.0, std, generator=gen)
        packed, state = kernels.call("quantize_4bit", w, blocksize, quant_type, double_quant)
        del w
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, Linear4bit(packed, state))
    for name, param in list(model.named_parameters()):
        owner, _, leaf = name.rpartition(".")
        if param.device.type != "meta":
            continue
        value = torch.empty(param.shape, device=device, dtype=compute_dtype)
        if "norm" in name:
            value.fill_(1.0)
        else:
            value.normal_(0.0, std, generator=gen)
        model.get_submodule(owner)._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    if config.tie_word_embeddings:
        model.tie_weights()
    buffers_to(model, device)  # RoPE's inv_freq is built on the CPU
    model.eval()
    return model
