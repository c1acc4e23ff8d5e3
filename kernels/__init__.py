"""The ops modeling_rwkv7.py calls. On CUDA tensors they run the Triton kernels of this folder; everywhere else
(CPU, or no triton installed) the plain PyTorch reference beside each kernel. Both compute the same function,
which the tests check. The WKV-7 kernels (wkv7_chunk.py, wkv7_recurrent.py) take head sizes K = V = 64, that of
every released model; other head sizes run the reference. The kernel modules are imported on first use, so that
tests can import them under TRITON_INTERPRET=1 (set before their import) to run them on the CPU.

modeling_rwkv7.py imports this folder by path (see `load_kernels` there): transformers' remote-code loader
copies only flat files, so everything here is imported relatively, from inside this package.
"""

import torch

from .ops_reference import group_norm_bonus_reference, token_shift_reference
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


@torch.no_grad()
def wkv7_decode_(r, w, k, v, a, b, state):
    """WKV-7 for a few tokens (decoding), no autograd: updates `state` [B, H, K, V] float32 in place, returns o."""
    if _use_kernels(r, v) and state.is_contiguous():
        from .wkv7_recurrent import recurrent_wkv7_

        return recurrent_wkv7_(r, w, k, v, a, b, state)
    o, final_state = wkv7_reference(r, w, k, v, a, b, state, output_final_state=True)
    state.copy_(final_state)
    return o


def token_shift(x, prev, attention_mask=None):
    """The previous token's x for every position (padding skipped). Math: ops_reference.token_shift_reference."""
    return token_shift_reference(x, prev, attention_mask)


def group_norm_bonus(o, r, k, v, r_k, weight, bias, eps):
    """Per-head GroupNorm of the WKV output plus the bonus term. Math: ops_reference.group_norm_bonus_reference."""
    return group_norm_bonus_reference(o, r, k, v, r_k, weight, bias, eps)
