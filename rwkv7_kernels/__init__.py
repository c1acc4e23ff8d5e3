"""The ops modeling_rwkv7.py calls. On CUDA tensors they run the Triton kernels of this folder; everywhere else
(CPU, or no triton installed) the plain PyTorch reference beside each kernel. Both compute the same function,
which the tests check.

    wkv7            chunked WKV-7 over a sequence, forward and backward (wkv7_chunk.py; wkv7_reference.py)
    time_mix        the time mix between its LoRAs and o_proj (ops_reference.time_mix_reference); without
                    autograd, a sequence is two fused elementwise kernels around the chunked WKV-7
                    (time_mix_sequence.py)
    norm_shift_mix  LayerNorm + token shift + lerps; fused without autograd (norm_shift_mix_fused.py)
    linear          a linear layer with activation and residual; fused for one row (linear_decode.py)
  and, for a decoding step on CUDA (fused_decoding; for one row, three launches per time mix and two per channel mix):
    fused_norm_mix_linear   LayerNorm + token shift + lerps + the projections that read them
                            (norm_mix_linear_decode.py; ops_reference.norm_mix_linear_reference)
    fused_time_mix          the time mix from the LoRA hidden activations to o_proj's input (time_mix_decode.py)

The WKV-7 kernels take head size 64, that of every released model; other head sizes run the references. The
kernel modules are imported on first use, so that tests can import them under TRITON_INTERPRET=1 (set before
their import) to run them on the CPU.

modeling_rwkv7.py imports this folder by path (see `load_kernels` there): transformers' remote-code loader
copies only flat files, so everything here is imported relatively, from inside this package.
"""

import re
import warnings

import torch

from .ops_reference import activation_reference, linear_reference, norm_shift_mix_reference, time_mix_reference
from .wkv7_reference import wkv7_reference

MIN_TRITON = (3, 5)  # the decoding kernels' programmatic dependent launch (gdc_wait) compiles from triton 3.5 on


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


