"""The RWKV-7 block's ops around the WKV-7 recurrence, in plain PyTorch: the math every kernel of this folder is
checked against, and what runs without kernels (CPU, autograd).

Layouts: x [B, T, C] in the model dtype; C = H * N (N = head size, 64 in every released model).
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F

from .common import DECAY_SCALE, KK_EPS
from .wkv7_reference import wkv7_reference


class TimeMixParams(NamedTuple):
    """The time mix's own parameters between its projections and o_proj."""

    k_k: torch.Tensor  # [C], scales k before its per-head normalisation (kk)
    k_a: torch.Tensor  # [C], how much of the in-context learning rate a enters the key
    r_k: torch.Tensor  # [H, N], the current token's bonus
    gn_weight: torch.Tensor  # [C], the per-head GroupNorm's
    gn_bias: torch.Tensor  # [C]
    gn_eps: float


def token_shift(x, prev, attention_mask=None, cu_seqlens=None):
    """The previous token's x for every position, and the x to carry to the next call.

    x [B, T, C]; prev [B, C] (the last x of the previous call, zeros at the start).
    attention_mask [B, T] (1 = real token, 0 = padding) or None. Padded positions are skipped: each position
    sees the x of the last *real* position before it (or `prev`), and the carried x is the last real one.
    cu_seqlens [N + 1]: the offsets of N sequences packed into one row (B = 1); each one's first token sees zeros.
    Returns (x_prev [B, T, C], new_prev [B, C]).
    """
    B, T, C = x.shape
    if T == 1:  # decoding: the previous x is `prev`; a padded token keeps it
        last = x[:, 0] if attention_mask is None else torch.where(attention_mask.bool(), x[:, 0], prev)
        return prev.unsqueeze(1), last
    if cu_seqlens is not None:
        starts = cu_seqlens[:-1].long()
        return torch.cat([prev.unsqueeze(1), x[:, :-1]], dim=1).index_fill(1, starts, 0.0), x[:, -1]
    if attention_mask is None:
        return torch.cat([prev.unsqueeze(1), x[:, :-1]], dim=1), x[:, -1]
    positions = torch.arange(1, T + 1, device=x.device).expand(B, T)
    # last_real[t] = 1 + index of the last real position <= t, or 0 (meaning `prev`) if there is none
    last_real = torch.where(attention_mask.bool(), positions, 0).cummax(dim=1).values
    history = torch.cat([prev.unsqueeze(1), x], dim=1)  # [B, T + 1, C]: index 0 is `prev`
    source = torch.cat([last_real.new_zeros(B, 1), last_real[:, :-1]], dim=1)  # what position t sees
    x_prev = history.gather(1, source.unsqueeze(-1).expand(B, T, C))
    new_prev = history.gather(1, last_real[:, -1:].unsqueeze(-1).expand(B, 1, C)).squeeze(1)
    return x_prev, new_prev


def shift_mix_reference(x, prev, mixes, attention_mask=None, in_place=False, cu_seqlens=None):
    """The token shift, then one lerp per mix: the inputs of a time mix (six mixes) or channel mix (one).

    x [B, T, C] (normalised); prev [B, C] (the previous call's last x); mixes: M tensors that broadcast to [C] (the
    model's [1, 1, C] or [C] parameters); attention_mask [B, T] or None; cu_seqlens: see token_shift.
    Returns (mixed: M tensors [B, T, C], mixed[m] = x + (x_prev - x) * mixes[m]; the new prev [B, C]). in_place:
    the new prev is written into `prev` (decoding).
    """
    x_prev, last = token_shift(x, prev, attention_mask, cu_seqlens)
    delta = x_prev - x
    mixed = [torch.addcmul(x, delta, mix) for mix in mixes]
    # in place: after the last read of x_prev, which may be a view of prev; otherwise a copy, not a view that
    # would keep the whole of x alive in the cache
    return mixed, prev.copy_(last) if in_place else last.clone()


def norm_shift_mix_reference(x, weight, bias, eps, prev, mixes, attention_mask=None, in_place=False):
    """shift_mix_reference of LayerNorm(x; weight, bias, eps): what the fused kernels with a norm compute."""
    return shift_mix_reference(F.layer_norm(x, (x.shape[-1],), weight, bias, eps), prev, mixes, attention_mask, in_place)


def norm_mix_linear_reference(x, weight, bias, eps, prev, projections, attention_mask=None, in_place=False):
    """LayerNorm, token shift, and the projections that read the lerps: [activation(mixed_i W_i^T)] for each
    (mix_i [C], W_i [N_i, C], activation) in projections, with mixed_i as in norm_shift_mix_reference.
    Returns (outputs [B, T, N_i] in order, the new prev [B, C])."""
    mixes = [mix for mix, _, _ in projections]
    mixed, last = norm_shift_mix_reference(x, weight, bias, eps, prev, mixes, attention_mask, in_place)
    return [linear_reference(m, w, None, act) for m, (_, w, act) in zip(mixed, projections)], last


