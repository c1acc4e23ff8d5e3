"""relu(k)^2 that keeps only k for the backward, alone and before a linear layer (the channel mix's second half):
one kernel squares and one forms the gradient, where relu and square under autograd keep relu(k) and pass over
tensors as large as k ([B, T, 4 C]) six times, forward and backward.

Math: ops_reference.activation_reference(k, "relu2"):
    y = relu(k)^2;  dk = 2 relu(k) dy
    relu_square_linear: out = relu(k)^2 W^T;  dW = dout^T relu(k)^2 (recomputed);  dk = 2 relu(k) (dout W)

Shapes, layouts, dtypes:
    k, dk : [N] (any shape, contiguous, read flat), a 16-bit or float32 dtype
    y, dy : as k; y in the linear layer's dtype before one (autocast's, where it is on)
Computed in float32 and rounded once: for 16-bit and float32 inputs the bits of PyTorch's relu, square and their
backward. One program per BLOCK elements.
"""

import torch
import triton
import triton.language as tl

from .common import cast, launch_device, linear_dtype

BLOCK = 4096


@triton.jit
def _relu_square_kernel(k_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < n
    relu = tl.maximum(tl.load(k_ptr + offsets, mask=inside, other=0.0).to(tl.float32), 0.0)
    tl.store(y_ptr + offsets, (relu * relu).to(y_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _relu_square_backward_kernel(k_ptr, dy_ptr, dk_ptr, y_ptr, n, BLOCK: tl.constexpr, WRITE_Y: tl.constexpr):
    """dk = 2 relu(k) dy (dk may be dy itself); with WRITE_Y also y = relu(k)^2."""
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < n
    relu = tl.maximum(tl.load(k_ptr + offsets, mask=inside, other=0.0).to(tl.float32), 0.0)
    dy = tl.load(dy_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
    tl.store(dk_ptr + offsets, (2.0 * relu * dy).to(dk_ptr.dtype.element_ty), mask=inside)
    if WRITE_Y:
        tl.store(y_ptr + offsets, (relu * relu).to(y_ptr.dtype.element_ty), mask=inside)


def _square(k, dtype):
    y = torch.empty(k.shape, dtype=dtype, device=k.device)
    with launch_device(k):
        _relu_square_kernel[(triton.cdiv(k.numel(), BLOCK),)](k, y, k.numel(), BLOCK=BLOCK, num_warps=8)
    return y


def _backward(k, dy, dk, y=None):
    """Writes dk = 2 relu(k) dy (dk may be dy itself) and, given y, relu(k)^2 into y; returns dk."""
    with launch_device(k):
        _relu_square_backward_kernel[(triton.cdiv(k.numel(), BLOCK),)](
            k, dy, dk, dk if y is None else y, k.numel(), BLOCK=BLOCK, WRITE_Y=y is not None, num_warps=8)
    return dk


class _ReluSquare(torch.autograd.Function):
    @staticmethod
    def forward(ctx, k):
        ctx.save_for_backward(k)
        return _square(k, k.dtype)

    @staticmethod
    def backward(ctx, dy):
        (k,) = ctx.saved_tensors
        return _backward(k, dy.contiguous(), torch.empty_like(k))


class _ReluSquareLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, k, weight, dtype):
        ctx.save_for_backward(k, weight)
        ctx.dtype = dtype
        return _square(k, dtype) @ cast(weight, dtype).T

    @staticmethod
    def backward(ctx, d_out):
        k, weight = ctx.saved_tensors
        dy = d_out @ cast(weight, ctx.dtype)
        y = torch.empty(k.shape, dtype=ctx.dtype, device=k.device) if ctx.needs_input_grad[1] else None
        d_k = _backward(k, dy, dy if dy.dtype == k.dtype else torch.empty_like(k), y)
        d_weight = None if y is None else cast(d_out.T @ y, weight.dtype)
        return d_k, d_weight, None


def relu_square(k):
    """relu(k)^2, differentiable, keeping only k for the backward."""
    return _ReluSquare.apply(k.contiguous())


def relu_square_linear(k, weight):
    """relu(k)^2 W^T for k [..., F] and weight [C, F] (nn.Linear's layout, no bias), differentiable in both. Under
    autocast the product is in the autocast dtype, as an nn.Linear's would be."""
    dtype = linear_dtype(k)
    out = _ReluSquareLinear.apply(k.reshape(-1, k.shape[-1]).contiguous(), weight, dtype)
    return out.view(*k.shape[:-1], -1)
