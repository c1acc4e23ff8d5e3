"""The token shift and its lerps over whole sequences, forward and backward (training; prefill with the block's
modules): the inputs of the time mix (six lerps) and of the channel mix (one). The backward reads only x: the lerps'
inputs are recomputed, not stored. norm_shift_mix_linear also runs the LayerNorm before the shift and the linear
layers that read the lerps (training with the block's own projections): its backward recomputes the normalised x
inside the kernels from the block's input and the LayerNorm's mean and 1 / std, so nothing but the block's input
(and those two numbers a row) is kept, and forms the LayerNorm weight's and bias's gradients there too.

Math: ops_reference.shift_mix_reference without a padding mask:
    x_prev_t = x_{t-1}, with x_{-1} = prev (a row's first token) or 0 (a packed sequence's first token)
    mixed[m, t] = x_t + (x_prev_t - x_t) * mixes[m]
Backward:
    dx_t = sum_m dmixed[m, t] (1 - mixes[m]) + sum_m dmixed[m, t + 1] mixes[m]   (t + 1 in the same sequence)
    dmixes[m] = sum_t dmixed[m, t] (x_prev_t - x_t);   dprev = sum_m dmixed[m, 0] mixes[m]
The new prev (x of a row's last token) is sliced from x outside, under autograd. With LayerNorm and linear layers:
x = LayerNorm(x_in) = x_hat * weight + bias with x_hat = (x_in - mean) / std per row, and out = mixed[m] W^T for
each weight W reading mix m: dW = dout^T mixed[m], dmixed[m] = sum over its weights of dout W; dx (plus the new
prev's gradient at each row's last token) gives d weight = sum_t dx_t x_hat_t, d bias = sum_t dx_t, and
LayerNorm's backward for x_in.

Shapes, layouts, dtypes:
    x          : [B * T, C] rows, contiguous, the model dtype
    prev       : [B, C] contiguous
    mixes      : M vectors of C elements (M <= 7)
    starts     : [B * T] int8, 1 at the first token of each packed sequence, or none (rows are sequences)
    mean, rstd : [B * T] float32 (with a LayerNorm)
    mixed      : [M, B * T, C] in x's dtype (one buffer); dx like x (with a LayerNorm: in its output's dtype); the
                 per-channel sums (dmixes, d weight, d bias) per block of rows in float32 ([blocks, M (+ 2), C]),
                 then over blocks
Computed in float32. One program per (block of BLOCK_T rows, block of BLOCK_C channels): nothing here reduces over
channels, so a program needs no whole row.
"""

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .common import as_gradients, cast, launch_device, linear_dtype

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
def _normalized(x, rows, row_mask, cols, C, norm, NORM_BIAS: tl.constexpr, NORM_DTYPE: tl.constexpr):
    """The LayerNorm of a tile of x from its rows' mean and 1 / std (norm: pointers to those [rows], the weight and
    the bias), rounded to NORM_DTYPE as the LayerNorm's output is, zeros outside row_mask; and x normalised before
    the weight and the bias."""
    mean_ptr, rstd_ptr, weight_ptr, bias_ptr = norm
    mean = tl.load(mean_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)[:, None]
    rstd = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)[:, None]
    x_hat = (x - mean) * rstd
    y = x_hat * tl.load(weight_ptr + cols, mask=cols < C, other=0.0).to(tl.float32)[None, :]
    if NORM_BIAS:
        y += tl.load(bias_ptr + cols, mask=cols < C, other=0.0).to(tl.float32)[None, :]
    return tl.where(row_mask[:, None], y.to(NORM_DTYPE).to(tl.float32), 0.0), x_hat


