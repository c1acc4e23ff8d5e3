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
the log-softmax. The memory of the unfused loss is [N, V] logits in the model dtype, their float32 copy and both
their gradients: gigabytes for a World vocabulary (V = 65536) at a few thousand tokens. Here a chunk of rows at a
time has its logits in float32, and their gradient is turned at once into the gradients of hidden and weight (two
matrix products per chunk), which the backward only scales: the forward keeps those gradients instead of logits.
"""

import torch


def _chunks(N, V, rows=None):
    """Row ranges of the chunks: by default about 2**28 float32 logits (1 GiB) each, never fewer than 256 rows."""
    rows = rows or max(256, 2**28 // V)
    return [(start, min(start + rows, N)) for start in range(0, N, rows)]


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, count, ignore_index, need_hidden_grad, need_weight_grad, chunk_rows):
        N, V = hidden.shape[0], weight.shape[0]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if need_hidden_grad else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight_grad else None
        for start, end in _chunks(N, V, chunk_rows):
            h, y = hidden[start:end], labels[start:end]
            logits = (h @ weight.T).float()
            lse = torch.logsumexp(logits, dim=-1)
            has_label = y != ignore_index
            target = y.masked_fill(~has_label, 0)
            total += torch.where(has_label, lse - logits.gather(1, target[:, None]).squeeze(1), 0.0).sum()
            if grad_hidden is None and grad_weight is None:
                continue
            # d loss / d logits = (softmax - one_hot(label)) / count, zero for rows without a label
            grad = logits.sub_(lse[:, None]).exp_()
            grad[torch.arange(end - start, device=grad.device), target] -= 1.0
            grad = (grad * (has_label / count)[:, None]).to(hidden.dtype)
            if grad_hidden is not None:
                grad_hidden[start:end] = grad @ weight
            if grad_weight is not None:
                grad_weight += (grad.T @ h).float()
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total / count

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        grad_hidden = grad_hidden * grad_loss if grad_hidden is not None else None
        grad_weight = (grad_weight * grad_loss).to(ctx.weight_dtype) if grad_weight is not None else None
        return grad_hidden, grad_weight, None, None, None, None, None, None


def linear_cross_entropy(hidden, weight, labels, num_items_in_batch=None, ignore_index=-100, chunk_rows=None):
    """The mean cross entropy of the logits hidden W^T against labels (see the module docstring); differentiable in
    hidden and weight. num_items_in_batch: the count to divide by (default: the rows with a label). chunk_rows: rows
    a chunk (default: about 1 GiB of float32 logits)."""
    count = (labels != ignore_index).sum() if num_items_in_batch is None else num_items_in_batch
    count = torch.as_tensor(count, device=hidden.device).float().clamp(min=1)
    grad = torch.is_grad_enabled()
    need_hidden_grad, need_weight_grad = grad and hidden.requires_grad, grad and weight.requires_grad
    return _LinearCrossEntropy.apply(hidden, weight, labels, count, ignore_index, need_hidden_grad, need_weight_grad,
                                     chunk_rows)
