"""The token shift and its lerps over whole sequences, forward and backward (training; prefill with the block's
modules): the inputs of the time mix (six lerps) and of the channel mix (one). The backward reads only x: the lerps'
inputs are recomputed, not stored.

Math: ops_reference.shift_mix_reference without a padding mask:
    x_prev_t = x_{t-1}, with x_{-1} = prev (a row's first token) or 0 (a packed sequence's first token)
    mixed[m, t] = x_t + (x_prev_t - x_t) * mixes[m]
Backward:
    dx_t = sum_m dmixed[m, t] (1 - mixes[m]) + sum_m dmixed[m, t + 1] mixes[m]   (t + 1 in the same sequence)
    dmixes[m] = sum_t dmixed[m, t] (x_prev_t - x_t);   dprev = sum_m dmixed[m, 0] mixes[m]
The new prev (x of a row's last token) is sliced from x outside, under autograd.

Shapes, layouts, dtypes:
    x          : [B * T, C] rows, contiguous, the model dtype
    prev       : [B, C] contiguous
    mixes      : M vectors of C elements (M <= 7)
    starts     : [B * T] int8, 1 at the first token of each packed sequence, or none (rows are sequences)
    mixed      : M tensors [B * T, C] in x's dtype; dx like x; dmixes summed per block of rows in float32
                 ([blocks, M, C]), then over blocks
Computed in float32. One program per (block of BLOCK_T rows, block of BLOCK_C channels): nothing here reduces over
channels, so a program needs no whole row.
"""

import torch
import triton
import triton.language as tl

from .common import launch_device

MAX_MIXES = 7
BLOCK_T = 32
BLOCK_C = 128


@triton.jit
def _starts(starts_ptr, rows, rows_total, T, PACKED: tl.constexpr):
    """Whether each row is the first token of a row of x or of a packed sequence."""
    first = (rows % T) == 0
    if PACKED:
        first = first | (tl.load(starts_ptr + rows, mask=rows < rows_total, other=0) != 0)
    return first


