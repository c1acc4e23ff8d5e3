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
(cuBLAS's batch-1 kernels took 1.3x to 4x longer on these shapes: benchmarks/bench_linear_row.py).
"""

import torch
import triton
import triton.language as tl

ACTIVATIONS = {None: 0, "tanh": 1, "sigmoid": 2, "relu2": 3}


@triton.jit
def _linear_row_kernel(x_ptr, w_ptr, b_ptr, res_ptr, y_ptr, N, K, HAS_BIAS: tl.constexpr,
                       HAS_RESIDUAL: tl.constexpr, ACTIVATION: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_rows = rows < N
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        in_cols = cols < K
        x = tl.load(x_ptr + cols, mask=in_cols, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + rows[:, None].to(tl.int64) * K + cols[None, :], mask=in_rows[:, None] & in_cols[None, :],
                    other=0.0).to(tl.float32)
        acc += tl.sum(w * x[None, :], 1)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rows, mask=in_rows, other=0.0).to(tl.float32)
    if ACTIVATION == 1:
        acc = 2 * tl.sigmoid(2 * acc) - 1  # tanh
    elif ACTIVATION == 2:
        acc = tl.sigmoid(acc)
    elif ACTIVATION == 3:
        acc = tl.maximum(acc, 0.0)
        acc = acc * acc
    if HAS_RESIDUAL:
        acc += tl.load(res_ptr + rows, mask=in_rows, other=0.0).to(tl.float32)
    tl.store(y_ptr + rows, acc.to(y_ptr.dtype.element_ty), mask=in_rows)


@torch.no_grad()
def linear_row(x, weight, bias=None, activation=None, residual=None):
    """y = residual + activation(x @ weight.T + bias) for x with a single row ([..., K], one row in all)."""
    N, K = weight.shape
    y = torch.empty(*x.shape[:-1], N, dtype=x.dtype, device=x.device)
    # measured on an H200 (benchmarks/bench_linear_row.py): two rows a program, tiles as wide as K up to 1024,
    # within 5% of the best of 80 configurations on every decoding shape of the released models
    BLOCK_K = min(1024, max(128, triton.next_power_of_2(K)))
    BLOCK_N = 2 if K > 128 else 8
    with torch.cuda.device(x.device if x.is_cuda else -1):  # -1: no device switch (interpreter on CPU)
        _linear_row_kernel[(triton.cdiv(N, BLOCK_N),)](
            x.contiguous(), weight, bias if bias is not None else weight, residual.contiguous() if residual is not None
            else x, y, N, K, HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None,
            ACTIVATION=ACTIVATIONS[activation], BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, num_warps=4,
        )
    return y