def sm_count(device):
    """Streaming multiprocessors of a CUDA device, which sizes launch configurations; 1 elsewhere (the interpreter)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def _use_kernels(r, v):
    return HAS_TRITON and r.is_cuda and r.shape[-1] == 64 and v.shape[-1] == 64


def fused_inference(x):
    """Whether the fused kernels that have no backward (time_mix's sequence path, norm_shift_mix) run on x: on
    CUDA, without autograd."""
    return HAS_TRITON and x.is_cuda and not torch.is_grad_enabled()


def wkv7(r, w, k, v, a, b, initial_state=None, output_final_state=False, cu_seqlens=None):
    """WKV-7 over a sequence (prefill, training). Layouts and math: wkv7_reference.py. Returns (o, final_state)."""
    if _use_kernels(r, v):
        from .wkv7_chunk import chunk_wkv7

        return chunk_wkv7(r, w, k, v, a, b, initial_state, output_final_state, cu_seqlens)
    return wkv7_reference(r, w, k, v, a, b, initial_state, output_final_state, cu_seqlens)


def time_mix(r, w_raw, k, v, a_raw, v_gate_raw, v_first, g, k_k, k_a, r_k, gn_weight, gn_bias, gn_eps,
             attention_mask=None, state=None, in_place=False):
    """The time mix between its LoRAs and o_proj, with WKV-7 through `wkv7`. Arguments and math:
    ops_reference.time_mix_reference. (Decoding on CUDA runs fused_time_mix instead.) A sequence on CUDA without
    autograd or padding (prefill) runs fused kernels (time_mix_sequence.py)."""
    if fused_inference(r) and r_k.shape[1] == 64 and r.shape[1] > 1 and attention_mask is None and not in_place:
        from .time_mix_sequence import time_mix_sequence

        return time_mix_sequence(r, w_raw, k, v, a_raw, v_gate_raw, v_first, g, k_k, k_a, r_k, gn_weight, gn_bias,
                                 gn_eps, state)
    return time_mix_reference(r, w_raw, k, v, a_raw, v_gate_raw, v_first, g, k_k, k_a, r_k, gn_weight, gn_bias,
                              gn_eps, attention_mask, state, in_place, wkv7=wkv7)


def norm_shift_mix(x, weight, bias, eps, prev, mixes, attention_mask=None, in_place=False):
    """LayerNorm, token shift and lerps: the inputs of a time or channel mix. Arguments and math:
    ops_reference.norm_shift_mix_reference. On CUDA without autograd it is one fused kernel (norm_shift_mix_fused.py),
    except for a sequence with padding."""
    if fused_inference(x) and prev.is_contiguous() and (x.shape[1] == 1 or (attention_mask is None and not in_place)):
        from .norm_shift_mix_fused import norm_shift_mix_fused

        return norm_shift_mix_fused(x, weight, bias, eps, prev, mixes, attention_mask, in_place)
    return norm_shift_mix_reference(x, weight, bias, eps, prev, mixes, attention_mask, in_place)


def fused_decoding(x, head_dim=None):
    """Whether the fused decoding kernels below can run a decoding step of x [B, 1, C]: on CUDA, and for
    fused_time_mix with head size 64."""
    return HAS_TRITON and x.is_cuda and head_dim in (None, 64)


def fused_norm_mix_linear(x, weight, bias, eps, prev, projections, attention_mask=None):
    """A decoding step's LayerNorm, token shift, lerps and the projections reading them, prev [B, C] updated in
    place; CUDA. Arguments and math: ops_reference.norm_mix_linear_reference. One row is one fused kernel
    (norm_mix_linear_decode.py); several rows run the fused norm/shift/mix kernel, then a matmul per projection."""
    if x.shape[0] == 1:
        from .norm_mix_linear_decode import norm_mix_linear_row

        return norm_mix_linear_row(x, weight, bias, eps, prev, projections, attention_mask)
    mixes = [mix for mix, _, _ in projections]
    mixed, _ = norm_shift_mix(x, weight, bias, eps, prev, mixes, attention_mask, in_place=True)
    return [linear(m, w, None, act) for m, (_, w, act) in zip(mixed, projections)]


def fused_time_mix(r, k, v, w_lora, a_lora, v_lora, g_lora, v_first, k_k, k_a, r_k, gn_weight, gn_bias, gn_eps,
                   attention_mask, state):
    """A decoding step's time mix from the LoRA hidden activations on, state updated in place; CUDA. Arguments in
    time_mix_decode.py, math in ops_reference.time_mix_reference. One fused kernel, one program per (row, head),
    which applies its head's LoRA up-projections itself. Beyond 2 programs per SM the LoRA up-projections run first,
    all in one launch, which reads each weight once per block of rows (H100, 132 SMs, 0.4B ranks, CUDA graphs: alone
    4.8 us against 6.2 with the launch at 8 rows and 32 heads, 8.4 against 5.8 at 12 rows; 155 against 110 at 256
    rows, where three matmuls in its place took 112)."""
    from .time_mix_decode import lora_up, time_mix_decode_

    if r.shape[0] * r_k.shape[0] > 2 * sm_count(r.device):
        w_lora, a_lora, v_lora, g_lora = lora_up((w_lora, a_lora, v_lora, g_lora))
    return time_mix_decode_(r, k, v, w_lora, a_lora, v_lora, g_lora, v_first, k_k, k_a, r_k, gn_weight, gn_bias,
                            gn_eps, attention_mask, state)


def linear(x, weight, bias=None, activation=None, residual=None):
    """residual + activation(x W^T + bias) (ops_reference.linear_reference). A single row on CUDA without
    autograd (batch-1 decoding) is one fused kernel (linear_decode.py)."""
    if (
        HAS_TRITON
        and x.is_cuda
        and x.numel() == x.shape[-1]
        and weight.is_contiguous()
        and not torch.is_grad_enabled()
    ):
        from .linear_decode import linear_row

        return linear_row(x, weight, bias, activation, residual)
    return linear_reference(x, weight, bias, activation, residual)


def apply_activation(y, activation=None, residual=None):
    """residual + activation(y), for a layer that computed y itself. Math: ops_reference.activation_reference."""
    return activation_reference(y, activation, residual)
