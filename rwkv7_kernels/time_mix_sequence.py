"""The RWKV-7 time mix of a whole sequence without autograd (prefill), from the LoRA outputs to o_proj's input:
an elementwise kernel before the chunked WKV-7 (wkv7_chunk.py), and one after it.

Math: ops_reference.time_mix_reference without a padding mask:
    before  w = -exp(-0.5) sigmoid(w_raw) (float32), kk = normalize_per_head(k * k_k), a = sigmoid(a_raw),
            k' = k (1 + (a - 1) k_a), v' = lerp(v, v_first, sigmoid(v_gate_raw)) (not in layer 0),
            and WKV-7's transition a_wkv = -kk, b_wkv = kk * a
    after   y = (GroupNorm_per_head(o) + sum_per_head(r * k' * r_k) * v') * g
In PyTorch these are some twenty kernels per layer; a prefill at batch 1 is bound by the CPU launching them.

Shapes, layouts, dtypes:
    r, w_raw, k, v, a_raw, v_gate_raw, v_first, g, o : [B * T, C] rows, contiguous, the model dtype; C = H * N
    k_k, k_a, r_k, gn_weight, gn_bias               : [C]
    outputs: w [B * T, C] float32; k', v', a_wkv, b_wkv, y [B * T, C] in the model dtype
Computed in float32. One program per (block of BLOCK_T rows, head): the per-head normalisations need the head's N
channels together.
"""

import torch
import triton
import triton.language as tl

from .common import launch_device
from .triton_helpers import DECAY_SCALE, KK_EPS
from .wkv7_chunk import chunk_wkv7

BLOCK_T = 32


@triton.jit(do_not_specialize=["first_layer"])  # Triton compiles an int equal to 1 into a kernel of its own
def _before_wkv_kernel(w_raw_ptr, k_ptr, v_ptr, a_raw_ptr, vg_ptr, vf_ptr, k_k_ptr, k_a_ptr,
                       w_ptr, k_out_ptr, v_out_ptr, a_out_ptr, b_out_ptr, rows_total, first_layer,
                       C: tl.constexpr, N: tl.constexpr, BLOCK_T: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * N + tl.arange(0, N)  # this head's channels
    at = rows.to(tl.int64)[:, None] * C + cols[None, :]
    inside = (rows < rows_total)[:, None]
    k = tl.load(k_ptr + at, mask=inside, other=0.0).to(tl.float32)
    a = tl.sigmoid(tl.load(a_raw_ptr + at, mask=inside, other=0.0).to(tl.float32))
    w = tl.sigmoid(tl.load(w_raw_ptr + at, mask=inside, other=0.0).to(tl.float32)) * -DECAY_SCALE
    kk = k * tl.load(k_k_ptr + cols).to(tl.float32)[None, :]
    kk = kk / tl.maximum(tl.sqrt(tl.sum(kk * kk, 1)), KK_EPS)[:, None]
    k = k * (1 + (a - 1) * tl.load(k_a_ptr + cols).to(tl.float32)[None, :])
    tl.store(w_ptr + at, w, mask=inside)
    tl.store(k_out_ptr + at, k.to(k_out_ptr.dtype.element_ty), mask=inside)
    tl.store(a_out_ptr + at, (-kk).to(a_out_ptr.dtype.element_ty), mask=inside)
    tl.store(b_out_ptr + at, (kk * a).to(b_out_ptr.dtype.element_ty), mask=inside)
    if first_layer == 0:  # a run-time flag: one compiled kernel for every layer (cold start)
        v = tl.load(v_ptr + at, mask=inside, other=0.0).to(tl.float32)
        v_first = tl.load(vf_ptr + at, mask=inside, other=0.0).to(tl.float32)
        v += (v_first - v) * tl.sigmoid(tl.load(vg_ptr + at, mask=inside, other=0.0).to(tl.float32))
        tl.store(v_out_ptr + at, v.to(v_out_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _after_wkv_kernel(o_ptr, r_ptr, k_ptr, v_ptr, g_ptr, r_k_ptr, gn_w_ptr, gn_b_ptr, y_ptr, gn_eps, rows_total,
                      C: tl.constexpr, N: tl.constexpr, BLOCK_T: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * N + tl.arange(0, N)
    at = rows.to(tl.int64)[:, None] * C + cols[None, :]
    inside = (rows < rows_total)[:, None]
    o = tl.load(o_ptr + at, mask=inside, other=0.0).to(tl.float32)
    mean = tl.sum(o, 1) / N
    centred = o - mean[:, None]
    o = centred / tl.sqrt(tl.sum(centred * centred, 1) / N + gn_eps)[:, None]
    o = o * tl.load(gn_w_ptr + cols).to(tl.float32)[None, :] + tl.load(gn_b_ptr + cols).to(tl.float32)[None, :]
    r = tl.load(r_ptr + at, mask=inside, other=0.0).to(tl.float32)
    k = tl.load(k_ptr + at, mask=inside, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + at, mask=inside, other=0.0).to(tl.float32)
    bonus = tl.sum(r * k * tl.load(r_k_ptr + cols).to(tl.float32)[None, :], 1)  # the current token's
    y = (o + bonus[:, None] * v) * tl.load(g_ptr + at, mask=inside, other=0.0).to(tl.float32)
    tl.store(y_ptr + at, y.to(y_ptr.dtype.element_ty), mask=inside)


@torch.no_grad()
def time_mix_sequence(r, w_raw, k, v, a_raw, v_gate_raw, v_first, g, params, state=None, attention_mask=None,
                      in_place=False):
    """The time mix of whole sequences without padding or autograd. Arguments and results: those of
    ops_reference.time_mix_reference (r ... g [B, T, C]; params: TimeMixParams; state [B, H, N, N] float32 or
    None); attention_mask must be None and in_place False."""
    if attention_mask is not None or in_place:
        raise ValueError("time_mix_sequence runs sequences without padding, and returns a new state")
    B, T, C = r.shape
    H, N = params.r_k.shape
    first_layer = v_first is None
    rows = lambda t: t.reshape(B * T, C).contiguous()  # noqa: E731
    r, w_raw, k, v, a_raw, g = map(rows, (r, w_raw, k, v, a_raw, g))
    w = torch.empty(B * T, C, dtype=torch.float32, device=r.device)
    k_out, a_wkv, b_wkv = (torch.empty_like(k) for _ in range(3))
    v_out = v if first_layer else torch.empty_like(v)
    vg, vf = (v, v) if first_layer else (rows(v_gate_raw), rows(v_first))  # placeholders in layer 0 (not read)
    grid = (triton.cdiv(B * T, BLOCK_T), H)
    heads = lambda t: t.view(B, T, H, N)  # noqa: E731
    y = torch.empty_like(r)
    with launch_device(r):
        _before_wkv_kernel[grid](w_raw, k, v, a_raw, vg, vf, params.k_k, params.k_a, w, k_out, v_out, a_wkv, b_wkv,
                                 B * T, int(first_layer), C=C, N=N, BLOCK_T=BLOCK_T, num_warps=4)
        o, final_state = chunk_wkv7(heads(r), heads(w), heads(k_out), heads(v_out), heads(a_wkv), heads(b_wkv),
                                    initial_state=state, output_final_state=state is not None)
        _after_wkv_kernel[grid](o, r, k_out, v_out, g, params.r_k, params.gn_weight, params.gn_bias, y,
                                params.gn_eps, B * T, C=C, N=N, BLOCK_T=BLOCK_T, num_warps=4)
    v_first = v.view(B, T, C) if first_layer else v_first
    return y.view(B, T, C), v_first, final_state
