"""The RWKV-7 time mix of whole sequences, from the LoRA outputs to o_proj's input, forward and backward (prefill and
training): an elementwise kernel before the chunked WKV-7 (wkv7_chunk.py), one after it, and one for the backward of
each. The backward recomputes the elementwise values from the inputs instead of storing them: what the time mix
keeps for the backward is its bf16 inputs, WKV-7's output and what the chunked kernel keeps (the chunks' start
states and its parallel pass, which would cost a launch as long as the forward's to recompute). Inputs that are
the output of a linear layer of small input, the LoRAs' up-projections (w_raw, a_raw, v_gate_raw, g), may come with
that layer (LinearInput): the backward then recomputes them from the layer's input, which the layer's own backward
keeps anyway, instead of keeping a [B * T, C] tensor.

Math: ops_reference.time_mix_reference:
    before  w = -exp(-0.5) sigmoid(w_raw) (float32), kk = normalize_per_head(k * k_k), a = sigmoid(a_raw),
            k' = k (1 + (a - 1) k_a), v' = lerp(v, v_first, sigmoid(v_gate_raw)) (not in layer 0),
            and WKV-7's transition a_wkv = -kk, b_wkv = kk * a; a padded row (mask 0) has w = k' = kk = 0
    after   y = (GroupNorm_per_head(o) + sum_per_head(r * k' * r_k) * v') * g
Backward, in the reverse order:
    after   z = GroupNorm(o) + bonus v':  dg = dy z;  dz = dy g;  do = GroupNorm's backward of dz (gn_weight);
            per channel over rows: d gn_weight = sum(dz GroupNorm_unscaled(o)), d gn_bias = sum(dz),
            d r_k = sum(dbonus r k'), with dbonus = sum_per_head(dz v')
    WKV-7   wkv7_chunk's backward: dr, dw, dk', dv', da_wkv, db_wkv
    before  the bonus's terms added to WKV-7's (formed here from dy and g rather than stored by the after-kernel's
            backward): dv' += dz bonus;  dr += dbonus k' r_k;  dk' += dbonus r r_k;  then
            dkk = -da_wkv + db_wkv a;  da = db_wkv kk + dk' k k_a;  dk = dk' (1 + (a - 1) k_a) + k_k du, with
            du = (dkk - kk sum_per_head(dkk kk)) / |k k_k| the normalisation's backward;  d a_raw = da a (1 - a);
            d w_raw = dw (-exp(-0.5)) s (1 - s);  v' = v + (v_first - v) s: dv = dv' (1 - s), dv_first = dv' s,
            d v_gate_raw = dv' (v_first - v) s (1 - s);  per channel: d k_k = sum(du k), d k_a = sum(dk' k (a - 1))

Shapes, layouts, dtypes:
    r, w_raw, k, v, a_raw, v_gate_raw, v_first, g, o : [B * T, C] rows, contiguous, the model dtype; C = H * N
    k_k, k_a, r_k, gn_weight, gn_bias               : [C]
    mask                                            : [B * T] (0 = padding) or none
    outputs: w [B * T, C] float32; k', v', a_wkv, b_wkv, y [B * T, C] in the model dtype; the gradients in their
    inputs' dtypes; the parameters' gradients summed per block of rows in float32 ([blocks, C]), then over blocks
Computed in float32. One program per (block of BLOCK_T rows, head): the per-head normalisations need the head's N
channels together.
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .common import as_gradients, cast, launch_device
from .triton_helpers import DECAY_SCALE, KK_EPS
from .wkv7_chunk import _chunk_backward, _chunk_forward

BLOCK_T = 32  # rows per program of the forward kernels
BLOCK_T_BWD = 16  # of the backward kernels, which hold about twice as many tiles


@triton.jit
def _tile(ptr, at, inside):
    return tl.load(ptr + at, mask=inside, other=0.0).to(tl.float32)


@triton.jit
def _channels(ptr, cols):
    return tl.load(ptr + cols).to(tl.float32)[None, :]


@triton.jit(do_not_specialize=["first_layer"])  # Triton compiles an int equal to 1 into a kernel of its own
def _before_wkv_kernel(w_raw_ptr, k_ptr, v_ptr, a_raw_ptr, vg_ptr, vf_ptr, k_k_ptr, k_a_ptr, mask_ptr,
                       w_ptr, k_out_ptr, v_out_ptr, a_out_ptr, b_out_ptr, rows_total, first_layer,
                       C: tl.constexpr, N: tl.constexpr, BLOCK_T: tl.constexpr, HAS_MASK: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * N + tl.arange(0, N)  # this head's channels
    at = rows.to(tl.int64)[:, None] * C + cols[None, :]
    inside = (rows < rows_total)[:, None]
    k = _tile(k_ptr, at, inside)
    a = tl.sigmoid(_tile(a_raw_ptr, at, inside))
    w = tl.sigmoid(_tile(w_raw_ptr, at, inside)) * -DECAY_SCALE
    kk = k * _channels(k_k_ptr, cols)
    kk = kk / tl.maximum(tl.sqrt(tl.sum(kk * kk, 1)), KK_EPS)[:, None]
    k = k * (1 + (a - 1) * _channels(k_a_ptr, cols))
    if HAS_MASK:  # a padded row leaves the state as it was: no decay, no write, no transition
        keep = (tl.load(mask_ptr + rows, mask=rows < rows_total, other=0) != 0)[:, None]
        w, k, kk = tl.where(keep, w, 0.0), tl.where(keep, k, 0.0), tl.where(keep, kk, 0.0)
    tl.store(w_ptr + at, w, mask=inside)
    tl.store(k_out_ptr + at, k.to(k_out_ptr.dtype.element_ty), mask=inside)
    tl.store(a_out_ptr + at, (-kk).to(a_out_ptr.dtype.element_ty), mask=inside)
    tl.store(b_out_ptr + at, (kk * a).to(b_out_ptr.dtype.element_ty), mask=inside)
    if first_layer == 0:  # a run-time flag: one compiled kernel for every layer (cold start)
        v = _tile(v_ptr, at, inside)
        v += (_tile(vf_ptr, at, inside) - v) * tl.sigmoid(_tile(vg_ptr, at, inside))
        tl.store(v_out_ptr + at, v.to(v_out_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _group_norm_tile(o, gn_eps, N: tl.constexpr):
    """The per-head GroupNorm of a [rows, N] tile without its weight and bias, and 1 / its standard deviation."""
    centred = o - (tl.sum(o, 1) / N)[:, None]
    rstd = 1 / tl.sqrt(tl.sum(centred * centred, 1) / N + gn_eps)
    return centred * rstd[:, None], rstd


@triton.jit
def _after_wkv_kernel(o_ptr, r_ptr, k_ptr, v_ptr, g_ptr, r_k_ptr, gn_w_ptr, gn_b_ptr, y_ptr, gn_eps, rows_total,
                      C: tl.constexpr, N: tl.constexpr, BLOCK_T: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * N + tl.arange(0, N)
    at = rows.to(tl.int64)[:, None] * C + cols[None, :]
    inside = (rows < rows_total)[:, None]
    o, _ = _group_norm_tile(_tile(o_ptr, at, inside), gn_eps, N)
    o = o * _channels(gn_w_ptr, cols) + _channels(gn_b_ptr, cols)
    bonus = tl.sum(_tile(r_ptr, at, inside) * _tile(k_ptr, at, inside) * _channels(r_k_ptr, cols), 1)
    y = (o + bonus[:, None] * _tile(v_ptr, at, inside)) * _tile(g_ptr, at, inside)
    tl.store(y_ptr + at, y.to(y_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _after_wkv_bwd_kernel(dy_ptr, o_ptr, r_ptr, k_ptr, v_ptr, g_ptr, r_k_ptr, gn_w_ptr, gn_b_ptr,
                          do_ptr, dg_ptr, dgn_w_ptr, dgn_b_ptr, dr_k_ptr, gn_eps, rows_total,
                          C: tl.constexpr, N: tl.constexpr, BLOCK_T: tl.constexpr):
    """do, dg and the parameters' sums; the bonus's gradients for r, k' and v' are _before_wkv_bwd_kernel's."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * N + tl.arange(0, N)
    at = rows.to(tl.int64)[:, None] * C + cols[None, :]
    inside = (rows < rows_total)[:, None]
    block = tl.program_id(0) * C + cols  # this block's row of the per-channel partial sums
    on, rstd = _group_norm_tile(_tile(o_ptr, at, inside), gn_eps, N)
    gn_w = _channels(gn_w_ptr, cols)
    r, k, v = _tile(r_ptr, at, inside), _tile(k_ptr, at, inside), _tile(v_ptr, at, inside)
    r_k = _channels(r_k_ptr, cols)
    bonus = tl.sum(r * k * r_k, 1)[:, None]
    dy = _tile(dy_ptr, at, inside)
    tl.store(dg_ptr + at, (dy * (on * gn_w + _channels(gn_b_ptr, cols) + bonus * v)).to(dg_ptr.dtype.element_ty),
             mask=inside)
    dz = dy * _tile(g_ptr, at, inside)
    tl.store(dgn_w_ptr + block, tl.sum(dz * on, 0))
    tl.store(dgn_b_ptr + block, tl.sum(dz, 0))
    d_bonus = tl.sum(dz * v, 1)[:, None]
    tl.store(dr_k_ptr + block, tl.sum(d_bonus * r * k, 0))
    d_on = dz * gn_w
    do = (d_on - (tl.sum(d_on, 1) / N)[:, None] - on * (tl.sum(d_on * on, 1) / N)[:, None]) * rstd[:, None]
    tl.store(do_ptr + at, do.to(do_ptr.dtype.element_ty), mask=inside)


