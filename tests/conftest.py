"""Test-session environment: nothing reaches the Hub, transformers' remote-code cache is a temporary folder, and
without a GPU the Triton kernels run under Triton's interpreter on the CPU. Triton reads TRITON_INTERPRET when it
is first imported, so it is set here, before any test module imports it."""

import os
import tempfile

import torch

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["RWKV_V7_ON"] = "1"  # the official `rwkv` package reads it at import time
os.environ.setdefault("HF_MODULES_CACHE", tempfile.mkdtemp(prefix="hf_modules_"))
# WKV7_TEST_DEVICE=cpu runs the kernel tests under the interpreter on a CUDA machine too
KERNEL_TEST_DEVICE = os.environ.get("WKV7_TEST_DEVICE", "cuda" if torch.cuda.is_available() else "cpu")
if KERNEL_TEST_DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")
