"""Programmatic dependent launch (PDL), for the kernels of a decoding step.

A decoding step is a chain of short kernels, each waiting for the one before. With PDL (compute capability 9.0 and
newer: Hopper, Blackwell) a kernel is launched while its predecessor is still running: it first reads what no kernel
of the step writes (its weights), then waits (`gdc_wait`) until the predecessor has finished and its writes are
visible, and only then reads its inputs and writes anything. Each kernel lets its successor launch as soon as all
of its own programs have started (`gdc_launch_dependents`). That hides most of the launch and memory latency between
kernels. A kernel launched after a non-PDL kernel (any PyTorch op) simply starts when that one has finished.

Kernels take a constexpr PDL flag: False on CPU tensors (Triton's interpreter has no such instructions) and on
GPUs before Hopper.
"""

import functools

import torch


@functools.lru_cache(maxsize=None)
def _capable(device_index):
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def enabled(device):
    """Whether kernels on `device` launch with PDL."""
    return device.type == "cuda" and _capable(device.index if device.index is not None else torch.cuda.current_device())
