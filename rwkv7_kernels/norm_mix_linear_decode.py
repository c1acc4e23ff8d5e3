"""The input side of a time or channel mix for one decoding row, as one Triton kernel: LayerNorm, token shift,
one lerp per projection, and the projections (matrix-vector products) with their activations.

Math: ops_reference.norm_mix_linear_reference with B = T = 1 and `prev` updated in place:
    xn = LayerNorm(x);  y_i = act_i((xn + (prev - xn) * mix_i) W_i^T)  for each projection i;  prev <- xn
The time mix has seven projections (r, k, v and the four LoRA down-projections, which share mixes), the channel
mix one (its key, relu^2). Decoding one row would otherwise launch a norm/shift/mix kernel and then one kernel per
projection; a decoding step is a few hundred tiny launches, so every launch removed counts.

Shapes, layouts, dtypes:
    x            : [C] (the residual stream row; the model dtype)
    weight, bias : [C] the LayerNorm's (bias may be None)
    prev         : [C], the previous token's normalised x; overwritten with this token's (kept if masked out)
    mixes        : one [C] vector per projection
    W_i          : [N_i, C] contiguous (nn.Linear's layout)
    y            : [sum N_i] in x's dtype, the projections' outputs one after the other
Every program normalises the row itself (C elements, read from L2) and computes BLOCK_N outputs of one
projection, so the weights stream through all SMs at once. Programs cannot know when the others have read
`prev`, so the last one to finish (an atomic counter) writes the new prev and resets the counter.
"""

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from . import pdl
from .common import activation_code, launch_device
from .triton_helpers import activation, layer_norm_params, layer_norm_row

# outputs per program, and warps (8 for C <= 1024, else 4): the best over whole decoding steps of the released
# shapes (benchmarks/README.md)
BLOCK_N = 8
_COUNTERS = {}  # (device, stream) -> int32 [1], zero between launches


@triton.jit
def _norm_mix_linear_kernel(x_ptr, ln_w_ptr, ln_b_ptr, prev_ptr, mask_ptr, counter_ptr, y_ptr, weights, mixes, eps,
                            C: tl.constexpr, SIZES: tl.constexpr, OFFSETS: tl.constexpr, PROGRAM_ENDS: tl.constexpr,
                            ACTS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr,
                            HAS_MASK: tl.constexpr, PDL: tl.constexpr):
    if PDL:
        gdc_launch_dependents()
    pid = tl.program_id(0)
    # the projection this program works on (programs PROGRAM_ENDS[i - 1] .. PROGRAM_ENDS[i] - 1 make projection i)
    w_ptr, mix_ptr = weights[0], mixes[0]
    first, size, offset, act = pid * 0, SIZES[0] + pid * 0, pid * 0, ACTS[0] + pid * 0
    for i in tl.static_range(1, len(SIZES)):
        if pid >= PROGRAM_ENDS[i - 1]:
            w_ptr, mix_ptr = weights[i], mixes[i]
            first, size, offset = PROGRAM_ENDS[i - 1] + pid * 0, SIZES[i] + pid * 0, OFFSETS[i] + pid * 0
            act = ACTS[i] + pid * 0
    rows = (pid - first) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_rows = rows < size
    cols = tl.arange(0, BLOCK_C)
    inside = cols < C
    # the weights first (the tile, whose read from memory is the kernel's cost, then the LayerNorm's and the mix):
    # no kernel writes them, so they are read before waiting for the previous kernel (rwkv7_kernels/pdl.py)
    w = tl.load(w_ptr + rows[:, None] * C + cols[None, :], mask=in_rows[:, None] & inside[None, :], other=0.0)
    ln_w, ln_b = layer_norm_params(ln_w_ptr, ln_b_ptr, cols, inside, HAS_BIAS)
    mix = tl.load(mix_ptr + cols, mask=inside, other=0.0).to(tl.float32)
    if PDL:
        gdc_wait()

    xn = layer_norm_row(x_ptr, ln_w, ln_b, cols, inside, eps, C)
    prev = tl.load(prev_ptr + cols, mask=inside, other=0.0).to(tl.float32)
    inp = xn + (prev - xn) * mix
    y = activation(tl.sum(w.to(tl.float32) * inp[None, :], 1), act)
    tl.store(y_ptr + offset + rows, y.to(y_ptr.dtype.element_ty), mask=in_rows)

    # every program has read prev once its increment lands; the last one hands this token's xn over
    if tl.atomic_add(counter_ptr, 1, sem="acq_rel") == tl.num_programs(0) - 1:
        if HAS_MASK:
            xn = tl.where(tl.load(mask_ptr) != 0, xn, prev)  # a padded token keeps the previous x
        tl.store(prev_ptr + cols, xn.to(prev_ptr.dtype.element_ty), mask=inside)
        tl.atomic_xchg(counter_ptr, 0)


def _counter(device):
    """A zeroed int32 counter for the launches of one stream: launches on one stream run one after the other, and
    each leaves its counter at zero. (A CUDA graph keeps the counter of the stream it was captured on.)"""
    key = (device, torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0)
    if key not in _COUNTERS:
        _COUNTERS[key] = torch.zeros(1, dtype=torch.int32, device=device)
    return _COUNTERS[key]


@torch.no_grad()
def norm_mix_linear_row(x, weight, bias, eps, prev, projections, attention_mask=None):
    """One decoding row: x [1, 1, C], prev [1, C] (updated in place), projections [(mix [C], W [N, C], activation)].

    Returns the outputs [1, 1, N_i] of the projections, in order (views of one buffer).
    """
    C = x.shape[-1]
    if x.numel() != C or prev.numel() != C or not prev.is_contiguous():
        raise ValueError("one row and a contiguous prev are needed")
    if any(w.shape[1] != C or not w.is_contiguous() for _, w, _ in projections):
        raise ValueError(f"projections must be contiguous [N, {C}] weights")
    sizes = [w.shape[0] for _, w, _ in projections]
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    program_ends = [sum(triton.cdiv(n, BLOCK_N) for n in sizes[: i + 1]) for i in range(len(sizes))]
    y = torch.empty(sum(sizes), dtype=x.dtype, device=x.device)
    mask = attention_mask.reshape(1) if attention_mask is not None else prev
    with launch_device(x):
        _norm_mix_linear_kernel[(program_ends[-1],)](
            x.reshape(C), weight, bias if bias is not None else weight, prev, mask, _counter(x.device), y,
            tuple(w for _, w, _ in projections), tuple(m.reshape(C) for m, _, _ in projections), eps,
            C=C, SIZES=tuple(sizes), OFFSETS=tuple(offsets), PROGRAM_ENDS=tuple(program_ends),
            ACTS=tuple(activation_code(a) for _, _, a in projections), BLOCK_C=triton.next_power_of_2(C),
            BLOCK_N=BLOCK_N, HAS_BIAS=bias is not None, HAS_MASK=attention_mask is not None,
            PDL=pdl.enabled(x.device), num_warps=8 if C <= 1024 else 4, launch_pdl=pdl.enabled(x.device),
        )
    return [part.view(1, 1, -1) for part in y.split(sizes)]
