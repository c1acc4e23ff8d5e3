"""Fused recurrent WKV-7 for decoding in Triton: a few tokens per call, the state updated in place, no autograd.

Shapes, layouts, dtypes (those of wkv7_reference.py, which holds the math):
    r, w, k, a, b : [B, T, H, K]   v, o : [B, T, H, V]   (T small: one token, or a few)
    r, k, v, a, b bf16/fp16/fp32; w the float32 (or input-dtype) log decay; o in r's dtype
    state : [B, H, K, V] float32, contiguous, read and overwritten in place
Math, per head and step: sa = a^T h;  h = diag(exp(w)) h + b sa^T + k v^T;  o = h^T r.

One program per (batch, head, V-block of BV columns): the state's columns evolve independently, so each program
holds its [K, BV] float32 slice in registers across the T steps and writes it back once. One launch, no host
sync and no data-dependent allocation, so the call can be captured in a CUDA graph.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _decode_kernel(r_ptr, w_ptr, k_ptr, v_ptr, a_ptr, b_ptr, o_ptr, s_ptr, T, H: tl.constexpr, K: tl.constexpr,
                   V: tl.constexpr, BV: tl.constexpr):
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    ok = tl.arange(0, K)
    ov = i_v * BV + tl.arange(0, BV)
    p_s = s_ptr + i_bh.to(tl.int64) * K * V + ok[:, None] * V + ov[None, :]
    h = tl.load(p_s)
    for t in range(0, T):
        row = (i_b.to(tl.int64) * T + t) * H + i_h
        r = tl.load(r_ptr + row * K + ok).to(tl.float32)
        w = tl.load(w_ptr + row * K + ok).to(tl.float32)
        k = tl.load(k_ptr + row * K + ok).to(tl.float32)
        a = tl.load(a_ptr + row * K + ok).to(tl.float32)
        b = tl.load(b_ptr + row * K + ok).to(tl.float32)
        v = tl.load(v_ptr + row * V + ov).to(tl.float32)
        sa = tl.sum(a[:, None] * h, 0)
        h = h * tl.exp(w)[:, None] + b[:, None] * sa[None, :] + k[:, None] * v[None, :]
        o = tl.sum(r[:, None] * h, 0)
        tl.store(o_ptr + row * V + ov, o.to(o_ptr.dtype.element_ty))
    tl.store(p_s, h)


@torch.no_grad()
def recurrent_wkv7_(r, w, k, v, a, b, state):
    """Runs T steps from `state` [B, H, K, V] (float32, contiguous), updating it in place. Returns o [B, T, H, V]."""
    B, T, H, K = r.shape
    V = v.shape[-1]
    if state.dtype != torch.float32 or not state.is_contiguous() or state.shape != (B, H, K, V):
        raise ValueError(f"state must be a contiguous float32 tensor of shape {(B, H, K, V)}")
    r, w, k, v, a, b = (x.contiguous() for x in (r, w, k, v, a, b))
    o = torch.empty_like(v, dtype=r.dtype)
    BV = min(V, 16 if B * H <= 1024 else 32)
    with torch.cuda.device(r.device if r.is_cuda else -1):  # -1: no device switch (interpreter on CPU)
        _decode_kernel[(V // BV, B * H)](r, w, k, v, a, b, o, state, T, H=H, K=K, V=V, BV=BV,
                                         num_warps=1 if BV == 16 else 2)
    return o