@triton.jit
def _tile(x_ptr, prev_ptr, starts_ptr, norm, rows_total, T, C, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
          PACKED: tl.constexpr, NORM: tl.constexpr, NORM_BIAS: tl.constexpr, NORM_DTYPE: tl.constexpr):
    """This program's tile: rows, columns, mask, offsets, x, x_prev - x (x_prev: the row before; prev at a row's
    first token; zeros at a packed sequence's first), which rows are first tokens, and with NORM (x is the
    LayerNorm's input, _normalized's norm) x normalised before the LayerNorm's weight and bias (else x)."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    inside = (rows < rows_total)[:, None] & (cols < C)[None, :]
    at = rows.to(tl.int64)[:, None] * C + cols[None, :]
    x = tl.load(x_ptr + at, mask=inside, other=0.0).to(tl.float32)
    first = _starts(starts_ptr, rows, rows_total, T, PACKED)
    x_prev = tl.load(x_ptr + at - C, mask=inside & ~first[:, None], other=0.0).to(tl.float32)
    x_hat = x
    if NORM:
        x, x_hat = _normalized(x, rows, rows < rows_total, cols, C, norm, NORM_BIAS, NORM_DTYPE)
        x_prev, _ = _normalized(x_prev, rows - 1, (rows < rows_total) & ~first, cols, C, norm, NORM_BIAS, NORM_DTYPE)
    if not PACKED:
        at_prev = (rows // T).to(tl.int64)[:, None] * C + cols[None, :]
        x_prev += tl.load(prev_ptr + at_prev, mask=inside & first[:, None], other=0.0).to(tl.float32)
    return rows, cols, inside, at, x, x_prev - x, first, x_hat


# Triton compiles an int equal to 1 into a kernel of its own; rows_total also offsets the outputs in int64
@triton.jit(do_not_specialize=["T", "rows_total"])
def _shift_mix_fwd_kernel(x_ptr, prev_ptr, starts_ptr, norm, mixes, out_ptr, rows_total, T, C,
                          BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, PACKED: tl.constexpr, NORM: tl.constexpr,
                          NORM_BIAS: tl.constexpr, NORM_DTYPE: tl.constexpr):
    """The lerps into out [M, rows, C], M = len(mixes)."""
    rows, cols, inside, at, x, delta, _, _ = _tile(x_ptr, prev_ptr, starts_ptr, norm, rows_total, T, C, BLOCK_T,
                                                   BLOCK_C, PACKED, NORM, NORM_BIAS, NORM_DTYPE)
    for m in tl.static_range(len(mixes)):
        mix = tl.load(mixes[m] + cols, mask=cols < C, other=0.0).to(tl.float32)[None, :]
        out = out_ptr + m * rows_total.to(tl.int64) * C
        tl.store(out + at, (x + delta * mix).to(out_ptr.dtype.element_ty), mask=inside)


@triton.jit(do_not_specialize=["T"])
def _shift_mix_bwd_kernel(x_ptr, prev_ptr, starts_ptr, norm, mixes, d_outs, d_last_ptr, dx_ptr, dprev_ptr, sums_ptr,
                          rows_total, T, C, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, PACKED: tl.constexpr,
                          NORM: tl.constexpr, NORM_BIAS: tl.constexpr, NORM_DTYPE: tl.constexpr,
                          PREV_GRAD: tl.constexpr, LAST_GRAD: tl.constexpr):
    """dx (with NORM: the gradient of the LayerNorm's output), dprev, and per-channel sums over this block's rows: the
    mixes' gradients (M = len(mixes)), then with NORM those of the LayerNorm's weight and bias (sum dx x_hat,
    sum dx)."""
    rows, cols, inside, at, x, delta, first, x_hat = _tile(x_ptr, prev_ptr, starts_ptr, norm, rows_total, T, C,
                                                           BLOCK_T, BLOCK_C, PACKED, NORM, NORM_BIAS, NORM_DTYPE)
    # the next row reads this one as its x_prev unless it starts a row or a packed sequence
    nexts = rows + 1
    next_inside = inside & ((nexts < rows_total) & ~_starts(starts_ptr, nexts, rows_total, T, PACKED))[:, None]
    dx = tl.zeros((BLOCK_T, BLOCK_C), tl.float32)
    d_prev = tl.zeros((BLOCK_T, BLOCK_C), tl.float32)
    M: tl.constexpr = len(mixes)
    sums = sums_ptr + (tl.program_id(0) * (M + 2 * NORM)) * C + cols  # this block's row of sums per channel
    for m in tl.static_range(M):
        mix = tl.load(mixes[m] + cols, mask=cols < C, other=0.0).to(tl.float32)[None, :]
        d_out = tl.load(d_outs[m] + at, mask=inside, other=0.0).to(tl.float32)
        d_next = tl.load(d_outs[m] + at + C, mask=next_inside, other=0.0).to(tl.float32)
        dx += d_out * (1 - mix) + d_next * mix
        d_prev += d_out * mix
        tl.store(sums + m * C, tl.sum(d_out * delta, 0), mask=cols < C)
    if LAST_GRAD:  # the new prev is x (normalised) of each row's last token
        at_last = (rows // T).to(tl.int64)[:, None] * C + cols[None, :]
        dx += tl.load(d_last_ptr + at_last, mask=inside & ((rows % T) == T - 1)[:, None], other=0.0).to(tl.float32)
    tl.store(dx_ptr + at, dx.to(dx_ptr.dtype.element_ty), mask=inside)
    if NORM:
        tl.store(sums + M * C, tl.sum(dx * x_hat, 0), mask=cols < C)
        tl.store(sums + (M + 1) * C, tl.sum(dx, 0), mask=cols < C)
    if PREV_GRAD:  # a row's first token read prev
        at_prev = (rows // T).to(tl.int64)[:, None] * C + cols[None, :]
        tl.store(dprev_ptr + at_prev, d_prev.to(dprev_ptr.dtype.element_ty), mask=inside & first[:, None])


class Norm(NamedTuple):
    """The LayerNorm whose input x the kernels take: its rows' mean and 1 / std ([rows] float32, from
    native_layer_norm), its weight and bias (or None), and the dtype of its output."""

    mean: torch.Tensor
    rstd: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    dtype: torch.dtype


_TRITON_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def _norm_arguments(x, norm):
    """The kernels' arguments for `norm` (a Norm or None: x is the lerps' input itself)."""
    if norm is None:
        return dict(norm=(x, x, x, x), NORM=False, NORM_BIAS=False, NORM_DTYPE=tl.float32)
    pointers = (norm.mean, norm.rstd, norm.weight, norm.weight if norm.bias is None else norm.bias)
    return dict(norm=pointers, NORM=True, NORM_BIAS=norm.bias is not None, NORM_DTYPE=_TRITON_DTYPES[norm.dtype])


def _shift_mix(x, prev, starts, T, mixes, dtype, norm=None):
    """The M lerps [B * T, C] in dtype, of x or of its LayerNorm `norm`: the forward kernel's launch."""
    rows, C = x.shape
    out = torch.empty(len(mixes), rows, C, dtype=dtype, device=x.device)  # one buffer: one pointer to launch with
    grid = (triton.cdiv(rows, BLOCK_T), triton.cdiv(C, BLOCK_C))
    _shift_mix_fwd_kernel[grid](x, prev, x if starts is None else starts, mixes=tuple(mixes), out_ptr=out,
                                rows_total=rows, T=T, C=C, BLOCK_T=BLOCK_T, BLOCK_C=BLOCK_C, PACKED=starts is not None,
                                num_warps=4, **_norm_arguments(x, norm))
    return out.unbind(0)


