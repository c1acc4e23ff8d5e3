"""The whole RWKV-7 time mix of one decoding step, between the projections and o_proj, as one Triton kernel.

Math: ops_reference.time_mix_reference with T = 1 and the state updated in place (the decay, kk, the k update,
the v_first mix, the padding mask, the WKV-7 step, the per-head GroupNorm, the bonus and the gate). Decoding
launches this once per layer instead of some thirty small PyTorch kernels.

Shapes, layouts, dtypes:
    r, w_raw, k, v, a_raw, v_gate_raw, v_first, g : [B, C] rows (contiguous; the model dtype), C = H * N, N = 64
    k_k, k_a, r_k, gn_weight, gn_bias             : [C]
    attention_mask                                : [B] (0 = padding) or None
    state                                         : [B, H, N, N] float32, contiguous; fla's [K, V] per head
    y (returned)                                  : [B, C] in r's dtype
Everything is computed in float32. One program per (row, head) holds that head's 64 x 64 state in registers:
the GroupNorm and the kk normalisation need the whole head. No host sync and no data-dependent allocation, so
the call can be captured in a CUDA graph.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _time_mix_decode_kernel(r_ptr, w_ptr, k_ptr, v_ptr, a_ptr, vg_ptr, vf_ptr, g_ptr, mask_ptr,
                            kk_w_ptr, ka_ptr, rk_ptr, gnw_ptr, gnb_ptr, s_ptr, y_ptr, gn_eps,
                            H: tl.constexpr, N: tl.constexpr, FIRST_LAYER: tl.constexpr, HAS_MASK: tl.constexpr):
    i_b, i_h = tl.program_id(0), tl.program_id(1)
    C: tl.constexpr = H * N
    cols = i_h * N + tl.arange(0, N)  # this head's channels
    row = i_b.to(tl.int64) * C + cols

    r = tl.load(r_ptr + row).to(tl.float32)
    k = tl.load(k_ptr + row).to(tl.float32)
    v = tl.load(v_ptr + row).to(tl.float32)
    # decay = exp(-exp(-0.5) * sigmoid(w_raw)); 0.6065306597126334 = exp(-0.5)
    decay = tl.exp(-0.6065306597126334 * tl.sigmoid(tl.load(w_ptr + row).to(tl.float32)))
    a = tl.sigmoid(tl.load(a_ptr + row).to(tl.float32))
    kk = k * tl.load(kk_w_ptr + cols).to(tl.float32)
    kk = kk / tl.maximum(tl.sqrt(tl.sum(kk * kk, 0)), 1e-12)
    k = k * (1 + (a - 1) * tl.load(ka_ptr + cols).to(tl.float32))
    if not FIRST_LAYER:
        v_gate = tl.sigmoid(tl.load(vg_ptr + row).to(tl.float32))
        v = v + (tl.load(vf_ptr + row).to(tl.float32) - v) * v_gate
    if HAS_MASK:  # a padded token leaves the state as it was
        keep = tl.load(mask_ptr + i_b) != 0
        decay = tl.where(keep, decay, 1.0)
        k = tl.where(keep, k, 0.0)
        kk = tl.where(keep, kk, 0.0)

    # state h [K, V]: h = diag(decay) h + (kk * a) (-kk^T h) + k v^T ; o = h^T r
    p_s = s_ptr + (i_b.to(tl.int64) * H + i_h) * N * N + tl.arange(0, N)[:, None] * N + tl.arange(0, N)[None, :]
    h = tl.load(p_s)
    sa = tl.sum(-kk[:, None] * h, 0)
    h = h * decay[:, None] + (kk * a)[:, None] * sa[None, :] + k[:, None] * v[None, :]
    tl.store(p_s, h)
    o = tl.sum(r[:, None] * h, 0)

    mean = tl.sum(o, 0) / N
    centred = o - mean
    o = centred / tl.sqrt(tl.sum(centred * centred, 0) / N + gn_eps)
    o = o * tl.load(gnw_ptr + cols).to(tl.float32) + tl.load(gnb_ptr + cols).to(tl.float32)
    o = o + tl.sum(r * k * tl.load(rk_ptr + cols).to(tl.float32), 0) * v  # the current token's bonus
    y = o * tl.load(g_ptr + row).to(tl.float32)
    tl.store(y_ptr + row, y.to(y_ptr.dtype.element_ty))


@torch.no_grad()
def time_mix_decode_(r, w_raw, k, v, a_raw, v_gate_raw, v_first, g, k_k, k_a, r_k, gn_weight, gn_bias, gn_eps,
                     attention_mask, state):
    """One decoding step of the time mix; inputs [B, 1, C], state [B, H, N, N] float32 updated in place.

    Returns (y [B, 1, C], v_first, state), as ops_reference.time_mix_reference(..., in_place=True) does.
    """
    B, T, C = r.shape
    H, N = r_k.shape
    if T != 1 or state.dtype != torch.float32 or not state.is_contiguous() or state.shape != (B, H, N, N):
        raise ValueError(f"one token per row and a contiguous float32 state of shape {(B, H, N, N)} are needed")
    first_layer = v_first is None
    rows = [t.reshape(B, C).contiguous() for t in (r, w_raw, k, v, a_raw, g)]
    if first_layer:
        v_gate, v_first_rows = rows[0], rows[0]  # unused by the kernel
    else:
        v_gate, v_first_rows = v_gate_raw.reshape(B, C).contiguous(), v_first.reshape(B, C).contiguous()
    mask = attention_mask.reshape(B).contiguous() if attention_mask is not None else rows[0]
    y = torch.empty(B, C, dtype=r.dtype, device=r.device)
    with torch.cuda.device(r.device if r.is_cuda else -1):  # -1: no device switch (interpreter on CPU)
        _time_mix_decode_kernel[(B, H)](
            rows[0], rows[1], rows[2], rows[3], rows[4], v_gate, v_first_rows, rows[5], mask,
            k_k, k_a, r_k, gn_weight, gn_bias, state, y, gn_eps,
            H=H, N=N, FIRST_LAYER=first_layer, HAS_MASK=attention_mask is not None, num_warps=4,
        )
    return y.view(B, 1, C), (v if first_layer else v_first), state

