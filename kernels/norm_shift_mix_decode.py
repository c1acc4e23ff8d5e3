"""LayerNorm, token shift and the token-shift lerps of one decoding step, as one Triton kernel.

Math: ops_reference.norm_shift_mix_reference with T = 1 and `prev` updated in place. It makes the inputs of the
time mix (six lerps) and of the channel mix (one), where PyTorch would launch about six kernels.

Shapes, layouts, dtypes:
    x          : [B, C] rows of the residual stream (contiguous; the model dtype)
    weight     : [C], bias : [C] or None (the LayerNorm)
    prev       : [B, C] contiguous, the previous token's normalised x, overwritten with this token's
    mixes      : [M, C]
    mask       : [B] (0 = padding: prev is kept) or None
    out        : [M, B, C] in x's dtype
Computed in float32; one program per row.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _norm_shift_mix_kernel(x_ptr, w_ptr, b_ptr, prev_ptr, mix_ptr, mask_ptr, out_ptr, eps, B, C,
                           M: tl.constexpr, BLOCK: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr):
    i_b = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    inside = cols < C
    row = i_b.to(tl.int64) * C + cols
    x = tl.load(x_ptr + row, mask=inside, other=0.0).to(tl.float32)
    mean = tl.sum(x, 0) / C
    centred = tl.where(inside, x - mean, 0.0)
    xn = centred / tl.sqrt(tl.sum(centred * centred, 0) / C + eps) * tl.load(w_ptr + cols, mask=inside).to(tl.float32)
    if HAS_BIAS:
        xn += tl.load(b_ptr + cols, mask=inside).to(tl.float32)
    prev = tl.load(prev_ptr + row, mask=inside).to(tl.float32)
    delta = prev - xn
    for m in tl.static_range(M):
        mix = tl.load(mix_ptr + m * C + cols, mask=inside).to(tl.float32)
        tl.store(out_ptr + m * B * C + row, (xn + delta * mix).to(out_ptr.dtype.element_ty), mask=inside)
    if HAS_MASK:
        xn = tl.where(tl.load(mask_ptr + i_b) != 0, xn, prev)
    tl.store(prev_ptr + row, xn.to(prev_ptr.dtype.element_ty), mask=inside)


@torch.no_grad()
def norm_shift_mix_decode_(x, weight, bias, eps, prev, mixes, attention_mask):
    """One decoding step: x [B, 1, C], prev [B, C] updated in place. Returns (mixed [M, B, 1, C], prev)."""
    B, T, C = x.shape
    if T != 1 or not prev.is_contiguous():
        raise ValueError("one token per row and a contiguous prev are needed")
    M = mixes.shape[0]
    x_rows = x.reshape(B, C).contiguous()
    out = torch.empty(M, B, C, dtype=x.dtype, device=x.device)
    mask = attention_mask.reshape(B).contiguous() if attention_mask is not None else x_rows
    with torch.cuda.device(x.device if x.is_cuda else -1):  # -1: no device switch (interpreter on CPU)
        _norm_shift_mix_kernel[(B,)](
            x_rows, weight, bias if bias is not None else weight, prev, mixes.contiguous(), mask, out, eps, B, C,
            M=M, BLOCK=triton.next_power_of_2(C), HAS_BIAS=bias is not None, HAS_MASK=attention_mask is not None,
            num_warps=4 if C <= 2048 else 8,
        )
    return out.view(M, B, 1, C), prev
