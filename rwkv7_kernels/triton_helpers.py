"""Triton pieces shared by the kernels of this folder: the constants of rwkv7_kernels/common.py as compile-time
values, a LayerNorm row, and the activations."""

import triton
import triton.language as tl

from . import common

DECAY_SCALE = tl.constexpr(common.DECAY_SCALE)
KK_EPS = tl.constexpr(common.KK_EPS)


@triton.jit
def layer_norm_params(w_ptr, b_ptr, cols, inside, HAS_BIAS: tl.constexpr):
    """A LayerNorm's weight and bias at cols, float32 (bias 0 where it has none). Separate from layer_norm_row so
    that a decoding kernel can read them before it waits for the previous kernel (pdl.py)."""
    ln_w = tl.load(w_ptr + cols, mask=inside, other=0.0).to(tl.float32)
    if HAS_BIAS:
        ln_b = tl.load(b_ptr + cols, mask=inside, other=0.0).to(tl.float32)
    else:
        ln_b = tl.zeros_like(ln_w)
    return ln_w, ln_b


@triton.jit
def layer_norm_row(x_ptr, ln_w, ln_b, cols, inside, eps, C):
    """LayerNorm of one row x[cols] (cols < C inside), float32, with the weight and bias of layer_norm_params."""
    x = tl.load(x_ptr + cols, mask=inside, other=0.0).to(tl.float32)
    mean = tl.sum(x, 0) / C
    centred = tl.where(inside, x - mean, 0.0)
    return centred / tl.sqrt(tl.sum(centred * centred, 0) / C + eps) * ln_w + ln_b


@triton.jit
def activation(y, code):
    """y through the activation of common.activation_code `code` (compile-time or run-time): none, tanh, sigmoid,
    relu(.)^2."""
    if code == 1:
        y = 2 * tl.sigmoid(2 * y) - 1  # tanh
    elif code == 2:
        y = tl.sigmoid(y)
    elif code == 3:
        y = tl.maximum(y, 0.0)
        y = y * y
    return y