@triton.jit
def _tile(x_ptr, prev_ptr, starts_ptr, rows_total, T, C, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
          PACKED: tl.constexpr):
    """This program's tile: rows, columns, mask, offsets, x, x_prev - x (x_prev: the row before; prev at a row's
    first token; zeros at a packed sequence's first) and which rows are first tokens."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    inside = (rows < rows_total)[:, None] & (cols < C)[None, :]
    at = rows.to(tl.int64)[:, None] * C + cols[None, :]
    x = tl.load(x_ptr + at, mask=inside, other=0.0).to(tl.float32)
    first = _starts(starts_ptr, rows, rows_total, T, PACKED)
    x_prev = tl.load(x_ptr + at - C, mask=inside & ~first[:, None], other=0.0).to(tl.float32)
    if not PACKED:
        at_prev = (rows // T).to(tl.int64)[:, None] * C + cols[None, :]
        x_prev += tl.load(prev_ptr + at_prev, mask=inside & first[:, None], other=0.0).to(tl.float32)
    return rows, cols, inside, at, x, x_prev - x, first


@triton.jit(do_not_specialize=["T", "M"])  # Triton compiles an int equal to 1 into a kernel of its own
def _shift_mix_fwd_kernel(x_ptr, prev_ptr, starts_ptr, mixes, outs, rows_total, T, C, M,
                          BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, PACKED: tl.constexpr):
    rows, cols, inside, at, x, delta, _ = _tile(x_ptr, prev_ptr, starts_ptr, rows_total, T, C, BLOCK_T, BLOCK_C,
                                                PACKED)
    for m in tl.static_range(len(mixes)):  # always MAX_MIXES pointers, M of them used
        if m < M:
            mix = tl.load(mixes[m] + cols, mask=cols < C, other=0.0).to(tl.float32)[None, :]
            tl.store(outs[m] + at, (x + delta * mix).to(outs[m].dtype.element_ty), mask=inside)


@triton.jit(do_not_specialize=["T", "M"])
def _shift_mix_bwd_kernel(x_ptr, prev_ptr, starts_ptr, mixes, d_outs, dx_ptr, dprev_ptr, dmix_ptr, rows_total, T, C,
                          M, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, PACKED: tl.constexpr,
                          PREV_GRAD: tl.constexpr):
    rows, cols, inside, at, x, delta, first = _tile(x_ptr, prev_ptr, starts_ptr, rows_total, T, C, BLOCK_T, BLOCK_C,
                                                    PACKED)
    # the next row reads this one as its x_prev unless it starts a row or a packed sequence
    nexts = rows + 1
    next_inside = inside & ((nexts < rows_total) & ~_starts(starts_ptr, nexts, rows_total, T, PACKED))[:, None]
    dx = tl.zeros((BLOCK_T, BLOCK_C), tl.float32)
    d_prev = tl.zeros((BLOCK_T, BLOCK_C), tl.float32)
    for m in tl.static_range(len(d_outs)):
        if m < M:
            mix = tl.load(mixes[m] + cols, mask=cols < C, other=0.0).to(tl.float32)[None, :]
            d_out = tl.load(d_outs[m] + at, mask=inside, other=0.0).to(tl.float32)
            d_next = tl.load(d_outs[m] + at + C, mask=next_inside, other=0.0).to(tl.float32)
            dx += d_out * (1 - mix) + d_next * mix
            d_prev += d_out * mix
            tl.store(dmix_ptr + (tl.program_id(0) * M + m) * C + cols, tl.sum(d_out * delta, 0), mask=cols < C)
    tl.store(dx_ptr + at, dx.to(dx_ptr.dtype.element_ty), mask=inside)
    if PREV_GRAD:  # a row's first token read prev
        at_prev = (rows // T).to(tl.int64)[:, None] * C + cols[None, :]
        tl.store(dprev_ptr + at_prev, d_prev.to(dprev_ptr.dtype.element_ty), mask=inside & first[:, None])


def _pointers(tensors):
    """Always MAX_MIXES pointers (the unused ones repeat the first): one compiled kernel serves both mixes."""
    return tuple(tensors) + tuple(tensors[:1]) * (MAX_MIXES - len(tensors))


class _ShiftMixSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, prev, starts, T, *mixes):
        rows, C = x.shape
        outs = [torch.empty_like(x) for _ in mixes]
        grid = (triton.cdiv(rows, BLOCK_T), triton.cdiv(C, BLOCK_C))
        _shift_mix_fwd_kernel[grid](x, prev, x if starts is None else starts, _pointers(mixes), _pointers(outs),
                                    rows, T, C, len(mixes), BLOCK_T=BLOCK_T, BLOCK_C=BLOCK_C,
                                    PACKED=starts is not None, num_warps=4)
        ctx.save_for_backward(x, prev, starts, *mixes)
        ctx.T = T
        return tuple(outs)

    @staticmethod
    def backward(ctx, *d_outs):
        x, prev, starts, *mixes = ctx.saved_tensors
        rows, C = x.shape
        grid = (triton.cdiv(rows, BLOCK_T), triton.cdiv(C, BLOCK_C))
        d_outs = [d.contiguous() for d in d_outs]
        dx = torch.empty_like(x)
        prev_grad = ctx.needs_input_grad[1] and starts is None
        dprev = torch.empty_like(prev) if prev_grad else None
        dmix = torch.empty(grid[0], len(mixes), C, dtype=torch.float32, device=x.device)
        _shift_mix_bwd_kernel[grid](x, prev, x if starts is None else starts, _pointers(mixes), _pointers(d_outs),
                                    dx, prev if dprev is None else dprev, dmix, rows, ctx.T, C, len(mixes),
                                    BLOCK_T=BLOCK_T, BLOCK_C=BLOCK_C, PACKED=starts is not None,
                                    PREV_GRAD=prev_grad, num_warps=4)
        if ctx.needs_input_grad[1] and dprev is None:  # packed sequences start from zeros, not from prev
            dprev = torch.zeros_like(prev)
        dmix = dmix.sum(0)
        return (dx, dprev, None, None, *(d.to(m.dtype).view_as(m) for d, m in zip(dmix, mixes)))


def shift_mix_sequence(x, prev, mixes, attention_mask=None, in_place=False, cu_seqlens=None):
    """The token shift and lerps of whole sequences, differentiable. Arguments and results: those of
    ops_reference.shift_mix_reference (x [B, T, C]; prev [B, C]; mixes: up to 7 tensors of C elements; cu_seqlens
    [N + 1] with B = 1 or None), without a padding mask or in-place update (those run the reference)."""
    if attention_mask is not None or in_place:
        raise ValueError("shift_mix_sequence takes sequences without padding and returns a new prev")
    B, T, C = x.shape
    if not 0 < len(mixes) <= MAX_MIXES or any(m.numel() != C for m in mixes):
        raise ValueError(f"1 to {MAX_MIXES} mixes of {C} elements are needed, got {[m.numel() for m in mixes]}")
    starts = None
    if cu_seqlens is not None:
        starts = torch.zeros(B * T, dtype=torch.int8, device=x.device).index_fill_(0, cu_seqlens[:-1].long(), 1)
    with launch_device(x):
        mixed = _ShiftMixSequence.apply(x.reshape(B * T, C).contiguous(), prev.contiguous(), starts, T,
                                        *(m.reshape(C) for m in mixes))
    return [m.view(B, T, C) for m in mixed], x[:, -1].clone()