def _shift_mix_backward(x, prev, starts, T, mixes, d_outs, prev_grad, norm=None, d_last=None):
    """The backward kernel's launch, from the lerps' gradients d_outs (and d_last, the new prev's, or None). Returns
    (dx, or with `norm` the gradient of the LayerNorm's output; dprev or None; per-channel sums [M (+ 2), C] float32:
    the mixes' gradients, then with `norm` its weight's and bias's). prev_grad: whether prev needs its gradient."""
    rows, C = x.shape
    grid = (triton.cdiv(rows, BLOCK_T), triton.cdiv(C, BLOCK_C))
    d_outs = [d.reshape(rows, C).contiguous() for d in d_outs]
    dx = torch.empty_like(x, dtype=x.dtype if norm is None else norm.dtype)
    dprev = torch.empty_like(prev) if prev_grad and starts is None else None
    sums = torch.empty(grid[0], len(mixes) + (0 if norm is None else 2), C, dtype=torch.float32, device=x.device)
    _shift_mix_bwd_kernel[grid](x, prev, x if starts is None else starts, mixes=tuple(mixes),
                                d_outs=tuple(d_outs), d_last_ptr=x if d_last is None else d_last.contiguous(),
                                dx_ptr=dx, dprev_ptr=prev if dprev is None else dprev, sums_ptr=sums, rows_total=rows,
                                T=T, C=C, BLOCK_T=BLOCK_T, BLOCK_C=BLOCK_C, PACKED=starts is not None,
                                PREV_GRAD=dprev is not None, LAST_GRAD=d_last is not None, num_warps=4,
                                **_norm_arguments(x, norm))
    if prev_grad and dprev is None:  # packed sequences start from zeros, not from prev
        dprev = torch.zeros_like(prev)
    return dx, dprev, sums.sum(0)


