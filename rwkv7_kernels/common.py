"""What the ops of this folder share, kernels and references alike: the constants of the math, the activation
names, and the device helpers every launch needs. No triton here: the references run without it."""

import math

import torch

# The log decay is -DECAY_SCALE * sigmoid(w0 + tanh(x_w W1) W2), so decays lie in (exp(-exp(-0.5)), 1) = (0.545, 1).
DECAY_SCALE = math.exp(-0.5)
# kk = k * k_k normalised per head with this eps, as the official package's F.normalize.
KK_EPS = 1e-12
# An activation applied after a projection, by name; kernels take its index here.
ACTIVATIONS = (None, "tanh", "sigmoid", "relu2")


def activation_code(name):
    """The kernels' code of an activation name (None, "tanh", "sigmoid" or "relu2": relu(.)^2)."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; one of {ACTIVATIONS}")
    return ACTIVATIONS.index(name)


def linear_dtype(x):
    """The dtype an nn.Linear computes in on x: autocast's where it is on for x's device, else x's."""
    return torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype


def sm_count(device):
    """Streaming multiprocessors of a CUDA device, which size launch configurations; 1 elsewhere (the interpreter)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def launch_device(x):
    """The device context a launch on x's device needs: Triton launches on the current CUDA device. On the CPU
    (Triton's interpreter) a context that changes nothing."""
    return torch.cuda.device(x.device if x.is_cuda else -1)


def cast(t, dtype):
    """t in dtype, None kept: t itself where it is in dtype already (Tensor.to would return it too, but costs a
    dispatch on the CPU, in every training step's hundreds of calls)."""
    return t if t is None or t.dtype == dtype else t.to(dtype)


def as_gradients(sums, parameters):
    """The rows of `sums` (per-channel sums a kernel formed in float32) as the gradients of `parameters` (of one
    dtype), in their shapes: one conversion for all of them."""
    return [s.view_as(p) for s, p in zip(cast(sums, parameters[0].dtype), parameters)]