@triton.jit(do_not_specialize=["first_layer"])
def _before_wkv_bwd_kernel(w_raw_ptr, k_ptr, v_ptr, a_raw_ptr, vg_ptr, vf_ptr, k_k_ptr, k_a_ptr, mask_ptr,
                           r_ptr, g_ptr, r_k_ptr, dy_ptr, dr_wkv_ptr, dw_ptr, dk_wkv_ptr, dv_wkv_ptr, da_wkv_ptr,
                           db_wkv_ptr, dr_ptr, dw_raw_ptr, dk_ptr, dv_ptr, da_raw_ptr, dvg_ptr, dvf_ptr, dk_k_ptr,
                           dk_a_ptr, rows_total, first_layer,
                           C: tl.constexpr, N: tl.constexpr, BLOCK_T: tl.constexpr, HAS_MASK: tl.constexpr):
    """The inputs' gradients from WKV-7's and from the bonus's (recomputed here from dy: dz = dy g)."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * N + tl.arange(0, N)
    at = rows.to(tl.int64)[:, None] * C + cols[None, :]
    inside = (rows < rows_total)[:, None]
    block = tl.program_id(0) * C + cols
    keep = tl.full((BLOCK_T, 1), 1.0, tl.float32)
    if HAS_MASK:
        keep = (tl.load(mask_ptr + rows, mask=rows < rows_total, other=0) != 0).to(tl.float32)[:, None]
    s = tl.sigmoid(_tile(w_raw_ptr, at, inside))
    dw_raw = _tile(dw_ptr, at, inside) * keep * -DECAY_SCALE * s * (1 - s)
    tl.store(dw_raw_ptr + at, dw_raw.to(dw_raw_ptr.dtype.element_ty), mask=inside)
    # k' = k (1 + (a - 1) k_a) and v' = v + (v_first - v) sigmoid(v_gate_raw) (v' = v in layer 0), rounded as the
    # forward stored them, for the bonus: z = GroupNorm(o) + sum_per_head(r k' r_k) v'
    k = _tile(k_ptr, at, inside)
    a = tl.sigmoid(_tile(a_raw_ptr, at, inside))
    k_k, k_a = _channels(k_k_ptr, cols), _channels(k_a_ptr, cols)
    k_new = (k * (1 + (a - 1) * k_a) * keep).to(k_ptr.dtype.element_ty).to(tl.float32)
    v = _tile(v_ptr, at, inside)
    v_new, v_gate, v_diff = v, tl.zeros_like(v), tl.zeros_like(v)  # (a run-time branch defines them in both)
    if first_layer == 0:
        v_gate = tl.sigmoid(_tile(vg_ptr, at, inside))
        v_diff = _tile(vf_ptr, at, inside) - v
        v_new = (v + v_diff * v_gate).to(v_ptr.dtype.element_ty).to(tl.float32)
    r, r_k = _tile(r_ptr, at, inside), _channels(r_k_ptr, cols)
    dz = _tile(dy_ptr, at, inside) * _tile(g_ptr, at, inside)
    bonus = tl.sum(r * k_new * r_k, 1)[:, None]
    d_bonus = tl.sum(dz * v_new, 1)[:, None]
    tl.store(dr_ptr + at, (_tile(dr_wkv_ptr, at, inside) + d_bonus * k_new * r_k).to(dr_ptr.dtype.element_ty),
             mask=inside)
    # the key, with the normalised kk = u / |u|, u = k k_k
    u = k * k_k
    norm = tl.maximum(tl.sqrt(tl.sum(u * u, 1)), KK_EPS)[:, None]
    kk = u / norm
    d_wkv_b = _tile(db_wkv_ptr, at, inside) * keep
    dkk = d_wkv_b * a - _tile(da_wkv_ptr, at, inside) * keep
    dk_new = (_tile(dk_wkv_ptr, at, inside) + d_bonus * r * r_k) * keep
    du = (dkk - kk * tl.sum(dkk * kk, 1)[:, None]) / norm
    dk = dk_new * (1 + (a - 1) * k_a) + du * k_k
    tl.store(dk_ptr + at, dk.to(dk_ptr.dtype.element_ty), mask=inside)
    da = d_wkv_b * kk + dk_new * k * k_a
    tl.store(da_raw_ptr + at, (da * a * (1 - a)).to(da_raw_ptr.dtype.element_ty), mask=inside)
    tl.store(dk_k_ptr + block, tl.sum(du * k, 0))
    tl.store(dk_a_ptr + block, tl.sum(dk_new * k * (a - 1), 0))
    # the value
    dv_new = _tile(dv_wkv_ptr, at, inside) + dz * bonus
    if first_layer == 0:
        tl.store(dvf_ptr + at, (dv_new * v_gate).to(dvf_ptr.dtype.element_ty), mask=inside)
        tl.store(dvg_ptr + at, (dv_new * v_diff * v_gate * (1 - v_gate)).to(dvg_ptr.dtype.element_ty), mask=inside)
        dv_new = dv_new * (1 - v_gate)
    tl.store(dv_ptr + at, dv_new.to(dv_ptr.dtype.element_ty), mask=inside)


def _before_wkv(w_raw, k, v, a_raw, vg, vf, k_k, k_a, mask, H):
    """The before-kernel's launch on [rows, C] inputs (vg, vf None in layer 0). Returns (w, k', v', a_wkv, b_wkv)."""
    rows, C = k.shape
    first_layer = vf is None
    w = torch.empty(rows, C, dtype=torch.float32, device=k.device)
    k_new, a_wkv, b_wkv = (torch.empty_like(k) for _ in range(3))
    v_new = v if first_layer else torch.empty_like(v)
    vg, vf = (v, v) if first_layer else (vg, vf)  # placeholders in layer 0 (not read)
    _before_wkv_kernel[(triton.cdiv(rows, BLOCK_T), H)](
        w_raw, k, v, a_raw, vg, vf, k_k, k_a, k if mask is None else mask, w, k_new, v_new, a_wkv, b_wkv, rows,
        int(first_layer), C=C, N=C // H, BLOCK_T=BLOCK_T, HAS_MASK=mask is not None, num_warps=4,
    )
    return w, k_new, v_new, a_wkv, b_wkv