def _cast(tensors, dtype):
    """`tensors` in dtype (None kept as None)."""
    return [cast(t, dtype) for t in tensors]


# The autograd Functions take x [B, T, C] and return [B, T, N] tensors; they run on [B * T, C] rows, reshaped here
# out of autograd's sight (fewer autograd nodes: less time on the CPU).


class _ShiftMixSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, prev, starts, *mixes):
        B, T, C = x.shape
        rows = x.reshape(B * T, C).contiguous()
        ctx.save_for_backward(rows, prev, starts, *mixes)
        return tuple(m.view(B, T, C) for m in _shift_mix(rows, prev, starts, T, mixes, x.dtype))

    @staticmethod
    def backward(ctx, *d_outs):
        x, prev, starts, *mixes = ctx.saved_tensors
        B, T, C = d_outs[0].shape
        dx, dprev, sums = _shift_mix_backward(x, prev, starts, T, mixes, d_outs, ctx.needs_input_grad[1])
        return (dx.view(B, T, C), dprev, None, *as_gradients(sums, mixes))


class _NormShiftMixLinear(torch.autograd.Function):
    """LayerNorm, the lerps and the linear layers reading them; the backward recomputes the lerps from the block's
    input and the LayerNorm's statistics, in the kernels."""

    @staticmethod
    def forward(ctx, x, norm_weight, norm_bias, eps, prev, starts, reads, dtype, *mixes_and_weights):
        B, T, C = x.shape
        rows = x.reshape(B * T, C).contiguous()
        # computes as nn.LayerNorm's would (autocast's float32 where that is on), keeping its mean and 1 / std
        normed, mean, rstd = torch.native_layer_norm(rows, (C,), norm_weight, norm_bias, eps)
        mixes, weights = mixes_and_weights[:-len(reads)], mixes_and_weights[-len(reads):]
        mixed = _shift_mix(normed, prev, starts, T, mixes, dtype)
        ctx.save_for_backward(rows, norm_weight, norm_bias, mean, rstd, prev, starts, *mixes_and_weights)
        ctx.shape, ctx.reads, ctx.dtype, ctx.norm_dtype = (B, T, C), reads, dtype, normed.dtype
        ctx.set_materialize_grads(False)  # an output nothing reads (the new prev, in training) gets no gradient
        outs = tuple((mixed[m] @ w.T).view(B, T, -1) for m, w in zip(reads, _cast(weights, dtype)))
        return (*outs, normed.view(B, T, C)[:, -1].clone())

    @staticmethod
    def backward(ctx, *d_outs):
        x, norm_weight, norm_bias, mean, rstd, prev, starts, *mixes_and_weights = ctx.saved_tensors
        (B, T, C), reads, dtype = ctx.shape, ctx.reads, ctx.dtype
        *d_outs, d_last = d_outs
        mixes, weights = mixes_and_weights[:-len(reads)], mixes_and_weights[-len(reads):]
        # the kernels take the statistics in float32, as CUDA's LayerNorm keeps them (the CPU's: in x's dtype)
        norm = Norm(mean.view(-1).float(), rstd.view(-1).float(), norm_weight, norm_bias, ctx.norm_dtype)
        mixed = _shift_mix(x, prev, starts, T, mixes, dtype, norm)
        d_mixed = [None] * len(mixes)
        d_weights = []
        weight_grads = ctx.needs_input_grad[-len(reads):]
        for m, w, d_out, weight_grad in zip(reads, _cast(weights, dtype), d_outs, weight_grads):
            if d_out is None:  # an output nothing reads
                d_weights.append(None)
                continue
            d_out = d_out.reshape(B * T, -1)
            d_weights.append(d_out.T @ mixed[m] if weight_grad else None)
            # a mix read by several layers sums their gradients in the product's epilogue
            d_mixed[m] = d_out @ w if d_mixed[m] is None else torch.addmm(d_mixed[m], d_out, w)
        del mixed
        d_mixed = [torch.zeros_like(x, dtype=dtype) if d is None else d for d in d_mixed]
        d_normed, dprev, sums = _shift_mix_backward(x, prev, starts, T, mixes, d_mixed, ctx.needs_input_grad[4], norm,
                                                    d_last)
        dx = None
        if ctx.needs_input_grad[0]:  # the LayerNorm's backward for its input; its weight's and bias's are in sums
            x_n, w_n, b_n = _cast((x, norm_weight, norm_bias), ctx.norm_dtype)
            dx, _, _ = torch.ops.aten.native_layer_norm_backward(d_normed, x_n, (C,), mean, rstd, w_n, b_n,
                                                                 [True, False, False])
            dx = cast(dx, x.dtype).view(B, T, C)
        dw = cast(sums[-2], norm_weight.dtype) if ctx.needs_input_grad[1] else None
        db = cast(sums[-1], norm_bias.dtype) if ctx.needs_input_grad[2] else None
        d_weights = [cast(d, w.dtype) for d, w in zip(d_weights, weights)]
        return (dx, dw, db, None, dprev, None, None, None, *as_gradients(sums[:len(mixes)], mixes), *d_weights)


