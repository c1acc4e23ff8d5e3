"""The whole RWKV-7 time mix of one decoding step, from the LoRA hidden activations to o_proj's input, as one
Triton kernel.

Math: the LoRA up-projections (w, a, v, g), then ops_reference.time_mix_reference with T = 1 and the state updated
in place (the decay, kk, the k update, the v_first mix, the padding mask, the WKV-7 step, the per-head GroupNorm,
the bonus and the gate). Decoding launches this once per layer instead of some thirty small PyTorch kernels.

Shapes, layouts, dtypes:
    r, k, v, v_first        : [B, C] rows (contiguous; the model dtype), C = H * N, N = 64
    LoRA hidden activations : [B, D] per LoRA (tanh(x_w W1), x_a A1, x_v V1, sigmoid(x_g G1); D its rank)
    LoRA up weights         : [C, D] (nn.Linear's layout); biases [C] (w, a, v; g has none)
                              or, instead of both, the LoRA's outputs [B, C] (several rows: see below)
    k_k, k_a, r_k, gn_weight, gn_bias : [C]
    attention_mask          : [B] (0 = padding) or None
    state                   : [B, H, N, N] float32, contiguous; fla's [K, V] per head
    y (returned)            : [B, C] in r's dtype
Everything is computed in float32. One program per (row, head) holds that head's 64 x 64 state in registers (the
GroupNorm and the kk normalisation need the whole head) and computes the head's 64 outputs of each LoRA
up-projection itself, which saves four launches. For many rows those tiles would be read once per row, so there
one launch of _lora_up_kernel applies every up-projection beforehand, as matrix products over blocks of rows that
read each weight tile once per block (decode_step.time_mix chooses). No host sync and no data-dependent
allocation, so the call can be captured in a CUDA graph.
"""

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from . import pdl
from .common import launch_device
from .triton_helpers import DECAY_SCALE, KK_EPS

@triton.jit
def _lora_weights(w_ptr, b_ptr, cols, D: tl.constexpr, BLOCK_D: tl.constexpr, HAS_BIAS: tl.constexpr):
    """This head's rows of a LoRA's up-projection, float32: (W[cols] [N, BLOCK_D], bias[cols] or 0). With D = 0
    (the LoRA's outputs computed outside) there are none."""
    w = tl.zeros((1, 1), dtype=tl.float32)
    bias = tl.zeros((1,), dtype=tl.float32)
    if D > 0:
        d = tl.arange(0, BLOCK_D)
        w = tl.load(w_ptr + cols[:, None] * D + d[None, :], mask=(d < D)[None, :], other=0.0).to(tl.float32)
        if HAS_BIAS:
            bias = tl.load(b_ptr + cols).to(tl.float32)
    return w, bias


@triton.jit
def _lora(h_ptr, w, bias, i_b, cols, C: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr):
    """This head's outputs [N] (float32) of a LoRA: W[cols] @ h + bias[cols] from its hidden activations h [D]
    (D > 0), or, with D = 0, read as they are from a [B, C] row of outputs computed outside."""
    if D == 0:
        out = tl.load(h_ptr + i_b * C + cols).to(tl.float32)
    else:
        d = tl.arange(0, BLOCK_D)
        h = tl.load(h_ptr + i_b * D + d, mask=d < D, other=0.0).to(tl.float32)
        out = tl.sum(w * h[None, :], 1) + bias
    return out


