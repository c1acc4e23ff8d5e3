"""LayerNorm, token shift and the token-shift lerps, without autograd, as one Triton kernel: the inputs of the time
mix (six lerps) and of the channel mix (one), where PyTorch launches about six kernels.

Math: ops_reference.norm_shift_mix_reference:
    xn_t = LayerNorm(x_t);  mixed[m, t] = xn_t + (xn_{t-1} - xn_t) * mixes[m]  (xn_{-1} = prev);  new prev = xn_{T-1}
A padding mask is handled for one token per row (decoding: a padded token keeps prev); sequences with padding
run the reference.

Shapes, layouts, dtypes:
    x          : [B, T, C] contiguous, the model dtype
    norm       : the LayerNorm's (weight [C], bias [C] or None, eps)
    prev       : [B, C] contiguous, the previous call's last normalised x
    mixes      : M vectors of C elements (M <= 7)
    mask       : [B] (0 = padding; T = 1 only) or None
    out        : [M, B, T, C] in x's dtype; new prev [B, C], written into prev when decoding (in place)
Computed in float32. One program per token: it normalises its own row and the one before (cheaper than a second
pass), and the program of a row's last token writes the new prev.
"""

import torch
import triton
import triton.language as tl

from .common import launch_device
from .triton_helpers import layer_norm_params, layer_norm_row

MAX_MIXES = 7  # the time mix has 7 projections (r, k, v, the 4 LoRAs; v and its LoRA share a mix), the channel mix 1


@triton.jit(do_not_specialize=["B", "T", "M"])  # Triton compiles an int equal to 1 into a kernel of its own
def _norm_shift_mix_kernel(x_ptr, w_ptr, b_ptr, prev_ptr, mixes, mask_ptr, out_ptr, new_prev_ptr, eps, B, T, C, M,
                           BLOCK: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr):
    i_b, i_t = tl.program_id(0) // T, tl.program_id(0) % T
    cols = tl.arange(0, BLOCK)
    inside = cols < C
    token = (i_b.to(tl.int64) * T + i_t) * C
    ln_w, ln_b = layer_norm_params(w_ptr, b_ptr, cols, inside, HAS_BIAS)
    xn = layer_norm_row(x_ptr + token, ln_w, ln_b, cols, inside, eps, C)
    if i_t == 0:
        xn_prev = tl.load(prev_ptr + i_b * C + cols, mask=inside).to(tl.float32)
    else:
        xn_prev = layer_norm_row(x_ptr + token - C, ln_w, ln_b, cols, inside, eps, C)
    delta = xn_prev - xn
    for m in tl.static_range(len(mixes)):  # always MAX_MIXES pointers, M of them read
        if m < M:  # M at run time: the time and channel mixes share one compiled kernel (cold start)
            mix = tl.load(mixes[m] + cols, mask=inside).to(tl.float32)
            out = (xn + delta * mix).to(out_ptr.dtype.element_ty)
            tl.store(out_ptr + m * B * T * C + token + cols, out, mask=inside)
    if i_t == T - 1:
        if HAS_MASK:  # T = 1
            xn = tl.where(tl.load(mask_ptr + i_b) != 0, xn, xn_prev)
        tl.store(new_prev_ptr + i_b * C + cols, xn.to(new_prev_ptr.dtype.element_ty), mask=inside)


@torch.no_grad()
def norm_shift_mix_fused(x, prev, mixes, norm, attention_mask=None, in_place=False):
    """x [B, T, C], prev [B, C] contiguous, mixes: up to 7 vectors of C elements, norm: (weight, bias, eps) of the
    LayerNorm; attention_mask [B, 1] or None (T > 1 needs None).
    Returns (mixed [M, B, T, C], new prev [B, C]): `prev` itself, updated, when in_place (one token per row)."""
    B, T, C = x.shape
    if not prev.is_contiguous() or (T > 1 and (attention_mask is not None or in_place)):
        raise ValueError("a contiguous prev is needed; a padding mask or in-place update only for one token per row")
    mixes = tuple(m.contiguous() for m in mixes)
    M = len(mixes)
    if not 0 < M <= MAX_MIXES or any(m.numel() != C for m in mixes):
        raise ValueError(f"1 to {MAX_MIXES} mixes of {C} elements are needed, got {[m.numel() for m in mixes]}")
    weight, bias, eps = norm
    x = x.contiguous()
    out = torch.empty(M, B, T, C, dtype=x.dtype, device=x.device)
    new_prev = prev if in_place else torch.empty_like(prev)
    mask = attention_mask.reshape(B).contiguous() if attention_mask is not None else x
    # always MAX_MIXES pointers (the unused ones repeat the first), so one compiled kernel serves both mixes
    mixes += mixes[:1] * (MAX_MIXES - M)
    with launch_device(x):
        _norm_shift_mix_kernel[(B * T,)](
            x, weight, bias if bias is not None else weight, prev, mixes, mask, out, new_prev, eps,
            B, T, C, M, BLOCK=triton.next_power_of_2(C), HAS_BIAS=bias is not None,
            HAS_MASK=attention_mask is not None, num_warps=4 if C <= 2048 else 8,
        )
    return out, new_prev
