"""The time mix of one decoding step in PyTorch, tuned for the CPU: the decoding path without kernels.

Math: ops_reference.time_mix_reference for one token per row, with the WKV state updated in place. At one token
each PyTorch call costs about as much as its arithmetic, so this runs the same math in fewer, cheaper calls: no
sequence bookkeeping around the recurrence, torch.group_norm and the tensor methods instead of their Python
wrappers, conversions only where a dtype differs, the float32 state updated where it lies.

Shapes, layouts, dtypes: those of time_mix_reference with T = 1; state [B, H, N, N], float32 (float64 for a float64
model), updated in place.
"""

import torch

from .common import DECAY_SCALE, KK_EPS


def _wkv7_step(r, w, k, v, a, b, state):
    """One WKV-7 step: inputs [B, 1, H, N] (w the log decay), state [B, H, K, V] updated in place. Returns o [B, 1,
    H, V] in r's dtype. Math: wkv7_reference for T = 1."""
    B, _, H, K = r.shape
    V = v.shape[-1]
    out_dtype = r.dtype
    compute = torch.float64 if r.dtype == torch.float64 else torch.float32

    def to_compute(x):
        return x if x.dtype == compute else x.to(compute)

    rows = [to_compute(x).reshape(B * H, 1, -1) for x in (r, v, a)]
    columns = [to_compute(x).reshape(B * H, -1, 1) for x in (torch.exp(w), k, b)]
    (r, v, a), (decay, k, b) = rows, columns
    h = state.view(B * H, K, V) if state.dtype == compute and state.is_contiguous() else to_compute(state).reshape(B * H, K, V)
    sa = torch.bmm(a, h)  # a^T h, from the state before this step's decay
    h = h.mul_(decay).addcmul_(b, sa).addcmul_(k, v)
    if h.data_ptr() != state.data_ptr():
        state.copy_(h.view(B, H, K, V))
    o = torch.bmm(r, h).view(B, 1, H, V)
    return o if o.dtype == out_dtype else o.to(out_dtype)


def time_mix_step(r, w_raw, k, v, a_raw, v_gate_raw, v_first, g, params, state, attention_mask=None, in_place=True,
                  cu_seqlens=None):
    """One decoding step of the time mix: r ... g [B, 1, C], state updated in place (in_place must be True, and
    cu_seqlens None). Arguments and results: those of ops_reference.time_mix_reference(..., in_place=True)."""
    if not in_place or r.shape[1] != 1 or cu_seqlens is not None:
        raise ValueError("time_mix_step is one decoding step: one token per row, the state updated in place")
    B, T, C = r.shape
    H, N = params.r_k.shape
    w = -DECAY_SCALE * torch.sigmoid(w_raw.to(torch.promote_types(w_raw.dtype, torch.float32)))
    a = torch.sigmoid(a_raw)
    kk = (k * params.k_k).view(B, T, H, N)
    kk = kk / torch.linalg.vector_norm(kk, dim=-1, keepdim=True).clamp_min(KK_EPS)
    k = torch.lerp(k, k * a, params.k_a)  # k * (1 + (a - 1) * k_a), in two ops
    if v_first is None:
        v_first = v
    else:
        v = torch.lerp(v, v_first, torch.sigmoid(v_gate_raw))

    r, w, k, v, a = (t.view(B, T, H, N) for t in (r, w, k, v, a))
    if attention_mask is not None:  # a padded token leaves the state as it was (time_mix_reference)
        keep = attention_mask.view(B, T, 1, 1)
        w, k, kk = w * keep, k * keep.to(k.dtype), kk * keep.to(kk.dtype)
    o = _wkv7_step(r, w, k, v, -kk, kk * a, state)

    y = torch.group_norm(o.reshape(B * T, C), H, params.gn_weight, params.gn_bias, params.gn_eps).view(B, T, H, N)
    y = torch.addcmul(y, (r * k * params.r_k).sum(dim=-1, keepdim=True), v)  # the current token's bonus
    return y.view(B, T, C) * g, v_first, state
