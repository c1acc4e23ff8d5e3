"""The ops of the RWKV-7 block beside its linear layers: Triton kernels, each next to the plain PyTorch reference it
is checked against. Which of them runs for a call is decided in one place, modeling_rwkv7.choose_path.

References (plain PyTorch; the math; what runs on CPU and under autograd without kernels):
    wkv7_reference       the WKV-7 recurrence over sequences (wkv7_reference.py)
    ops_reference        token shift and lerps, the time mix around WKV-7, activations, cross entropy
                         (ops_reference.py)
    torch_decode         the time mix of one decoding step, tuned for the CPU (torch_decode.py)
    linear_cross_entropy the training loss from the hidden states, chunk by chunk, without the logits (PyTorch)
Triton kernels (importing one imports triton):
    wkv7_chunk           chunked WKV-7, forward and backward (prefill, training)
    time_mix_sequence    the time mix of whole sequences around the chunked WKV-7, forward and backward
    shift_mix_sequence   token shift and lerps of whole sequences, forward and backward (training), also with
                         the LayerNorm before and the linear layers reading them (norm_shift_mix_linear)
    cross_entropy_rows   the cross entropy of a chunk of logits and its gradient (linear_cross_entropy on CUDA)
    relu_square          relu(k)^2, alone and before a linear layer, keeping only k for the backward (training)
    norm_shift_mix_fused token shift and lerps (optionally after a LayerNorm) of a prefill or several decoding rows
    decode_step          the fused ops of a decoding step (norm_mix_linear_decode.py, time_mix_decode.py,
                         linear_decode.py, launched with pdl.py)
Shared: common.py (constants, activation names, device helpers), triton_helpers.py (their Triton side).

The WKV-7 kernels take head size 64, that of every released model. Kernel modules are imported on first use
(`rwkv7_kernels.wkv7_chunk`, ...): CPU-only installs never import triton, and tests set TRITON_INTERPRET=1 before
the first import to run the kernels on the CPU.

modeling_rwkv7.py imports this folder by path (see load_kernels there): transformers' remote-code loader copies
only flat files, so everything here is imported relatively, from inside this package.
"""

import importlib
import re
import warnings

import torch

from . import linear_cross_entropy, ops_reference, torch_decode
from .common import ACTIVATIONS, activation_code, sm_count
from .ops_reference import TimeMixParams
from .wkv7_reference import wkv7_reference

MIN_TRITON = (3, 5)  # the decoding kernels' programmatic dependent launch (gdc_wait) compiles from triton 3.5 on
KERNEL_HEAD_SIZE = 64  # the head size the WKV-7 kernels take
_KERNEL_MODULES = ("wkv7_chunk", "time_mix_sequence", "shift_mix_sequence", "cross_entropy_rows", "relu_square",
                   "norm_shift_mix_fused", "decode_step", "linear_decode", "norm_mix_linear_decode", "time_mix_decode",
                   "pdl", "triton_helpers")


def triton_supported(version):
    """Whether the kernels here compile with this triton version string ("3.5.0", "3.10.1+git...")."""
    major_minor = re.match(r"(\d+)\.(\d+)", version)
    return major_minor is None or tuple(map(int, major_minor.groups())) >= MIN_TRITON


try:  # triton is optional: without it (CPU-only installs) every op runs its reference
    import triton

    HAS_TRITON = triton_supported(triton.__version__)
    if not HAS_TRITON and torch.cuda.is_available():
        warnings.warn(
            f"triton {triton.__version__} is older than {'.'.join(map(str, MIN_TRITON))}, which the bundled RWKV-7 "
            "kernels need: the model runs its PyTorch path on CUDA too, which is much slower. Upgrade PyTorch "
            "(2.9 or newer brings triton 3.5) or triton: pip install -U torch triton"
        )
except ImportError:
    HAS_TRITON = False


def __getattr__(name):
    """The kernel modules, imported on first use."""
    if name in _KERNEL_MODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ACTIVATIONS", "HAS_TRITON", "KERNEL_HEAD_SIZE", "TimeMixParams", "activation_code", "linear_cross_entropy",
           "ops_reference", "sm_count", "torch_decode", "triton_supported", "wkv7_reference", *_KERNEL_MODULES]
