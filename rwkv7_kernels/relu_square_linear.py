"""The channel mix's second half, relu(k)^2 W^T, whose backward recomputes relu(k)^2 from k instead of keeping it
(training with the block's own value projection): the forward keeps only k, where relu, square and the linear layer
under autograd would keep relu(k) and relu(k)^2, each as large as k ([B, T, 4 C]). Plain PyTorch.

Math: out = relu(k)^2 W^T (the reference: RWKV7ChannelMix's value(relu(key(x))^2)).
Backward: dW = dout^T relu(k)^2;  dk = (dout W) 2 relu(k).
"""

import torch

from .common import linear_dtype


class _ReluSquareLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, k, weight, dtype):
        ctx.save_for_backward(k, weight)
        ctx.dtype = dtype
        return torch.relu(k).square().to(dtype) @ weight.to(dtype).T

    @staticmethod
    def backward(ctx, d_out):
        k, weight = ctx.saved_tensors
        relu = torch.relu(k).to(ctx.dtype)
        d_weight = (d_out.T @ relu.square()).to(weight.dtype) if ctx.needs_input_grad[1] else None
        d_k = (d_out @ weight.to(ctx.dtype)).mul_(relu).mul_(2).to(k.dtype) if ctx.needs_input_grad[0] else None
        return d_k, d_weight, None


def relu_square_linear(k, weight):
    """relu(k)^2 W^T for k [..., F] and weight [C, F] (nn.Linear's layout, no bias), differentiable in both. Under
    autocast the product is in the autocast dtype, as an nn.Linear's would be."""
    dtype = linear_dtype(k)
    out = _ReluSquareLinear.apply(k.reshape(-1, k.shape[-1]), weight, dtype)
    return out.view(*k.shape[:-1], -1)
