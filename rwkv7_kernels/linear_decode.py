"""A linear layer applied to one row (batch-1 decoding), with its activation and residual add fused, in Triton.

Math: ops_reference.linear_reference: y = residual + activation(x W^T + bias).

Shapes, layouts, dtypes:
    x        : [K] (one row; the model dtype)
    weight   : [N, K] contiguous (nn.Linear's layout), bias [N] or None
    residual : [N] or None
    y        : [N] in x's dtype
    activation: None, "tanh", "sigmoid" or "relu2" (relu(.)^2)
Accumulates in float32. One program per block of BLOCK_N output rows, streaming the weight rows in BLOCK_K wide
tiles: a matrix-vector product is a pass over the weight, and small row blocks spread that pass over every SM
(faster than cuBLAS's batch-1 kernels on these shapes: benchmarks/bench_linear_row.py).
"""

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from . import pdl
from .common import activation_code, launch_device
from .triton_helpers import activation


@triton.jit
def _linear_row_kernel(x_ptr, w_ptr, b_ptr, res_ptr, y_ptr, N, K, HAS_BIAS: tl.constexpr,
                       HAS_RESIDUAL: tl.constexpr, ACTIVATION: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    if PDL:
        gdc_launch_dependents()
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_rows = rows < N
    w_rows = w_ptr + rows[:, None].to(tl.int64) * K
    cols = tl.arange(0, BLOCK_K)
    # the first weight tile is read before waiting for the previous kernel (no kernel writes it: rwkv7_kernels/pdl.py);
    # each later tile is requested one step ahead of its use
    w = tl.load(w_rows + cols[None, :], mask=in_rows[:, None] & (cols < K)[None, :], other=0.0)
    if PDL:
        gdc_wait()
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_ptr + k0 + cols, mask=k0 + cols < K, other=0.0).to(tl.float32)
        next_cols = k0 + BLOCK_K + cols
        w_next = tl.load(w_rows + next_cols[None, :], mask=in_rows[:, None] & (next_cols < K)[None, :], other=0.0)
        acc += tl.sum(w.to(tl.float32) * x[None, :], 1)
        w = w_next
    if HAS_BIAS:
        acc += tl.load(b_ptr + rows, mask=in_rows, other=0.0).to(tl.float32)
    acc = activation(acc, ACTIVATION)
    if HAS_RESIDUAL:
        acc += tl.load(res_ptr + rows, mask=in_rows, other=0.0).to(tl.float32)
    tl.store(y_ptr + rows, acc.to(y_ptr.dtype.element_ty), mask=in_rows)


@torch.no_grad()
def linear_row(x, weight, bias=None, activation=None, residual=None):
    """y = residual + activation(x @ weight.T + bias) for x with a single row ([..., K], one row in all)."""
    N, K = weight.shape
    y = torch.empty(*x.shape[:-1], N, dtype=x.dtype, device=x.device)
    # tiles as wide as K up to 1024 and four rows a program: the best over the released models' decoding shapes
    # (benchmarks/bench_linear_row.py and whole decoding steps; see benchmarks/README.md)
    BLOCK_K = min(1024, max(128, triton.next_power_of_2(K)))
    BLOCK_N = 4 if K > 128 else 8
    with launch_device(x):
        _linear_row_kernel[(triton.cdiv(N, BLOCK_N),)](
            x.contiguous(), weight, bias if bias is not None else weight, residual.contiguous() if residual is not None
            else x, y, N, K, HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None,
            ACTIVATION=activation_code(activation), BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, PDL=pdl.enabled(x.device),
            num_warps=4, launch_pdl=pdl.enabled(x.device),
        )
    return y
