"""What a benchmark needs, checked before it starts: a clear message instead of a traceback."""

import sys

import torch


def cuda_gpu(script):
    """Exits with a message unless a CUDA GPU is available."""
    if not torch.cuda.is_available():
        sys.exit(
            f"{script} times CUDA kernels and needs a CUDA GPU; this machine has none (torch.cuda.is_available() is "
            f"False, torch {torch.__version__}). Run it on a machine with an NVIDIA GPU and a CUDA build of PyTorch; "
            "--help lists its options."
        )


def fla(script):
    """flash-linear-attention, the peer the GPU benchmarks measure against; exits with a message if it is missing."""
    try:
        import fla as fla_package
    except ImportError:
        sys.exit(
            f"{script} compares against flash-linear-attention, which is not installed: "
            "pip install flash-linear-attention fla-core"
        )
    return fla_package
