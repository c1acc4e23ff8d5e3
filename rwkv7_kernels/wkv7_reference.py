"""WKV-7 recurrence in plain PyTorch: the reference every WKV-7 kernel in this folder is checked against.

Layouts (flash-linear-attention's, shared by every kernel here):
    r, w, k, a, b : [B, T, H, K]        v, o : [B, T, H, V]        state : [N, H, K, V], float32
    w is the log of the decay (float32, in (-exp(-0.5), 0)); the decay itself is exp(w), in (0.545, 1).
    N is B, or the number of sequences when `cu_seqlens` packs them into B = 1 (flash-attention's varlen).

Per head, with h the [K, V] state (the transpose of the official package's [V, K] one):
    h_t = diag(exp(w_t)) h_{t-1} + b_t (a_t^T h_{t-1}) + k_t v_t^T
    o_t = h_t^T r_t                                        (the updated state)
RWKV-7 calls it with a = -kk and b = kk * a_gate (kk: k * k_k L2-normalised per head).

The recurrence runs in float32 (float64 when the inputs are float64); `o` comes back in r's dtype.
"""

import torch


def _step(r, decay, k, v, a, b, h):
    """One step for a batch of heads: rows r, a [N, 1, K] and v [N, 1, V]; columns decay, k, b [N, K, 1]; the state
    h [N, K, V]. Returns (o [N, 1, V], the new h)."""
    sa = torch.bmm(a, h)  # a^T h, from the state before this step's decay
    # h * decay is a new tensor that autograd does not save, so the rank-one updates may go into it in place
    h = (h * decay).addcmul_(b, sa).addcmul_(k, v)
    return torch.bmm(r, h), h  # o = h^T r, from the updated state


def _recurrence(r, w, k, v, a, b, h):
    """One sequence batch: inputs [B, T, H, *] in the compute dtype, h [B, H, K, V]. Returns o, h.

    Each head's state is a [K, V] matrix; the (batch, head) pairs are one batch of matrix products. The inputs are
    laid out step by step once, before the loop.
    """
    B, T, H, K = r.shape
    V = v.shape[-1]

    def steps(x, column):  # [T, B * H, K, 1] columns or [T, B * H, 1, K] rows
        x = x.transpose(0, 1).reshape(T, B * H, -1)
        return x.unsqueeze(-1) if column else x.unsqueeze(-2)

    decay, k, b = (steps(x, column=True) for x in (torch.exp(w), k, b))
    r, v, a = (steps(x, column=False) for x in (r, v, a))
    h = h.reshape(B * H, K, V)
    outputs = []
    for t in range(T):
        o, h = _step(r[t], decay[t], k[t], v[t], a[t], b[t], h)
        outputs.append(o)
    o = torch.stack(outputs).view(T, B, H, V).transpose(0, 1)
    return o, h.view(B, H, K, V)


def _compute_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def wkv7_reference(r, w, k, v, a, b, initial_state=None, output_final_state=False, cu_seqlens=None):
    """Returns (o [B, T, H, V] in r.dtype, final state [N, H, K, V] or None). Differentiable.

    The final state is float32, or float64 when the inputs are float64.
    """
    B, T, H, K = r.shape
    V = v.shape[-1]
    out_dtype = r.dtype
    compute = _compute_dtype(r)
    r, w, k, v, a, b = (x.to(compute) for x in (r, w, k, v, a, b))

    if cu_seqlens is None:
        N = B
    else:
        if B != 1:
            raise ValueError(f"cu_seqlens packs sequences along T and needs B == 1, got B = {B}")
        offsets = cu_seqlens.tolist()
        N = len(offsets) - 1

    if initial_state is None:
        initial_state = r.new_zeros(N, H, K, V)
    elif initial_state.shape != (N, H, K, V):
        raise ValueError(f"initial_state must have shape {(N, H, K, V)}, got {tuple(initial_state.shape)}")
    h0 = initial_state.to(compute)

    if cu_seqlens is None:
        o, h = _recurrence(r, w, k, v, a, b, h0)
        final = h
    else:
        pieces, finals = [], []
        for n, (start, end) in enumerate(zip(offsets[:-1], offsets[1:])):
            o_n, h_n = _recurrence(*(x[:, start:end] for x in (r, w, k, v, a, b)), h0[n : n + 1])
            pieces.append(o_n)
            finals.append(h_n)
        o, final = torch.cat(pieces, dim=1), torch.cat(finals, dim=0)

    return o.to(out_dtype), (final if output_final_state else None)
