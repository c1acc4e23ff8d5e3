"""The cross entropy of a chunk of logits and its gradient in one Triton kernel: the inner step of
linear_cross_entropy.py on CUDA. Reads the logits twice and writes their gradient over them, where PyTorch's float32
log-softmax, exp and scaling pass over float32 copies of the chunk some ten times.

Math: ops_reference.cross_entropy_rows_reference:
    lse = logsumexp(logits[n]) (float32);  loss[n] = lse - logits[n, label[n]] for rows with a label, else 0
    grad[n] = (exp(logits[n] - lse) - one_hot(label[n])) * scale, zero in rows without a label

Shapes, layouts, dtypes:
    logits : [N, V] contiguous, the model dtype; overwritten by grad when the gradient is wanted
    labels : [N] int64 (ignore_index: no label)
    scale  : [1] float32 (1 / the loss's count)
    loss   : [N] float32, summed outside
Computed in float32. One program per row: an online logsumexp over blocks of BLOCK_V columns, then a second pass
that writes the gradient.
"""

import torch
import triton
import triton.language as tl

from .common import launch_device

BLOCK_V = 4096


@triton.jit
def _cross_entropy_rows_kernel(logits_ptr, labels_ptr, scale_ptr, loss_ptr, V, ignore_index,
                               BLOCK_V: tl.constexpr, WRITE_GRAD: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * V
    cols = tl.arange(0, BLOCK_V)
    # per column slot, the running maximum and the sum of exp(x - maximum) over the blocks seen
    top = tl.full((BLOCK_V,), float("-inf"), tl.float32)
    total = tl.zeros((BLOCK_V,), tl.float32)
    for start in range(0, V, BLOCK_V):
        x = tl.load(base + start + cols, mask=start + cols < V, other=float("-inf")).to(tl.float32)
        new_top = tl.maximum(top, x)
        # a slot past V in every block so far holds -inf: shift by 0 there (exp(-inf) = 0, not exp(-inf - -inf))
        shift = tl.where(new_top == float("-inf"), 0.0, new_top)
        total = total * tl.exp(top - shift) + tl.exp(x - shift)
        top = new_top
    row_top = tl.max(top, 0)
    lse = row_top + tl.log(tl.sum(total * tl.exp(top - row_top), 0))
    label = tl.load(labels_ptr + row)
    has_label = label != ignore_index
    target = tl.where(has_label, label, 0)
    tl.store(loss_ptr + row, tl.where(has_label, lse - tl.load(base + target).to(tl.float32), 0.0))
    if WRITE_GRAD:
        scale = tl.where(has_label, tl.load(scale_ptr), 0.0)
        for start in range(0, V, BLOCK_V):
            inside = start + cols < V
            x = tl.load(base + start + cols, mask=inside, other=0.0).to(tl.float32)
            grad = (tl.exp(x - lse) - tl.where(start + cols == target, 1.0, 0.0)) * scale
            tl.store(base + start + cols, grad.to(logits_ptr.dtype.element_ty), mask=inside)


def cross_entropy_rows(logits, labels, scale, ignore_index=-100, need_grad=True):
    """ops_reference.cross_entropy_rows_reference in one kernel; the gradient is written over `logits` (returned
    as it)."""
    N, V = logits.shape
    logits, labels = logits.contiguous(), labels.contiguous()
    loss = torch.empty(N, dtype=torch.float32, device=logits.device)
    scale = scale.reshape(1).float()
    with launch_device(logits):
        _cross_entropy_rows_kernel[(N,)](logits, labels, scale, loss, V, ignore_index,
                                         BLOCK_V=min(BLOCK_V, triton.next_power_of_2(V)), WRITE_GRAD=need_grad,
                                         num_warps=8)
    return loss.sum(), logits if need_grad else None
