"""The ops of a decoding step in Triton kernels (one token per row, a cache, no autograd): what the model's fused
decoding path (modeling_rwkv7.Path.DECODE_TRITON) calls, each choosing its kernels by the number of rows.

    norm_mix_linear   LayerNorm, token shift, lerps and the projections that read them; prev updated in place
    time_mix          the time mix from the LoRA hidden activations to o_proj's input; the state updated in place
    linear            a projection with its residual add

Math: ops_reference (norm_mix_linear_reference, time_mix_reference, linear_reference).
"""

from .common import sm_count
from .linear_decode import linear_row
from .norm_mix_linear_decode import norm_mix_linear_row
from .norm_shift_mix_fused import norm_shift_mix_fused
from .ops_reference import linear_reference
from .time_mix_decode import lora_up, time_mix_decode_


def norm_mix_linear(x, weight, bias, eps, prev, projections, attention_mask=None):
    """x [B, 1, C], prev [B, C] (updated in place), projections [(mix [C], W [N, C], activation)]; returns the
    projections' outputs [B, 1, N_i]. One row is one kernel (norm_mix_linear_decode.py); several rows run the fused
    norm/shift/mix kernel, then a matrix product per projection."""
    if x.shape[0] == 1:
        return norm_mix_linear_row(x, weight, bias, eps, prev, projections, attention_mask)
    mixes = [mix for mix, _, _ in projections]
    mixed, _ = norm_shift_mix_fused(x, prev, mixes, (weight, bias, eps), attention_mask, in_place=True)
    return [linear_reference(m, w, None, act) for m, (_, w, act) in zip(mixed, projections)]


def time_mix(r, k, v, loras, v_first, params, state, attention_mask=None):
    """Arguments and results: time_mix_decode.time_mix_decode_. One fused kernel, one program per (row, head), which
    applies its head's LoRA up-projections itself; beyond 2 programs per SM those tiles would be read too often, so
    one launch of lora_up applies every up-projection first, reading each weight tile once per block of rows."""
    if r.shape[0] * params.r_k.shape[0] > 2 * sm_count(r.device):
        loras = lora_up(loras)
    return time_mix_decode_(r, k, v, loras, v_first, params, state, attention_mask)


def linear(x, weight, residual=None):
    """residual + x W^T for x [B, 1, K]: one row is one fused kernel (linear_decode.py), several a matrix product."""
    if x.numel() == x.shape[-1]:
        return linear_row(x, weight, None, None, residual)
    return linear_reference(x, weight, None, None, residual)
