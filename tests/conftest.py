"""Test-session environment: nothing reaches the Hub, transformers' remote-code cache is a temporary folder, and
without a GPU the Triton kernels run under Triton's interpreter on the CPU. Triton reads TRITON_INTERPRET when it
is first imported, so it is set here, before any test module imports it."""

import importlib.util
import os
import tempfile

import pytest
import torch
import transformers

# dev.sh runs the suite again with other transformers versions beside the environment's, and names the version it
# meant to run: stop at once if another one was imported
_EXPECTED = os.environ.get("RWKV7_TEST_TRANSFORMERS")
if _EXPECTED and transformers.__version__ != _EXPECTED:
    raise RuntimeError(
        f"RWKV7_TEST_TRANSFORMERS={_EXPECTED}, but transformers {transformers.__version__} was imported from "
        f"{transformers.__file__}: check PYTHONPATH"
    )

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["RWKV_V7_ON"] = "1"  # the official `rwkv` package reads it at import time
os.environ.setdefault("HF_MODULES_CACHE", tempfile.mkdtemp(prefix="hf_modules_"))
# WKV7_TEST_DEVICE=cpu runs the kernel tests under the interpreter on a CUDA machine too
KERNEL_TEST_DEVICE = os.environ.get("WKV7_TEST_DEVICE", "cuda" if torch.cuda.is_available() else "cpu")
if KERNEL_TEST_DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _interpreter_handles_bfloat16_like_gpus():
    """Triton's interpreter keeps bfloat16 tensors as their uint16 bit patterns, and two of its ops get them wrong:
    a float32 -> bfloat16 cast truncates the mantissa, where GPUs round to nearest even (cvt.rn.bf16.f32), and
    tl.dot multiplies the bit patterns as integers. The chunked kernel keeps intermediates in bfloat16 for bfloat16
    inputs and multiplies some of them in bfloat16: make the interpreter round and multiply as GPUs do."""
    import numpy as np
    import triton.language as tl
    from triton.runtime.interpreter import InterpreterBuilder, TensorHandle

    def bf16_bits_to_float32(x):
        return (np.asarray(x, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)

    truncate, dot = InterpreterBuilder.create_fp_trunc, InterpreterBuilder.create_dot

    def create_fp_trunc(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            x = torch.from_numpy(np.array(src.data, dtype=np.float32)).to(torch.bfloat16)
            return TensorHandle(x.view(torch.int16).numpy().view(np.uint16), tl.bfloat16)
        return truncate(self, src, dst_type)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.dtype.scalar == tl.bfloat16 and b.dtype.scalar == tl.bfloat16:  # products are exact in float32
            a = TensorHandle(bf16_bits_to_float32(a.data), tl.float32)
            b = TensorHandle(bf16_bits_to_float32(b.data), tl.float32)
        return dot(self, a, b, d, input_precision, max_num_imprecise_acc)

    InterpreterBuilder.create_fp_trunc = create_fp_trunc
    InterpreterBuilder.create_dot = create_dot


if os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton") is not None:
    _interpreter_handles_bfloat16_like_gpus()


def pytest_report_header():
    return f"transformers {transformers.__version__} ({os.path.dirname(transformers.__file__)}), torch {torch.__version__}"


def pytest_collection_modifyitems(items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason='needs a CUDA GPU: python -m pytest -m "gpu or kernels" on a machine with one')
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

