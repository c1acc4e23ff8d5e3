"""The ops modeling_rwkv7.py calls. On CUDA tensors they run the Triton kernels of this folder; everywhere else
(CPU, or no triton installed) the plain PyTorch reference beside each kernel. Both compute the same function,
which the tests check.

    wkv7            chunked WKV-7 over a sequence, forward and backward (wkv7_chunk.py; wkv7_reference.py)
    time_mix        the time mix between its projections and o_proj; one fused kernel per decoding step
                    (time_mix_decode.py; ops_reference.time_mix_reference)
    norm_shift_mix  LayerNorm + token shift + lerps; fused when decoding (norm_shift_mix_decode.py)
    linear          a linear layer with activation and residual; fused for one row (linear_decode.py)

The WKV-7 kernels take head size 64, that of every released model; other head sizes run the references. The
kernel modules are imported on first use, so that tests can import them under TRITON_INTERPRET=1 (set before
their import) to run them on the CPU.

modeling_rwkv7.py imports this folder by path (see `load_kernels` there): transformers' remote-code loader
copies only flat files, so everything here is imported relatively, from inside this package.
"""

import torch

from .ops_reference import activation_reference, linear_reference, norm_shift_mix_reference, time_mix_reference
from .wkv7_reference import wkv7_reference

try:  # triton is optional: without it (CPU-only installs) every op runs its reference
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False


def _use_kernels(r, v):
    return HAS_TRITON and r.is_cuda and r.shape[-1] == 64 and v.shape[-1] == 64


def wkv7(r, w, k, v, a, b, initial_state=None, output_final_state=False, cu_seqlens=None):
    """WKV-7 over a sequence (prefill, training). Layouts and math: wkv7_reference.py. Returns (o, final_state)."""
    if _use_kernels(r, v):
        from .wkv7_chunk import chunk_wkv7

        return chunk_wkv7(r, w, k, v, a, b, initial_state, output_final_state, cu_seqlens)
    return wkv7_reference(r, w, k, v, a, b, initial_state, output_final_state, cu_seqlens)


def time_mix(r, w_raw, k, v, a_raw, v_gate_raw, v_first, g, k_k, k_a, r_k, gn_weight, gn_bias, gn_eps,
             attention_mask=None, state=None, in_place=False):
    """The time mix between its projections and o_proj. Arguments and math: ops_reference.time_mix_reference.
    A decoding step on CUDA (one token, state updated in place) is one fused kernel (time_mix_decode.py)."""
    if in_place and r.shape[1] == 1 and HAS_TRITON and r.is_cuda and r_k.shape[1] == 64 and state.is_contiguous():
        from .time_mix_decode import time_mix_decode_

        return time_mix_decode_(r, w_raw, k, v, a_raw, v_gate_raw, v_first, g, k_k, k_a, r_k, gn_weight, gn_bias,
                                gn_eps, attention_mask, state)
    return time_mix_reference(r, w_raw, k, v, a_raw, v_gate_raw, v_first, g, k_k, k_a, r_k, gn_weight, gn_bias,
                              gn_eps, attention_mask, state, in_place, wkv7=wkv7)


def norm_shift_mix(x, weight, bias, eps, prev, mixes, attention_mask=None, in_place=False):
    """LayerNorm, token shift and lerps: the inputs of a time or channel mix. Arguments and math:
    ops_reference.norm_shift_mix_reference. A decoding step on CUDA is one fused kernel (norm_shift_mix_decode.py)."""
    if in_place and x.shape[1] == 1 and HAS_TRITON and x.is_cuda and prev.is_contiguous():
        from .norm_shift_mix_decode import norm_shift_mix_decode_

        return norm_shift_mix_decode_(x, weight, bias, eps, prev, mixes, attention_mask)
    return norm_shift_mix_reference(x, weight, bias, eps, prev, mixes, attention_mask, in_place)


def linear(x, weight, bias=None, activation=None, residual=None):
    """residual + activation(x W^T + bias) (ops_reference.linear_reference). A single row on CUDA without
    autograd (batch-1 decoding) is one fused kernel (linear_decode.py)."""
    if (
        HAS_TRITON
        and x.is_cuda
        and x.numel() == x.shape[-1]
        and weight.is_contiguous()
        and not torch.is_grad_enabled()
    ):
        from .linear_decode import linear_row

        return linear_row(x, weight, bias, activation, residual)
    return linear_reference(x, weight, bias, activation, residual)


def apply_activation(y, activation=None, residual=None):
    """residual + activation(y), for a layer that computed y itself. Math: ops_reference.activation_reference."""
    return activation_reference(y, activation, residual)
