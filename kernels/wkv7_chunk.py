"""Chunked WKV-7 in Triton: forward and backward (torch.autograd.Function), for prefill and training.

Shapes, layouts, dtypes (those of wkv7_reference.py, which holds the math):
    r, k, a, b : [B, T, H, K]   v : [B, T, H, V]   bf16, fp16 or fp32 (all the same dtype)
    w          : [B, T, H, K]   float32 log decay, in (-exp(-0.5), 0)
    o          : [B, T, H, V]   r's dtype
    initial / final state : [N, H, K, V] float32 (N = B, or the number of sequences with cu_seqlens)
    cu_seqlens : int32/int64 [N + 1] offsets of N sequences packed along T, with B = 1 (flash-attention's varlen)
    K and V: powers of two, 16..64 (the released models use 64).
Math (per head, h [K, V]): h_t = diag(exp(w_t)) h_{t-1} + b_t (a_t^T h_{t-1}) + k_t v_t^T ;  o_t = h_t^T r_t.

Chunk algorithm (chunks of BT = 32 steps, each sequence starting a new chunk; a short last chunk is padded with
w = 0 and r = k = v = a = b = 0, which are identity steps). In a chunk with start state S, let g_t = sum_{s<=t} w_s
(float32 cumulative log decay), gp_t = g_t - w_t, gC = g_{BT-1}, and
    rd = r*exp(g), ad = a*exp(gp), bi = b*exp(-g), ki = k*exp(-g), be = b*exp(gC-g), ke = k*exp(gC-g)   [BT, K]
    A_ab = strict_lower(ad bi^T)  A_ak = strict_lower(ad ki^T)  A_rb = lower(rd bi^T)  A_rk = lower(rd ki^T)
Then sa_t = a_t^T h_{t-1} solves (I - A_ab) sa = A_ak v + ad S (the UT transform of the chunk's rank-1 steps), and
    o  = rd S + A_rb sa + A_rk v
    S' = exp(gC) S + be^T sa + ke^T v.
(I - A_ab)^-1 is formed by forward substitution on its 16x16 diagonal blocks, then the off-diagonal blocks by
(I - X)^-1 = I + X, X = Tbd A_off (X^2 = 0 with the two diagonal blocks of BT = 32).
Decay stability: every exponent is a log-decay sum, kept in float32. exp(gp), exp(g), exp(gC - g) have exponents
<= 0; exp(-g) is at most exp(BT * exp(-0.5)) = exp(19.4) ~ 3e8 (w >= -exp(-0.5) is the contract), far inside the
float32 range, and enters only products whose true exponent gp_t - g_s <= 0 (s < t), so nothing overflows and each
term keeps float32 relative accuracy (the same factorisation as fla's chunk_rwkv7 with its lower_bound).

Forward: one program per (sequence, head, V-block) walks the chunks in order, the state [K, BV] in registers (the
state's V columns evolve independently). It stores each chunk's start state (float32) when a backward will follow.
Backward: one program per (sequence, head) walks the chunks in reverse with dS (the state gradient) in registers,
recomputes the chunk's forward quantities from the stored start state and backpropagates through the formulas
above (all products are tl.dot); dw comes from reverse cumulative sums of the log-decay gradients.
Dots run in tf32 for bf16/fp16 inputs and in 3xTF32 (float32 accuracy on the tensor cores; plain "ieee" float32
dots need more shared memory than Hopper has in the backward) for float32 inputs; accumulation is float32.
"""

import torch
import triton
import triton.language as tl

BT = 32  # chunk length
BS = 16  # diagonal block of the triangular solve