@triton.jit
def _lora_up_tile(h_ptr, w_ptr, b_ptr, y_ptr, B, C: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                  HAS_BIAS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, PREC: tl.constexpr,
                  PDL: tl.constexpr):
    """One [BLOCK_B, BLOCK_C] tile of a LoRA's outputs y = h W^T + bias (h [B, D], W [C, D], y [B, C])."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    d = tl.arange(0, BLOCK_D)
    w = tl.load(w_ptr + cols[:, None] * D + d[None, :], mask=(d < D)[None, :], other=0.0)
    bias = tl.load(b_ptr + cols).to(tl.float32) if HAS_BIAS else tl.zeros((BLOCK_C,), dtype=tl.float32)
    if PDL:
        gdc_wait()
    h = tl.load(h_ptr + rows[:, None] * D + d[None, :], mask=(rows < B)[:, None] & (d < D)[None, :], other=0.0)
    y = tl.dot(h, tl.trans(w), input_precision=PREC) + bias[None, :]
    tl.store(y_ptr + rows[:, None] * C + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=(rows < B)[:, None])


@triton.jit
def _lora_up_kernel(h_ptrs, w_ptrs, b_ptrs, y_ptrs, B, C: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                    HAS_BIAS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, PREC: tl.constexpr,
                    PDL: tl.constexpr):
    """Every LoRA's up-projection of a decoding step in one launch: grid (row blocks, column blocks, LoRAs); the
    tuples hold one entry per LoRA."""
    if PDL:
        gdc_launch_dependents()
    i_lora = tl.program_id(2)
    for i in tl.static_range(len(D)):
        if i_lora == i:
            _lora_up_tile(h_ptrs[i], w_ptrs[i], b_ptrs[i], y_ptrs[i], B, C, D[i], BLOCK_D[i], HAS_BIAS[i], BLOCK_B,
                          BLOCK_C, PREC, PDL)


@triton.jit
def _time_mix_decode_kernel(r_ptr, k_ptr, v_ptr, wh_ptr, w_up_ptr, w_bias_ptr, ah_ptr, a_up_ptr, a_bias_ptr,
                            vh_ptr, v_up_ptr, v_bias_ptr, gh_ptr, g_up_ptr, vf_ptr, mask_ptr,
                            kk_w_ptr, ka_ptr, rk_ptr, gnw_ptr, gnb_ptr, s_ptr, y_ptr, gn_eps,
                            H: tl.constexpr, N: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                            FIRST_LAYER: tl.constexpr, HAS_MASK: tl.constexpr, PDL: tl.constexpr):
    if PDL:
        gdc_launch_dependents()
    i_b, i_h = tl.program_id(0).to(tl.int64), tl.program_id(1)
    C: tl.constexpr = H * N
    cols = i_h * N + tl.arange(0, N)  # this head's channels
    row = i_b * C + cols

    # the weights first (the LoRAs', then the per-channel ones): no kernel writes them, so they are read before
    # waiting for the previous kernel (rwkv7_kernels/pdl.py); then every other read up front (the state, the largest,
    # first), so their latencies overlap
    w_up, w_bias = _lora_weights(w_up_ptr, w_bias_ptr, cols, D[0], BLOCK_D[0], True)
    a_up, a_bias = _lora_weights(a_up_ptr, a_bias_ptr, cols, D[1], BLOCK_D[1], True)
    g_up, g_bias = _lora_weights(g_up_ptr, g_up_ptr, cols, D[2], BLOCK_D[2], False)
    if not FIRST_LAYER:
        v_up, v_bias = _lora_weights(v_up_ptr, v_bias_ptr, cols, D[3], BLOCK_D[3], True)
    k_k = tl.load(kk_w_ptr + cols).to(tl.float32)
    k_a = tl.load(ka_ptr + cols).to(tl.float32)
    r_k = tl.load(rk_ptr + cols).to(tl.float32)
    gn_w = tl.load(gnw_ptr + cols).to(tl.float32)
    gn_b = tl.load(gnb_ptr + cols).to(tl.float32)
    if PDL:
        gdc_wait()
    p_s = s_ptr + (i_b * H + i_h) * N * N + tl.arange(0, N)[:, None] * N + tl.arange(0, N)[None, :]
    # nothing reads the state again before the next step, so it is loaded and stored with streaming cache hints
    h = tl.load(p_s, eviction_policy="evict_first")  # state [K, V]
    r = tl.load(r_ptr + row).to(tl.float32)
    k = tl.load(k_ptr + row).to(tl.float32)
    v = tl.load(v_ptr + row).to(tl.float32)
    w_raw = _lora(wh_ptr, w_up, w_bias, i_b, cols, C, D[0], BLOCK_D[0])
    a_raw = _lora(ah_ptr, a_up, a_bias, i_b, cols, C, D[1], BLOCK_D[1])
    g = _lora(gh_ptr, g_up, g_bias, i_b, cols, C, D[2], BLOCK_D[2])

    decay = tl.exp(tl.sigmoid(w_raw) * -DECAY_SCALE)
    a = tl.sigmoid(a_raw)
    kk = k * k_k
    kk = kk / tl.maximum(tl.sqrt(tl.sum(kk * kk, 0)), KK_EPS)
    k = k * (1 + (a - 1) * k_a)
    if not FIRST_LAYER:
        v_gate = tl.sigmoid(_lora(vh_ptr, v_up, v_bias, i_b, cols, C, D[3], BLOCK_D[3]))
        v = v + (tl.load(vf_ptr + row).to(tl.float32) - v) * v_gate
    if HAS_MASK:  # a padded token leaves the state as it was
        keep = tl.load(mask_ptr + i_b) != 0
        decay = tl.where(keep, decay, 1.0)
        k = tl.where(keep, k, 0.0)
        kk = tl.where(keep, kk, 0.0)

    # h = diag(decay) h + (kk * a) (-kk^T h) + k v^T ; o = h^T r
    sa = tl.sum(-kk[:, None] * h, 0)
    h = h * decay[:, None] + (kk * a)[:, None] * sa[None, :] + k[:, None] * v[None, :]
    tl.store(p_s, h, cache_modifier=".cs")
    o = tl.sum(r[:, None] * h, 0)

    mean = tl.sum(o, 0) / N
    centred = o - mean
    o = centred / tl.sqrt(tl.sum(centred * centred, 0) / N + gn_eps)
    o = o * gn_w + gn_b
    o = o + tl.sum(r * k * r_k, 0) * v  # the current token's bonus
    y = o * g
    tl.store(y_ptr + row, y.to(y_ptr.dtype.element_ty))


@torch.no_grad()
def time_mix_decode_(r, k, v, loras, v_first, params, state, attention_mask=None):
    """One decoding step of the time mix; r, k, v [B, 1, C], state [B, H, N, N] float32 updated in place.

    loras: the w, a, v, g LoRAs, each (hidden [B, 1, D], up weight [C, D], bias [C] or None), or (output [B, 1, C],
    None, None) for a LoRA applied outside; v's and v_first are None in layer 0, which makes v_first.
    params: ops_reference.TimeMixParams. Returns (y [B, 1, C], v_first, state), as
    ops_reference.time_mix_reference(..., in_place=True) does on the LoRAs' outputs.
    """
    B, T, C = r.shape
    H, N = params.r_k.shape
    if T != 1 or state.dtype != torch.float32 or not state.is_contiguous() or state.shape != (B, H, N, N):
        raise ValueError(f"one token per row and a contiguous float32 state of shape {(B, H, N, N)} are needed")
    first_layer = v_first is None
    rows = lambda t: t.reshape(B, -1).contiguous()  # noqa: E731
    r, k, v = rows(r), rows(k), rows(v)

    def lora(arg):  # the kernel's (values, up weight, bias, rank) of a LoRA; rank 0: values are its outputs
        if arg is None:  # layer 0 has no v LoRA: placeholders the kernel does not read
            return r, r, r, 0
        values, up, bias = arg
        if up is None:
            return rows(values), values, values, 0
        return rows(values), up.contiguous(), bias if bias is not None else up, up.shape[1]

    w_lora, a_lora, v_lora, g_lora = loras
    (wh, w_up, w_b, w_d), (ah, a_up, a_b, a_d), (gh, g_up, _, g_d), (vh, v_up, v_b, v_d) = map(
        lora, (w_lora, a_lora, g_lora, v_lora)
    )
    ranks = (w_d, a_d, g_d, v_d)
    v_first_rows = r if first_layer else rows(v_first)
    mask = attention_mask.reshape(B).contiguous() if attention_mask is not None else r
    y = torch.empty(B, C, dtype=r.dtype, device=r.device)
    with launch_device(r):
        _time_mix_decode_kernel[(B, H)](
            r, k, v, wh, w_up, w_b, ah, a_up, a_b, vh, v_up, v_b, gh, g_up, v_first_rows, mask,
            params.k_k, params.k_a, params.r_k, params.gn_weight, params.gn_bias, state, y, params.gn_eps,
            H=H, N=N, D=ranks, BLOCK_D=tuple(max(triton.next_power_of_2(d), 1) for d in ranks), FIRST_LAYER=first_layer,
            HAS_MASK=attention_mask is not None, PDL=pdl.enabled(r.device), num_warps=4,
            launch_pdl=pdl.enabled(r.device),
        )
    return y.view(B, 1, C), (v.view(B, 1, C) if first_layer else v_first), state


@torch.no_grad()
def lora_up(loras):
    """The LoRAs' outputs h W^T + bias [B, 1, C] (ops_reference.linear_reference), all in one launch.

    loras: (hidden [B, 1, D], up weight [C, D], bias [C] or None) each, or None (layer 0's v LoRA). Returns
    (output, None, None) for each, or None: time_mix_decode_'s form of a LoRA applied outside."""
    given = [lora for lora in loras if lora is not None]
    h0 = given[0][0]
    B, C = h0.shape[0], given[0][1].shape[0]
    hs = tuple(h.reshape(B, -1).contiguous() for h, _, _ in given)
    ws = tuple(up.contiguous() for _, up, _ in given)
    ys = tuple(torch.empty(B, C, dtype=h0.dtype, device=h0.device) for _ in given)
    ranks = tuple(up.shape[1] for up in ws)
    BLOCK_B = min(64, max(16, triton.next_power_of_2(B)))
    BLOCK_C = 64
    with launch_device(h0):
        _lora_up_kernel[(triton.cdiv(B, BLOCK_B), triton.cdiv(C, BLOCK_C), len(given))](
            hs, ws, tuple(up if bias is None else bias for _, up, bias in given), ys, B, C=C, D=ranks,
            BLOCK_D=tuple(max(16, triton.next_power_of_2(d)) for d in ranks),
            HAS_BIAS=tuple(bias is not None for _, _, bias in given), BLOCK_B=BLOCK_B, BLOCK_C=BLOCK_C,
            PREC="ieee" if h0.dtype == torch.float32 else "tf32", PDL=pdl.enabled(h0.device), num_warps=4,
            launch_pdl=pdl.enabled(h0.device),
        )
    outputs = iter(ys)
    return [None if lora is None else (next(outputs).view(B, 1, C), None, None) for lora in loras]
