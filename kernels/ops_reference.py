"""The RWKV-7 block's non-WKV ops in plain PyTorch: the references for any fused kernel that replaces them.

Layouts: x [B, T, C] in the model dtype; C = H * N (N = head size, 64 in every released model).
"""

import torch
import torch.nn.functional as F


def token_shift_reference(x, prev, attention_mask=None):
    """The previous token's x for every position, and the x to carry to the next call.

    x [B, T, C]; prev [B, C] (the last x of the previous call, zeros at the start).
    attention_mask [B, T] (1 = real token, 0 = padding) or None. Padded positions are skipped: each position
    sees the x of the last *real* position before it (or `prev`), and the carried x is the last real one.
    Returns (x_prev [B, T, C], new_prev [B, C]).
    """
    B, T, C = x.shape
    if attention_mask is None:
        return torch.cat([prev.unsqueeze(1), x[:, :-1]], dim=1), x[:, -1]
    if T == 1:  # decoding: a padded token keeps `prev`
        return prev.unsqueeze(1), torch.where(attention_mask.bool(), x[:, 0], prev)
    positions = torch.arange(1, T + 1, device=x.device).expand(B, T)
    # last_real[t] = 1 + index of the last real position <= t, or 0 (meaning `prev`) if there is none
    last_real = torch.where(attention_mask.bool(), positions, 0).cummax(dim=1).values
    history = torch.cat([prev.unsqueeze(1), x], dim=1)  # [B, T + 1, C]: index 0 is `prev`
    source = torch.cat([last_real.new_zeros(B, 1), last_real[:, :-1]], dim=1)  # what position t sees
    x_prev = history.gather(1, source.unsqueeze(-1).expand(B, T, C))
    new_prev = history.gather(1, last_real[:, -1:].unsqueeze(-1).expand(B, 1, C)).squeeze(1)
    return x_prev, new_prev


def group_norm_bonus_reference(o, r, k, v, r_k, weight, bias, eps):
    """GroupNorm of the WKV output per head, plus the current token's bonus (r . (k * r_k)) v.

    o, v [B, T, H, N]; r, k [B, T, H, N]; r_k [H, N]; weight, bias [H * N]. Returns [B, T, H * N].
    """
    B, T, H, N = o.shape
    y = F.group_norm(o.reshape(B * T, H * N), num_groups=H, weight=weight, bias=bias, eps=eps).view(B, T, H, N)
    bonus = (r * k * r_k).sum(dim=-1, keepdim=True) * v
    return (y + bonus).view(B, T, H * N)