class LinearInput(NamedTuple):
    """An input of the time mix given as F.linear(x, weight, bias): a LoRA's up-projection, x its activation [B, T,
    rank]. The backward recomputes the input from them instead of keeping it."""

    x: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None


def _keep(inputs, recompute):
    """What the backward keeps of each of `inputs`: (the input, None, None), or (x, weight, bias) to recompute it."""
    return [t for value, linear in zip(inputs, recompute) for t in ((value, None, None) if linear is None else linear)]


def _kept(tensors, dtypes, recompute, rows):
    """The inputs from what _keep kept: recomputed (as the forward computed them: in their dtype, autocast's where the
    forward ran under it) or as they were."""
    inputs = []
    for i, (dtype, recomputed) in enumerate(zip(dtypes, recompute)):
        x, weight, bias = tensors[3 * i:3 * i + 3]
        if recomputed:
            x = F.linear(cast(x, dtype), cast(weight, dtype), cast(bias, dtype)).reshape(rows, -1)
        inputs.append(x)
    return inputs


class _TimeMixSequence(torch.autograd.Function):
    """The time mix on [B, T, C] inputs, run on [B * T, C] rows (reshaped here, out of autograd's sight: fewer
    autograd nodes, less time on the CPU); H gives the heads' layout for WKV-7."""

    @staticmethod
    def forward(ctx, r, w_raw, k, v, a_raw, vg, vf, g, k_k, k_a, r_k, gn_w, gn_b, gn_eps, state, mask, cu_seqlens, H,
                recompute):
        B, T, C = r.shape
        N = C // H
        rows = lambda t: None if t is None else t.reshape(B * T, C).contiguous()  # noqa: E731
        r, w_raw, k, v, a_raw, vg, vf, g = map(rows, (r, w_raw, k, v, a_raw, vg, vf, g))
        mask = None if mask is None else mask.reshape(B * T).contiguous()
        r_k = r_k.contiguous()
        heads = lambda t: t.view(B, T, H, N)  # noqa: E731
        w, k_new, v_new, a_wkv, b_wkv = _before_wkv(w_raw, k, v, a_raw, vg, vf, k_k, k_a, mask, H)
        needs_grad = any(ctx.needs_input_grad)
        o, final_state, saved = _chunk_forward(*map(heads, (r, w, k_new, v_new, a_wkv, b_wkv)), state,
                                               state is not None, cu_seqlens, needs_grad)
        o = o.view(B * T, H * N)
        y = torch.empty_like(r)
        _after_wkv_kernel[(triton.cdiv(B * T, BLOCK_T), H)](
            o, r, k_new, v_new, g, r_k, gn_w, gn_b, y, gn_eps, B * T, C=H * N, N=N, BLOCK_T=BLOCK_T, num_warps=4,
        )
        if needs_grad:
            lora_outputs = (w_raw, a_raw, vg, g)
            ctx.save_for_backward(r, k, v, vf, o, k_k, k_a, r_k, gn_w, gn_b, mask, *_keep(lora_outputs, recompute),
                                  *saved)
            ctx.gn_eps, ctx.shape, ctx.has_state = gn_eps, (B, T, H, N), state is not None
            ctx.recompute = tuple(linear is not None for linear in recompute)
            ctx.lora_dtypes = tuple(None if t is None else t.dtype for t in lora_outputs)
            ctx.set_materialize_grads(False)
        return y.view(B, T, C), final_state

    @staticmethod
    def backward(ctx, dy, d_final_state):
        r, k, v, vf, o, k_k, k_a, r_k, gn_w, gn_b, mask, *saved = ctx.saved_tensors
        B, T, H, N = ctx.shape
        rows, C = r.shape
        w_raw, a_raw, vg, g = _kept(saved[:12], ctx.lora_dtypes, ctx.recompute, rows)
        saved = saved[12:]
        heads = lambda t: t.view(B, T, H, N)  # noqa: E731
        dy = torch.zeros_like(r) if dy is None else dy.reshape(rows, C).contiguous()
        w, k_new, v_new, a_wkv, b_wkv = _before_wkv(w_raw, k, v, a_raw, vg, vf, k_k, k_a, mask, H)  # recomputed
        grid = (triton.cdiv(rows, BLOCK_T_BWD), H)
        # the parameters' gradients, summed per block of rows by the kernels, then over the blocks at once
        per_block = torch.empty(5, grid[0], C, dtype=torch.float32, device=r.device)
        dgn_w, dgn_b, dr_k, dk_k, dk_a = per_block
        do, dg = torch.empty_like(o), torch.empty_like(g)
        _after_wkv_bwd_kernel[grid](dy, o, r, k_new, v_new, g, r_k, gn_w, gn_b, do, dg, dgn_w, dgn_b, dr_k, ctx.gn_eps,
                                    rows, C=C, N=N, BLOCK_T=BLOCK_T_BWD, num_warps=4)
        dr_wkv, dw, dk_wkv, dv_wkv, da_wkv, db_wkv, d_state = _chunk_backward(
            tuple(map(heads, (r, w, k_new, v_new, a_wkv, b_wkv))), saved, heads(do), d_final_state, ctx.has_state
        )
        del w, k_new, v_new, a_wkv, b_wkv
        first_layer = vf is None
        dr, dw_raw, dk, dv, da_raw = (torch.empty_like(t) for t in (r, w_raw, k, v, a_raw))
        dvg, dvf = (None, None) if first_layer else (torch.empty_like(vg), torch.empty_like(vf))
        _before_wkv_bwd_kernel[grid](
            w_raw, k, v, a_raw, v if first_layer else vg, v if first_layer else vf, k_k, k_a,
            k if mask is None else mask, r, g, r_k, dy, dr_wkv, dw, dk_wkv, dv_wkv, da_wkv, db_wkv,
            dr, dw_raw, dk, dv, da_raw, dv if first_layer else dvg, dv if first_layer else dvf, dk_k, dk_a,
            rows, int(first_layer), C=C, N=N, BLOCK_T=BLOCK_T_BWD, HAS_MASK=mask is not None, num_warps=4,
        )
        dgn_w, dgn_b, dr_k, dk_k, dk_a = as_gradients(per_block.sum(1), (gn_w, gn_b, r_k, k_k, k_a))
        grads = [None if d is None else d.view(B, T, C) for d in (dr, dw_raw, dk, dv, da_raw, dvg, dvf, dg)]
        return (*grads, dk_k, dk_a, dr_k, dgn_w, dgn_b, None, d_state, None, None, None, None)