def time_mix_reference(r, w_raw, k, v, a_raw, v_gate_raw, v_first, g, params, state=None, attention_mask=None,
                       in_place=False, cu_seqlens=None, wkv7=wkv7_reference):
    """The time mix between its projections and o_proj: decay, kk, the k update, the v_first mix, WKV-7,
    the per-head GroupNorm, the bonus and the gate (the official x070 RWKV_x070_TMix, in fla's layouts).

    r, w_raw, k, v, a_raw, g [B, T, C]: r_proj, w_lora (pre-sigmoid), k_proj, v_proj, a_lora (pre-sigmoid) and
        g_lora outputs; v_gate_raw [B, T, C] the v_lora output (pre-sigmoid) and v_first [B, T, C] layer 0's v,
        both None in layer 0, which makes v_first.
    params: TimeMixParams. state [B, H, N, N] float32 or None (zeros; no final state wanted).
    attention_mask [B, T] or None (0 = padding: the state skips it). in_place: write the final state into `state`
    (decoding) instead of returning a new tensor. cu_seqlens [N + 1]: the offsets of N sequences packed into one
    row (B = 1), each from a zero state (then `state` is None and no final state is returned). wkv7: the WKV-7
    recurrence (wkv7_reference.py's signature).
    Returns (y [B, T, C] = gated output for o_proj, v_first, final state or None).
    """
    B, T, C = r.shape
    H, N = params.r_k.shape
    # the log decay in float32 at least: bf16 would round decays near 1 to 1 and distort long memory
    w = -DECAY_SCALE * torch.sigmoid(w_raw.to(torch.promote_types(w_raw.dtype, torch.float32)))
    a = torch.sigmoid(a_raw)
    kk = F.normalize((k * params.k_k).view(B, T, H, N), dim=-1, eps=KK_EPS)
    k = k * (1 + (a - 1) * params.k_a)
    if v_first is None:
        v_first = v
    else:
        v = v + (v_first - v) * torch.sigmoid(v_gate_raw)

    r, w, k, v, a = (t.view(B, T, H, N) for t in (r, w, k, v, a))
    if attention_mask is not None:
        # a padded position leaves the state as it was: no decay (w = 0), no write (k = 0), no transition (kk = 0)
        keep = attention_mask.view(B, T, 1, 1)
        w, k, kk = w * keep, k * keep.to(k.dtype), kk * keep.to(kk.dtype)
    o, final_state = wkv7(r, w, k, v, -kk, kk * a, initial_state=state, output_final_state=state is not None,
                          cu_seqlens=cu_seqlens)
    if in_place:
        final_state = state.copy_(final_state)

    y = F.group_norm(o.reshape(B * T, C), H, params.gn_weight, params.gn_bias, params.gn_eps).view(B, T, H, N)
    y = y + (r * k * params.r_k).sum(dim=-1, keepdim=True) * v  # the current token's bonus
    return y.view(B, T, C) * g, v_first, final_state


def activation_reference(y, activation=None, residual=None):
    """residual + activation(y), activation one of common.ACTIVATIONS: None, "tanh", "sigmoid", "relu2" (relu^2)."""
    if activation == "tanh":
        y = torch.tanh(y)
    elif activation == "sigmoid":
        y = torch.sigmoid(y)
    elif activation == "relu2":
        y = torch.relu(y).square()
    elif activation is not None:
        raise ValueError(f"unknown activation {activation!r}")
    return y if residual is None else residual + y


def linear_reference(x, weight, bias=None, activation=None, residual=None):
    """residual + activation(x W^T + bias): a linear layer with its activation and residual add."""
    return activation_reference(F.linear(x, weight, bias), activation, residual)


def linear_cross_entropy_reference(hidden, weight, labels, num_items_in_batch=None, ignore_index=-100):
    """The mean cross entropy of the logits hidden W^T (computed in hidden's dtype, then float32) against labels,
    as transformers' loss computes it: hidden [N, C], weight [V, C], labels [N] (ignore_index: no label); divided
    by num_items_in_batch if given, else by the number of labelled rows."""
    logits = F.linear(hidden, weight).float()
    total = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")
    count = (labels != ignore_index).sum() if num_items_in_batch is None else num_items_in_batch
    return total / torch.as_tensor(count, device=total.device).float().clamp(min=1)


def cross_entropy_rows_reference(logits, labels, scale, ignore_index=-100, need_grad=True):
    """The cross entropy of a chunk of logits and its gradient, as linear_cross_entropy.py takes them.

    logits [N, V] in the model dtype (the head's output; the log-softmax is taken in float32), labels [N] int64
    (ignore_index: no label), scale: a float32 tensor of one element, 1 / the loss's count.
    Returns (the sum over labelled rows of logsumexp(logits) - logits[label], float32 scalar; with need_grad the
    gradient of that sum times scale: (softmax(logits) - one_hot(label)) * scale, zero in unlabelled rows, [N, V] in
    logits' dtype, else None).
    """
    dtype, logits = logits.dtype, logits.float()
    lse = torch.logsumexp(logits, dim=-1)
    has_label = labels != ignore_index
    target = labels.masked_fill(~has_label, 0)
    total = torch.where(has_label, lse - logits.gather(1, target[:, None]).squeeze(1), 0.0).sum()
    if not need_grad:
        return total, None
    grad = logits.sub_(lse[:, None]).exp_()
    grad[torch.arange(len(labels), device=grad.device), target] -= 1.0
    return total, (grad * (has_label * scale)[:, None]).to(dtype)
