"""``target-xl``: the trained target grown, function-preservingly, to a mid-size model's cost.

Where it sits: ``build_zoo`` calls ``grow`` after training; benchmarks and the demo
serve the result as the target. Why it exists: on two CPU cores an honestly trained
target is so small that a drafter costs nearly as much as it, and speculation cannot
pay. Real deployments have drafters at 2-10% of the target's cost. target-xl restores
that ratio without pretending to be a better model: it computes the trained target's
function, so it emits exactly the target's tokens, while every forward pass does the
work of a ~200M-parameter Llama (every weight is read, every product is computed).

The growth (Net2Net-style, Chen et al. 2016), with f the width factor:

- width: hidden size x f and heads x f (same head_dim, so RoPE and the attention scale
  are unchanged). Embeddings, the output head and every projection are zero-padded
  on the new hidden dimensions, so the residual stream is the old one followed by
  exact zeros. RMSNorm then averages over f times more entries (the mean square
  shrinks by f), so its weights are divided by sqrt(f) and its epsilon by f: with f
  a power of 4, sqrt(f) is a power of two and the rescaling is exact in floating
  point, not merely to rounding.
- new heads in old layers: random q/k/v rows, zero o_proj columns.
- wider MLPs: random gate/up rows, zero down_proj columns.
- extra layers (appended after the trained ones): random weights except o_proj and
  down_proj, which are all zero, so each adds exactly 0 to the residual stream.

Whether the result is *bit*-identical also depends on the matmul kernels summing a
zero-padded dot product like the unpadded one: true for the shapes chosen here on
the machine we measured, not for all (an input width of 256 padded to 1024 differed
by ~3e-5 in multi-token matmuls). ``build_zoo`` checks target-xl's greedy tokens and
logits against the target's and records the result in the manifest either way.
"""

from __future__ import annotations

import math

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from specfleet.zoo.presets import Growth


def grown_config(config: LlamaConfig, growth: Growth) -> LlamaConfig:
    f = growth.width_factor
    root = math.isqrt(f)
    if f < 1 or root * root != f or root & (root - 1):
        raise ValueError(f"width_factor must be a power of 4 (1, 4, 16, ...), got {f}")
    if growth.layers < config.num_hidden_layers or growth.intermediate < config.intermediate_size:
        raise ValueError("growth must not shrink layers or the MLP")
    if config.tie_word_embeddings:
        raise ValueError("growing a model with tied embeddings is not supported")
    new = LlamaConfig.from_dict(config.to_dict())
    new.hidden_size = config.hidden_size * f
    new.num_attention_heads = config.num_attention_heads * f
    new.num_key_value_heads = config.num_key_value_heads * f
    new.head_dim = config.head_dim
    new.intermediate_size = growth.intermediate
    new.num_hidden_layers = growth.layers
    new.rms_norm_eps = config.rms_norm_eps / f
    return new


def _pad(new: torch.Tensor, old: torch.Tensor) -> None:
    """Put ``old`` in the leading corner of ``new`` and zero every other column.

    Rows beyond ``old`` (new heads, new MLP units) keep ``new``'s random values in the
    old columns; only their reads of the zero padding are zeroed, so they compute.
    """
    rows, cols = old.shape
    new[:, cols:] = 0
    new[:rows, :cols] = old


@torch.no_grad()
def grow(target: LlamaForCausalLM, growth: Growth, seed: int) -> LlamaForCausalLM:
    config = grown_config(target.config, growth)
    scale = math.sqrt(growth.width_factor)
    hidden = target.config.hidden_size
    torch.manual_seed(seed)
    xl = LlamaForCausalLM(config).eval()
    xl.generation_config = target.generation_config

    def norm(new: torch.Tensor, old: torch.Tensor) -> None:
        new.zero_()
        new[:hidden] = old / scale

    _pad(xl.model.embed_tokens.weight, target.model.embed_tokens.weight)
    _pad(xl.lm_head.weight, target.lm_head.weight)
    norm(xl.model.norm.weight, target.model.norm.weight)
    for i, big in enumerate(xl.model.layers):
        if i >= len(target.model.layers):
            # An extra layer: whatever it computes is multiplied by zero.
            big.self_attn.o_proj.weight.zero_()
            big.mlp.down_proj.weight.zero_()
            continue
        small = target.model.layers[i]
        norm(big.input_layernorm.weight, small.input_layernorm.weight)
        norm(big.post_attention_layernorm.weight, small.post_attention_layernorm.weight)
        for name in ("q_proj", "k_proj", "v_proj"):
            _pad(getattr(big.self_attn, name).weight, getattr(small.self_attn, name).weight)
        for name in ("gate_proj", "up_proj"):
            _pad(getattr(big.mlp, name).weight, getattr(small.mlp, name).weight)
        # Output projections: old block in the corner, zero elsewhere, so neither new
        # heads, nor new MLP units, nor anything at all reaches the padded dimensions.
        for new_w, old_w in ((big.self_attn.o_proj.weight, small.self_attn.o_proj.weight),
                             (big.mlp.down_proj.weight, small.mlp.down_proj.weight)):
            new_w.zero_()
            new_w[:old_w.shape[0], :old_w.shape[1]] = old_w
    return xl