def _packed_starts(cu_seqlens, rows, device):
    """[rows] int8, 1 at each packed sequence's first token; None without packing."""
    if cu_seqlens is None:
        return None
    return torch.zeros(rows, dtype=torch.int8, device=device).index_fill_(0, cu_seqlens[:-1].long(), 1)


def _check(x, mixes, attention_mask, in_place):
    if attention_mask is not None or in_place:
        raise ValueError("shift_mix_sequence takes sequences without padding and returns a new prev")
    C = x.shape[-1]
    if not 0 < len(mixes) <= MAX_MIXES or any(m.numel() != C for m in mixes):
        raise ValueError(f"1 to {MAX_MIXES} mixes of {C} elements are needed, got {[m.numel() for m in mixes]}")


def shift_mix_sequence(x, prev, mixes, attention_mask=None, in_place=False, cu_seqlens=None):
    """The token shift and lerps of whole sequences, differentiable. Arguments and results: those of
    ops_reference.shift_mix_reference (x [B, T, C]; prev [B, C]; mixes: up to 7 tensors of C elements; cu_seqlens
    [N + 1] with B = 1 or None), without a padding mask or in-place update (those run the reference)."""
    _check(x, mixes, attention_mask, in_place)
    B, T, _ = x.shape
    with launch_device(x):
        mixed = _ShiftMixSequence.apply(x, prev.contiguous(), _packed_starts(cu_seqlens, B * T, x.device),
                                        *(m.contiguous() for m in mixes))
    return list(mixed), x[:, -1].clone()


def norm_shift_mix_linear(x, weight, bias, eps, prev, mixes, weights, attention_mask=None, in_place=False,
                          cu_seqlens=None):
    """LayerNorm (weight, bias, eps), the token shift and lerps of whole sequences, and the linear layers (no bias)
    that read the lerps, differentiable: the backward recomputes the normalised x and the lerps from x and the
    LayerNorm's mean and 1 / std, so only those are kept for it, not the LayerNorm's output and the M lerps.

    x [B, T, C]: the block's input; prev, mixes, cu_seqlens: as shift_mix_sequence. weights: for each mix, the
    weights [N_i, C] of the linear layers that read its lerp. Returns (mixed[m] W^T [B, T, N_i] for each weight W of
    each mix, in order; the new prev, the normalised x of each row's last token). Under autocast the LayerNorm
    computes as nn.LayerNorm's and the lerps and products in the autocast dtype, as an nn.Linear's would.
    """
    _check(x, mixes, attention_mask, in_place)
    if weight is None:
        raise ValueError("norm_shift_mix_linear needs the LayerNorm's weight (nn.LayerNorm's elementwise_affine=True)")
    B, T, _ = x.shape
    dtype = linear_dtype(x)
    reads = tuple(m for m, read in enumerate(weights) for _ in read)
    starts = _packed_starts(cu_seqlens, B * T, x.device)
    with launch_device(x):
        *outs, last = _NormShiftMixLinear.apply(x, weight, bias, eps, prev.contiguous(), starts, reads, dtype,
                                                *(m.contiguous() for m in mixes), *(w for read in weights for w in read))
    return outs, last