def time_mix_sequence(r, w_raw, k, v, a_raw, v_gate_raw, v_first, g, params, state=None, attention_mask=None,
                      in_place=False, cu_seqlens=None, recompute=(None, None, None, None)):
    """The time mix of whole sequences, differentiable. Arguments and results: those of
    ops_reference.time_mix_reference (r ... g [B, T, C]; params: TimeMixParams; state [B, H, N, N] float32 or None;
    attention_mask [B, T] or None; cu_seqlens [N + 1] with B = 1 or None); in_place must be False (decoding runs
    decode_step.py). recompute: for w_raw, a_raw, v_gate_raw and g, None or the LinearInput that gave it, which the
    backward recomputes it from."""
    if in_place:
        raise ValueError("time_mix_sequence returns a new state; decoding steps update theirs in decode_step.py")
    if len(recompute) != 4 or (v_gate_raw is None and recompute[2] is not None):
        raise ValueError("recompute takes one LinearInput or None for each of w_raw, a_raw, v_gate_raw and g")
    first_layer = v_first is None
    if state is not None:
        state = state.contiguous().float()
    with launch_device(r):
        y, final_state = _TimeMixSequence.apply(
            r, w_raw, k, v, a_raw, v_gate_raw, v_first, g, params.k_k, params.k_a, params.r_k, params.gn_weight,
            params.gn_bias, params.gn_eps, state, attention_mask, cu_seqlens, params.r_k.shape[0], tuple(recompute),
        )
    return y, v if first_layer else v_first, final_state