@triton.jit
def _solve_unit_lower(A, BT: tl.constexpr, BS: tl.constexpr, PREC: tl.constexpr):
    """(I - A)^-1 for A strictly lower triangular [BT, BT] float32."""
    ot = tl.arange(0, BT)
    same = (ot[:, None] // BS) == (ot[None, :] // BS)
    A_bd = tl.where(same, A, 0.0)
    Ti = tl.where(ot[:, None] == ot[None, :], 1.0, 0.0)
    for i in tl.static_range(1, BS):  # row i of every diagonal block: Ti[i] = e_i + A[i, :i] Ti[:i]
        rows = tl.where((ot % BS == i)[:, None], A_bd, 0.0)
        Ti += tl.dot(rows, Ti, input_precision=PREC)
    # (I - A)^-1 = (I - P)^-1 Tbd with Tbd = Ti (the block-diagonal inverse) and P = Tbd A_off; with two diagonal
    # blocks (BT = 2 BS) P^2 = 0, so (I - P)^-1 = I + P.
    P = tl.dot(Ti, tl.where(same, 0.0, A), input_precision=PREC)
    Y = Ti + tl.dot(P, Ti, input_precision=PREC)
    return Y


@triton.jit
def _chunk_setup(r_ptr, w_ptr, k_ptr, a_ptr, b_ptr, bos, t0, L, i_h, H: tl.constexpr, K: tl.constexpr,
                 BT: tl.constexpr, BS: tl.constexpr, PREC: tl.constexpr):
    """Loads one chunk's K-side inputs and returns its decayed factors, the four chunk matrices and (I - A_ab)^-1."""
    ot = tl.arange(0, BT)
    ok = tl.arange(0, K)
    t = t0 + ot
    m = (t < L)[:, None]
    p = ((bos + t).to(tl.int64) * H + i_h)[:, None] * K + ok[None, :]
    r = tl.load(r_ptr + p, mask=m, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + p, mask=m, other=0.0).to(tl.float32)
    k = tl.load(k_ptr + p, mask=m, other=0.0).to(tl.float32)
    a = tl.load(a_ptr + p, mask=m, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + p, mask=m, other=0.0).to(tl.float32)
    g = tl.cumsum(w, 0)
    gp = g - w
    gC = tl.sum(w, 0)
    eg, egp, eng = tl.exp(g), tl.exp(gp), tl.exp(-g)
    ece = tl.exp(gC[None, :] - g)
    rd, ad, bi, ki, be, ke = r * eg, a * egp, b * eng, k * eng, b * ece, k * ece
    strict = ot[:, None] > ot[None, :]
    lower = ot[:, None] >= ot[None, :]
    A_ab = tl.where(strict, tl.dot(ad, tl.trans(bi), input_precision=PREC), 0.0)
    A_ak = tl.where(strict, tl.dot(ad, tl.trans(ki), input_precision=PREC), 0.0)
    A_rb = tl.where(lower, tl.dot(rd, tl.trans(bi), input_precision=PREC), 0.0)
    A_rk = tl.where(lower, tl.dot(rd, tl.trans(ki), input_precision=PREC), 0.0)
    Ti = _solve_unit_lower(A_ab, BT, BS, PREC)
    return p, m, g, gp, gC, eg, egp, eng, ece, rd, ad, bi, ki, be, ke, A_ab, A_ak, A_rb, A_rk, Ti


@triton.jit
def _seq_bounds(cu_ptr, coff_ptr, i_n, T, BT: tl.constexpr, IS_VARLEN: tl.constexpr):
    if IS_VARLEN:
        bos = tl.load(cu_ptr + i_n).to(tl.int64)
        eos = tl.load(cu_ptr + i_n + 1).to(tl.int64)
        c0 = tl.load(coff_ptr + i_n).to(tl.int64)
    else:
        bos = i_n.to(tl.int64) * T
        eos = bos + T
        c0 = i_n.to(tl.int64) * tl.cdiv(T, BT)
    return bos, eos - bos, c0


@triton.jit
def _fwd_kernel(r_ptr, w_ptr, k_ptr, v_ptr, a_ptr, b_ptr, o_ptr, h0_ptr, ht_ptr, hs_ptr, cu_ptr, coff_ptr, T,
                H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BS: tl.constexpr,
                BV: tl.constexpr, USE_H0: tl.constexpr, STORE_FINAL: tl.constexpr, STORE_H: tl.constexpr,
                IS_VARLEN: tl.constexpr, PREC: tl.constexpr):
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos, L, c0 = _seq_bounds(cu_ptr, coff_ptr, i_n, T, BT, IS_VARLEN)
    ok = tl.arange(0, K)
    ov = i_v * BV + tl.arange(0, BV)
    ot = tl.arange(0, BT)
    p_state = ok[:, None] * V + ov[None, :]
    if USE_H0:
        S = tl.load(h0_ptr + i_nh.to(tl.int64) * K * V + p_state)
    else:
        S = tl.zeros([K, BV], dtype=tl.float32)
    for i_c in range(0, tl.cdiv(L, BT)):
        if STORE_H:
            tl.store(hs_ptr + ((c0 + i_c) * H + i_h) * K * V + p_state, S)
        t0 = i_c * BT
        (p, m, g, gp, gC, eg, egp, eng, ece, rd, ad, bi, ki, be, ke, A_ab, A_ak, A_rb, A_rk,
         Ti) = _chunk_setup(r_ptr, w_ptr, k_ptr, a_ptr, b_ptr, bos, t0, L, i_h, H, K, BT, BS, PREC)
        pv = ((bos + t0 + ot).to(tl.int64) * H + i_h)[:, None] * V + ov[None, :]
        v = tl.load(v_ptr + pv, mask=m, other=0.0).to(tl.float32)
        U = tl.dot(A_ak, v, input_precision=PREC) + tl.dot(ad, S, input_precision=PREC)
        sa = tl.dot(Ti, U, input_precision=PREC)
        o = tl.dot(rd, S, input_precision=PREC) + tl.dot(A_rb, sa, input_precision=PREC)
        o += tl.dot(A_rk, v, input_precision=PREC)
        tl.store(o_ptr + pv, o.to(o_ptr.dtype.element_ty), mask=m)
        S = tl.exp(gC)[:, None] * S + tl.dot(tl.trans(be), sa, input_precision=PREC)
        S += tl.dot(tl.trans(ke), v, input_precision=PREC)
    if STORE_FINAL:
        tl.store(ht_ptr + i_nh.to(tl.int64) * K * V + p_state, S)


@triton.jit
def _bwd_kernel(r_ptr, w_ptr, k_ptr, v_ptr, a_ptr, b_ptr, do_ptr, dht_ptr, hs_ptr, cu_ptr, coff_ptr,
                dr_ptr, dw_ptr, dk_ptr, dv_ptr, da_ptr, db_ptr, dh0_ptr, T,
                H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BS: tl.constexpr,
                USE_DHT: tl.constexpr, STORE_DH0: tl.constexpr, IS_VARLEN: tl.constexpr, PREC: tl.constexpr):
    i_nh = tl.program_id(0)
    i_n, i_h = i_nh // H, i_nh % H
    bos, L, c0 = _seq_bounds(cu_ptr, coff_ptr, i_n, T, BT, IS_VARLEN)
    ok = tl.arange(0, K)
    ov = tl.arange(0, V)
    ot = tl.arange(0, BT)
    p_state = ok[:, None] * V + ov[None, :]
    if USE_DHT:
        dS = tl.load(dht_ptr + i_nh.to(tl.int64) * K * V + p_state)
    else:
        dS = tl.zeros([K, V], dtype=tl.float32)
    strict = ot[:, None] > ot[None, :]
    lower = ot[:, None] >= ot[None, :]
    for j in range(0, tl.cdiv(L, BT)):
        i_c = tl.cdiv(L, BT) - 1 - j
        S = tl.load(hs_ptr + ((c0 + i_c) * H + i_h) * K * V + p_state)
        t0 = i_c * BT
        (p, m, g, gp, gC, eg, egp, eng, ece, rd, ad, bi, ki, be, ke, A_ab, A_ak, A_rb, A_rk,
         Ti) = _chunk_setup(r_ptr, w_ptr, k_ptr, a_ptr, b_ptr, bos, t0, L, i_h, H, K, BT, BS, PREC)
        pv = ((bos + t0 + ot).to(tl.int64) * H + i_h)[:, None] * V + ov[None, :]
        v = tl.load(v_ptr + pv, mask=m, other=0.0).to(tl.float32)
        do = tl.load(do_ptr + pv, mask=m, other=0.0).to(tl.float32)
        U = tl.dot(A_ak, v, input_precision=PREC) + tl.dot(ad, S, input_precision=PREC)
        sa = tl.dot(Ti, U, input_precision=PREC)
        # S' = exp(gC) S + be^T sa + ke^T v ;  o = rd S + A_rb sa + A_rk v
        d_sa = tl.dot(be, dS, input_precision=PREC) + tl.dot(tl.trans(A_rb), do, input_precision=PREC)
        dU = tl.dot(tl.trans(Ti), d_sa, input_precision=PREC)  # sa = (I - A_ab)^-1 U
        dv = tl.dot(ke, dS, input_precision=PREC) + tl.dot(tl.trans(A_rk), do, input_precision=PREC)
        dv += tl.dot(tl.trans(A_ak), dU, input_precision=PREC)
        tl.store(dv_ptr + pv, dv.to(dv_ptr.dtype.element_ty), mask=m)
        dA_rb = tl.where(lower, tl.dot(do, tl.trans(sa), input_precision=PREC), 0.0)
        dA_rk = tl.where(lower, tl.dot(do, tl.trans(v), input_precision=PREC), 0.0)
        dA_ab = tl.where(strict, tl.dot(dU, tl.trans(sa), input_precision=PREC), 0.0)
        dA_ak = tl.where(strict, tl.dot(dU, tl.trans(v), input_precision=PREC), 0.0)
        d_rd = tl.dot(do, tl.trans(S), input_precision=PREC) + tl.dot(dA_rb, bi, input_precision=PREC)
        d_rd += tl.dot(dA_rk, ki, input_precision=PREC)
        d_ad = tl.dot(dU, tl.trans(S), input_precision=PREC) + tl.dot(dA_ab, bi, input_precision=PREC)
        d_ad += tl.dot(dA_ak, ki, input_precision=PREC)
        d_bi = tl.dot(tl.trans(dA_ab), ad, input_precision=PREC) + tl.dot(tl.trans(dA_rb), rd, input_precision=PREC)
        d_ki = tl.dot(tl.trans(dA_ak), ad, input_precision=PREC) + tl.dot(tl.trans(dA_rk), rd, input_precision=PREC)
        d_be = tl.dot(sa, tl.trans(dS), input_precision=PREC)
        d_ke = tl.dot(v, tl.trans(dS), input_precision=PREC)
        egC = tl.exp(gC)
        dgC = tl.sum(dS * S, 1) * egC + tl.sum(d_be * be + d_ke * ke, 0)
        dS = egC[:, None] * dS + tl.dot(tl.trans(rd), do, input_precision=PREC)
        dS += tl.dot(tl.trans(ad), dU, input_precision=PREC)
        dg = d_rd * rd - d_bi * bi - d_ki * ki - d_be * be - d_ke * ke
        dgp = d_ad * ad
        x = dg + dgp
        dw = tl.sum(x, 0)[None, :] - tl.cumsum(x, 0) + x - dgp + dgC[None, :]  # reverse cumulative sums
        tl.store(dr_ptr + p, (d_rd * eg).to(dr_ptr.dtype.element_ty), mask=m)
        tl.store(da_ptr + p, (d_ad * egp).to(da_ptr.dtype.element_ty), mask=m)
        tl.store(db_ptr + p, (d_bi * eng + d_be * ece).to(db_ptr.dtype.element_ty), mask=m)
        tl.store(dk_ptr + p, (d_ki * eng + d_ke * ece).to(dk_ptr.dtype.element_ty), mask=m)
        tl.store(dw_ptr + p, dw.to(dw_ptr.dtype.element_ty), mask=m)
    if STORE_DH0:
        tl.store(dh0_ptr + i_nh.to(tl.int64) * K * V + p_state, dS)


def _prec(x):
    return "tf32x3" if x.dtype == torch.float32 else "tf32"


def _chunk_offsets(cu_seqlens, T):
    """(number of chunk-state slots, per-sequence first slot or None), without a host sync."""
    if cu_seqlens is None:
        return None, None
    counts = (cu_seqlens[1:] - cu_seqlens[:-1] + BT - 1) // BT
    coff = torch.cumsum(counts, 0) - counts
    return triton.cdiv(T, BT) + counts.numel(), coff  # the slot count is an upper bound


def _forward_block_v(n_programs, V):
    """V-block of the forward: split the state's columns when there are too few (sequence, head) programs."""
    sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count if torch.cuda.is_available() else 1
    return 16 if n_programs < 2 * sms else min(V, 32)


class _ChunkWKV7(torch.autograd.Function):
    @staticmethod
    def forward(ctx, r, w, k, v, a, b, initial_state, output_final_state, cu_seqlens, store_states):
        B, T, H, K = r.shape
        V = v.shape[-1]
        N = B if cu_seqlens is None else cu_seqlens.numel() - 1
        slots, coff = _chunk_offsets(cu_seqlens, T)
        if slots is None:
            slots = N * triton.cdiv(T, BT)
        o = torch.empty_like(v, dtype=r.dtype)
        ht = r.new_empty(N, H, K, V, dtype=torch.float32) if output_final_state else None
        hs = r.new_empty(slots, H, K, V, dtype=torch.float32) if store_states else None
        BV = _forward_block_v(N * H, V)
        _fwd_kernel[(V // BV, N * H)](
            r, w, k, v, a, b, o, initial_state, ht, hs, cu_seqlens, coff, T,
            H=H, K=K, V=V, BT=BT, BS=BS, BV=BV, USE_H0=initial_state is not None, STORE_FINAL=output_final_state,
            STORE_H=store_states, IS_VARLEN=cu_seqlens is not None, PREC=_prec(r), num_warps=4,
        )
        ctx.save_for_backward(r, w, k, v, a, b, hs, cu_seqlens, coff)
        ctx.has_h0 = initial_state is not None
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        r, w, k, v, a, b, hs, cu_seqlens, coff = ctx.saved_tensors
        B, T, H, K = r.shape
        V = v.shape[-1]
        N = B if cu_seqlens is None else cu_seqlens.numel() - 1
        dr, dw, dk, dv, da, db = (torch.empty_like(x) for x in (r, w, k, v, a, b))
        dh0 = r.new_empty(N, H, K, V, dtype=torch.float32) if ctx.has_h0 else None
        _bwd_kernel[(N * H,)](
            r, w, k, v, a, b, do.contiguous(), None if dht is None else dht.contiguous(), hs, cu_seqlens, coff,
            dr, dw, dk, dv, da, db, dh0, T,
            H=H, K=K, V=V, BT=BT, BS=BS, USE_DHT=dht is not None, STORE_DH0=ctx.has_h0,
            IS_VARLEN=cu_seqlens is not None, PREC=_prec(r), num_warps=4,
        )
        return dr, dw, dk, dv, da, db, dh0, None, None, None


def chunk_wkv7(r, w, k, v, a, b, initial_state=None, output_final_state=False, cu_seqlens=None):
    """WKV-7 over whole sequences; same arguments and results as wkv7_reference. Differentiable."""
    if cu_seqlens is not None and r.shape[0] != 1:
        raise ValueError(f"cu_seqlens packs sequences along T and needs B == 1, got B = {r.shape[0]}")
    r, k, v, a, b = (x.contiguous() for x in (r, k, v, a, b))
    w = w.contiguous().float()
    if initial_state is not None:
        initial_state = initial_state.contiguous().float()
    inputs = (r, w, k, v, a, b, initial_state)
    store_states = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in inputs)
    with torch.cuda.device(r.device if r.is_cuda else -1):  # -1: no device switch (interpreter on CPU)
        o, ht = _ChunkWKV7.apply(r, w, k, v, a, b, initial_state, output_final_state, cu_seqlens, store_states)
    return o, ht

