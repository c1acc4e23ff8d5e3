"""Cross entropy of a linear head, computed chunk by chunk without ever holding all logits: the training loss of
RWKV7ForCausalLM with labels.

Math: ops_reference.linear_cross_entropy_reference:
    loss = sum over rows with a label of (logsumexp(h W^T) - (h W^T)[label]) / count
with count the number of rows that have a label (label != ignore_index), or the caller's num_items_in_batch
(transformers' Trainer passes it so that gradient accumulation weighs every token alike).

Shapes, layouts, dtypes:
    hidden  : [N, C] in the model dtype (the final normalised hidden states, one row per predicted token)
    weight  : [V, C] (nn.Linear's layout), the head's
    labels  : [N] int64, ignore_index where a row has no label
As transformers computes it, the logits of a chunk are the head's output in the model dtype, then float32 for
the log-softmax (ops_reference.cross_entropy_rows_reference; on CUDA its kernel, cross_entropy_rows.py, which keeps
the chunk in the model dtype and writes the gradient over it). The memory of the unfused loss is [N, V] logits in
the model dtype, their float32 copy and both their gradients: gigabytes for a World vocabulary (V = 65536) at a few
thousand tokens. Here one chunk of rows at a time has logits, and their gradient is turned at once into the
gradients of hidden and weight (two matrix products per chunk), which the backward only scales: the forward keeps
those gradients, in the dtypes of hidden and weight, instead of logits.
"""

import torch

from .ops_reference import cross_entropy_rows_reference


def _chunks(N, V, rows=None):
    """Row ranges of the chunks: by default about 2**28 float32 logits (1 GiB) each, never fewer than 256 rows."""
    rows = rows or max(256, 2**28 // V)
    return [(start, min(start + rows, N)) for start in range(0, N, rows)]


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, count, ignore_index, need_hidden_grad, need_weight_grad, chunk_rows,
                rows):
        N, V = hidden.shape[0], weight.shape[0]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if need_hidden_grad else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight_grad else None
        scale = 1 / count
        for start, end in _chunks(N, V, chunk_rows):
            h = hidden[start:end]
            chunk_total, grad = rows(h @ weight.T, labels[start:end], scale, ignore_index,
                                     need_grad=grad_hidden is not None or grad_weight is not None)
            total += chunk_total
            if grad_hidden is not None:
                grad_hidden[start:end] = grad @ weight
            if grad_weight is not None:
                grad_weight += (grad.T @ h).float()
        # summed over the chunks in float32, kept in the weight's dtype (the dtype of its .grad): at 65536 x 2048
        # a float32 copy would be 0.5 GiB more at the start of the backward, when every activation is still kept
        ctx.save_for_backward(grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype))
        return total * scale

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        grad_hidden = grad_hidden * grad_loss if grad_hidden is not None else None
        grad_weight = grad_weight * grad_loss if grad_weight is not None else None
        return grad_hidden, grad_weight, None, None, None, None, None, None, None


def linear_cross_entropy(hidden, weight, labels, num_items_in_batch=None, ignore_index=-100, chunk_rows=None,
                         rows=cross_entropy_rows_reference):
    """The mean cross entropy of the logits hidden W^T against labels (see the module docstring); differentiable in
    hidden and weight. num_items_in_batch: the count to divide by (default: the rows with a label). chunk_rows: rows
    a chunk (default: about 1 GiB of float32 logits). rows: the cross entropy of a chunk of logits and its gradient
    (ops_reference.cross_entropy_rows_reference's signature; the Triton kernel of cross_entropy_rows.py on CUDA)."""
    count = (labels != ignore_index).sum() if num_items_in_batch is None else num_items_in_batch
    count = torch.as_tensor(count, device=hidden.device).float().clamp(min=1)
    grad = torch.is_grad_enabled()
    need_hidden_grad, need_weight_grad = grad and hidden.requires_grad, grad and weight.requires_grad
    return _LinearCrossEntropy.apply(hidden, weight, labels, count, ignore_index, need_hidden_grad, need_weight_grad,
                                     chunk_rows, rows)
