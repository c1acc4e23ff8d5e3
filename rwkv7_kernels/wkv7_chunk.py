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
    rd = r*exp(g), ad = a*exp(gp), bi = b*exp(-g), ki = k*exp(-g), be = bi*exp(gC), ke = ki*exp(gC)   [BT, K]
    A_ab = strict_lower(ad bi^T)  A_ak = strict_lower(ad ki^T)  A_rb = lower(rd bi^T)  A_rk = lower(rd ki^T)
sa_t = a_t^T h_{t-1} solves (I - A_ab) sa = A_ak v + ad S (the UT transform of the chunk's rank-1 steps), and
    o = rd S + A_rb sa + A_rk v        S' = exp(gC) S + be^T sa + ke^T v.
Everything but the products with S is known before the chunk's start state. With Ti = (I - A_ab)^-1,
    Wt = Ti ad, Ut = Ti A_ak v        (sa = Wt S + Ut)
    Qr = rd + A_rb Wt [BT, K]   Ov = A_rb Ut + A_rk v [BT, V]   M = be^T Wt [K, K]   C = be^T Ut + ke^T v [K, V]
so that o = Qr S + Ov and S' = exp(gC) S + M S + C: a parallel pass forms Qr, Ov, M, C, and the sequential pass
over chunks is two matrix products per chunk. The parallel pass multiplies Ti into the [BT, BT] and [K, BT] factors
first, X = A_rb Ti and Y = be^T Ti: Qr = rd + X ad, Ov = (X A_ak + A_rk) v, M = Y ad, C = (Y A_ak + ke^T) v.
Ti is formed by doubling: the inverse over diagonal blocks of 2 (I + A on them), then of 4, 8, 16, 32, each step
(I - A_2s)^-1 = (I + P) Ti with P = Ti A_off (A_off: A inside the 2s-blocks, outside the s-blocks; P^2 = 0).
Decay stability: every exponent is a log-decay sum, kept in float32. exp(gp), exp(g), exp(gC) have exponents <= 0;
exp(-g) is at most exp(BT * exp(-0.5)) = exp(19.4) ~ 3e8 (w >= -exp(-0.5) is the contract), far inside the float32
range, and enters only products whose true exponent is <= 0 (gp_t - g_s for s < t, gC - g_t), so nothing overflows.

Forward, two launches:
    _prep_fwd_kernel   parallel over (chunk, head): Qr, Ov, M, C, exp(gC) to memory; Ti for the backward
    _state_fwd_kernel  sequential over chunks per (sequence, head, V-block): o = Qr S + Ov, S' = exp(gC) S + M S + C;
                       for the backward it also stores each chunk's start state S
Backward (G: the gradient of a chunk's end state), three launches:
    _state_bwd_kernel  sequential in reverse per (sequence, head, V-block): stores G, then
                       G <- exp(gC) G + M^T G + Qr^T do   (the start state's gradient)
    _grad_sa_kernel    parallel over (chunk, head): from S, G and Ti, sa = Ti (ad S + A_ak v), its gradient's
                       dU = Ti^T (be G + A_rb^T do) and dv; sa and dU to memory ([chunks, H, BT, V])
    _grad_kernel       parallel over (chunk, head): from S, G, sa and dU, the gradients of r, w, k, a, b (dw from
                       reverse cumulative sums of the log-decay gradients)
    (two kernels rather than one: the single kernel needed 8 warps of 255 registers, one program per SM; each half fits
    two programs of 4 warps per SM, and the pair is faster; for 16-bit inputs _grad_sa_kernel runs as four programs
    of 2 warps per SM: GRAD_SA_WARPS)
Dots run in tf32 for bf16/fp16 inputs and in 3xTF32 (float32 accuracy on the tensor cores) for float32 inputs;
accumulation is float32, and so is the state carried through the sequential passes. The intermediates that go
through memory (Qr, Ov, M, C, the chunks' start states and their gradients, sa, dU) are stored in bf16 for bf16
inputs and in float32 otherwise: they are most of the memory traffic. The state's recurrence stays float32, so the
rounding does not accumulate over chunks (tests/test_kernels.py bounds the final state's error after 65536 steps
with decays near 1). Ti and exp(gC) stay float32. Measurements of these choices: benchmarks/README.md.
"""

import torch
import triton
import triton.language as tl

from .common import launch_device, sm_count

BT = 32  # chunk length
PREP_MAXNREG = 168  # registers per thread of the preparation kernel: 3 programs per SM, faster than 2
# _grad_sa_kernel's warps, by input dtype: for 16-bit inputs four programs of 2 warps per SM, faster than two of 4
# although they spill more; float32 inputs (3xTF32 dots) would spill far more as 2 warps
GRAD_SA_WARPS = {torch.bfloat16: 2, torch.float16: 2, torch.float32: 4}


@triton.jit
def _solve_unit_lower(A, BT: tl.constexpr, PREC: tl.constexpr):
    """(I - A)^-1 for A strictly lower triangular [BT, BT] float32 (BT = 32), by doubling diagonal blocks."""
    tl.static_assert(BT == 32)
    row = tl.arange(0, BT)[:, None]
    col = tl.arange(0, BT)[None, :]
    # Blocks of 2: (I - A_2)^-1 = I + A_2 (A_2, one entry below the diagonal, squares to 0).
    Ti = tl.where(row == col, 1.0, 0.0) + tl.where(row // 2 == col // 2, A, 0.0)
    for lvl in tl.static_range(1, 5):  # Ti inverts the blocks of s = 2^lvl rows; make it invert those of 2s
        # I - A_2s = (I - A_s)(I - P) with P = Ti A_off (A_off: A inside the 2s-blocks, outside the s-blocks).
        # P maps the first half of a 2s-block to the second, so P^2 = 0 and (I - A_2s)^-1 = (I + P) Ti.
        A_off = tl.where((row // (2 << lvl) == col // (2 << lvl)) & (row // (1 << lvl) != col // (1 << lvl)), A, 0.0)
        P = tl.dot(Ti, A_off, input_precision=PREC)
        Ti += tl.dot(P, Ti, input_precision=PREC)
    return Ti


@triton.jit
def _chunk_of_program(chunks_ptr, cu_ptr, T, BT: tl.constexpr, IS_VARLEN: tl.constexpr):
    """(chunk slot, first token of its sequence, sequence length, first step of the chunk) of this program."""
    i_s = tl.program_id(0)
    if IS_VARLEN:
        i_n = tl.load(chunks_ptr + 2 * i_s)
        i_c = tl.load(chunks_ptr + 2 * i_s + 1)
        bos = tl.load(cu_ptr + i_n).to(tl.int64)
        L = tl.load(cu_ptr + i_n + 1).to(tl.int64) - bos
    else:
        NT = tl.cdiv(T, BT)
        i_n, i_c = i_s // NT, i_s % NT
        bos = i_n.to(tl.int64) * T
        L = T
    return i_s, bos, L, i_c * BT


@triton.jit
def _sequence(cu_ptr, coff_ptr, i_n, T, BT: tl.constexpr, IS_VARLEN: tl.constexpr):
    """(first token, length, first chunk slot) of sequence i_n."""
    if IS_VARLEN:
        bos = tl.load(cu_ptr + i_n).to(tl.int64)
        L = tl.load(cu_ptr + i_n + 1).to(tl.int64) - bos
        c0 = tl.load(coff_ptr + i_n).to(tl.int64)
    else:
        bos = i_n.to(tl.int64) * T
        L = T
        c0 = i_n.to(tl.int64) * tl.cdiv(T, BT)
    return bos, L, c0


@triton.jit
def _rows(bos, t0, L, i_h, H: tl.constexpr, D: tl.constexpr, BT: tl.constexpr, col0, BD: tl.constexpr):
    """Offsets [BT, BD] (columns col0 .. col0 + BD) of a chunk's rows in a [*, T, H, D] tensor, and the mask
    [BT, 1] of the rows inside the sequence."""
    t = t0 + tl.arange(0, BT)
    p = ((bos + t).to(tl.int64) * H + i_h)[:, None] * D + (col0 + tl.arange(0, BD))[None, :]
    return p, (t < L)[:, None]


@triton.jit
def _scaled_chunk(r_ptr, w_ptr, k_ptr, a_ptr, b_ptr, p, m):
    """A chunk's decay-scaled inputs [BT, K], float32 (see the module docstring): rd = r exp(g), ad = a exp(gp),
    bi = b exp(-g), ki = k exp(-g), and exp(gC) [K], from the rows p, m of _rows (rows past the sequence are 0)."""
    w = tl.load(w_ptr + p, mask=m, other=0.0)
    g = tl.cumsum(w, 0)
    gC = tl.sum(w, 0)
    eg, egp, eng, egC = tl.exp(g), tl.exp(g - w), tl.exp(-g), tl.exp(gC)
    rd = tl.load(r_ptr + p, mask=m, other=0.0).to(tl.float32) * eg
    ad = tl.load(a_ptr + p, mask=m, other=0.0).to(tl.float32) * egp
    bi = tl.load(b_ptr + p, mask=m, other=0.0).to(tl.float32) * eng
    ki = tl.load(k_ptr + p, mask=m, other=0.0).to(tl.float32) * eng
    return rd, ad, bi, ki, egC


@triton.jit
def _prep_fwd_kernel(r_ptr, w_ptr, k_ptr, v_ptr, a_ptr, b_ptr, ti_ptr, qr_ptr, ov_ptr, m_ptr, c_ptr, egc_ptr,
                     cu_ptr, chunks_ptr, T, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                     STORE_TI: tl.constexpr, IS_VARLEN: tl.constexpr, PREC: tl.constexpr):
    i_h = tl.program_id(1)
    i_s, bos, L, t0 = _chunk_of_program(chunks_ptr, cu_ptr, T, BT, IS_VARLEN)
    p, m = _rows(bos, t0, L, i_h, H, K, BT, 0, K)
    pv, _ = _rows(bos, t0, L, i_h, H, V, BT, 0, V)
    rd, ad, bi, ki, egC = _scaled_chunk(r_ptr, w_ptr, k_ptr, a_ptr, b_ptr, p, m)
    v = tl.load(v_ptr + pv, mask=m, other=0.0).to(tl.float32)
    ot = tl.arange(0, BT)
    strict = ot[:, None] > ot[None, :]
    lower = ot[:, None] >= ot[None, :]
    A_ab = tl.where(strict, tl.dot(ad, tl.trans(bi), input_precision=PREC), 0.0)
    A_ak = tl.where(strict, tl.dot(ad, tl.trans(ki), input_precision=PREC), 0.0)
    A_rb = tl.where(lower, tl.dot(rd, tl.trans(bi), input_precision=PREC), 0.0)
    A_rk = tl.where(lower, tl.dot(rd, tl.trans(ki), input_precision=PREC), 0.0)
    Ti = _solve_unit_lower(A_ab, BT, PREC)
    # X = A_rb Ti and Y = be^T Ti first: Qr, Ov, M and C are then one product with ad or v each
    X = tl.dot(A_rb, Ti, input_precision=PREC)
    Qr = tl.dot(X, ad, acc=rd, input_precision=PREC)
    Ov = tl.dot(tl.dot(X, A_ak, acc=A_rk, input_precision=PREC), v, input_precision=PREC)
    tl.store(qr_ptr + p, Qr.to(qr_ptr.dtype.element_ty), mask=m)
    tl.store(ov_ptr + pv, Ov.to(ov_ptr.dtype.element_ty), mask=m)
    sh = i_s.to(tl.int64) * H + i_h
    ok = tl.arange(0, K)
    Y = tl.dot(tl.trans(bi), Ti, input_precision=PREC)  # be^T Ti without its row scale exp(gC)
    M = egC[:, None] * tl.dot(Y, ad, input_precision=PREC)
    tl.store(m_ptr + sh * K * K + ok[:, None] * K + ok[None, :], M.to(m_ptr.dtype.element_ty))
    C = egC[:, None] * tl.dot(tl.dot(Y, A_ak, acc=tl.trans(ki), input_precision=PREC), v, input_precision=PREC)
    tl.store(c_ptr + sh * K * V + ok[:, None] * V + tl.arange(0, V)[None, :], C.to(c_ptr.dtype.element_ty))
    tl.store(egc_ptr + sh * K + ok, egC)
    if STORE_TI:
        tl.store(ti_ptr + sh * BT * BT + ot[:, None] * BT + ot[None, :], Ti)


@triton.jit
def _state_program(cu_ptr, coff_ptr, T, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                   BV: tl.constexpr, IS_VARLEN: tl.constexpr):
    """A sequential state kernel's program: its (sequence, head) index, head, the sequence's first row, length and
    first chunk slot, the state's rows, and the first column and offsets of the [K, BV] block of it that it carries."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos, L, c0 = _sequence(cu_ptr, coff_ptr, i_n, T, BT, IS_VARLEN)
    ok = tl.arange(0, K)
    col0 = i_v * BV
    p_state = ok[:, None] * V + (col0 + tl.arange(0, BV))[None, :]
    return i_nh, i_h, bos, L, c0, ok, col0, p_state


@triton.jit
def _state_or_zeros(ptr, i_nh, p_state, K: tl.constexpr, V: tl.constexpr, BV: tl.constexpr, GIVEN: tl.constexpr):
    """The [K, BV] block of a given [N, H, K, V] state (or state gradient), float32; zeros when none is given."""
    if GIVEN:
        S = tl.load(ptr + i_nh.to(tl.int64) * K * V + p_state)
    else:
        S = tl.zeros([K, BV], dtype=tl.float32)
    return S


@triton.jit
def _state_fwd_kernel(qr_ptr, ov_ptr, m_ptr, c_ptr, egc_ptr, h0_ptr, o_ptr, ht_ptr, hs_ptr, cu_ptr, coff_ptr, T,
                      H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr,
                      STAGES: tl.constexpr, USE_H0: tl.constexpr, STORE_FINAL: tl.constexpr, SAVE: tl.constexpr,
                      IS_VARLEN: tl.constexpr, PREC: tl.constexpr):
    i_nh, i_h, bos, L, c0, ok, col0, p_state = _state_program(cu_ptr, coff_ptr, T, H, K, V, BT, BV, IS_VARLEN)
    S = _state_or_zeros(h0_ptr, i_nh, p_state, K, V, BV, USE_H0)
    # The loop's loads do not depend on S: the pipeliner issues them STAGES - 1 chunks ahead.
    for i_c in tl.range(0, tl.cdiv(L, BT), num_stages=STAGES):
        sh = (c0 + i_c) * H + i_h
        p, m = _rows(bos, i_c * BT, L, i_h, H, K, BT, 0, K)
        pv, _ = _rows(bos, i_c * BT, L, i_h, H, V, BT, col0, BV)
        if SAVE:
            tl.store(hs_ptr + sh * K * V + p_state, S.to(hs_ptr.dtype.element_ty))
        o = tl.dot(tl.load(qr_ptr + p, mask=m, other=0.0).to(tl.float32), S, input_precision=PREC)
        o += tl.load(ov_ptr + pv, mask=m, other=0.0).to(tl.float32)
        tl.store(o_ptr + pv, o.to(o_ptr.dtype.element_ty), mask=m)
        M = tl.load(m_ptr + sh * K * K + ok[:, None] * K + ok[None, :]).to(tl.float32)
        S = tl.load(egc_ptr + sh * K + ok)[:, None] * S + tl.dot(M, S, input_precision=PREC)
        S += tl.load(c_ptr + sh * K * V + p_state).to(tl.float32)
    if STORE_FINAL:
        tl.store(ht_ptr + i_nh.to(tl.int64) * K * V + p_state, S)


@triton.jit
def _state_bwd_kernel(qr_ptr, m_ptr, egc_ptr, do_ptr, dht_ptr, dhs_ptr, dh0_ptr, cu_ptr, coff_ptr, T,
                      H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr,
                      STAGES: tl.constexpr, USE_DHT: tl.constexpr, STORE_DH0: tl.constexpr, IS_VARLEN: tl.constexpr,
                      PREC: tl.constexpr):
    i_nh, i_h, bos, L, c0, ok, col0, p_state = _state_program(cu_ptr, coff_ptr, T, H, K, V, BT, BV, IS_VARLEN)
    G = _state_or_zeros(dht_ptr, i_nh, p_state, K, V, BV, USE_DHT)
    NC = tl.cdiv(L, BT)
    for j in tl.range(0, NC, num_stages=STAGES):
        i_c = NC - 1 - j
        sh = (c0 + i_c) * H + i_h
        p, m = _rows(bos, i_c * BT, L, i_h, H, K, BT, 0, K)
        pv, _ = _rows(bos, i_c * BT, L, i_h, H, V, BT, col0, BV)
        tl.store(dhs_ptr + sh * K * V + p_state, G.to(dhs_ptr.dtype.element_ty))
        M_t = tl.load(m_ptr + sh * K * K + ok[None, :] * K + ok[:, None]).to(tl.float32)  # M^T
        G_start = tl.load(egc_ptr + sh * K + ok)[:, None] * G + tl.dot(M_t, G, input_precision=PREC)
        do = tl.load(do_ptr + pv, mask=m, other=0.0).to(tl.float32)
        Qr = tl.load(qr_ptr + p, mask=m, other=0.0).to(tl.float32)
        G = tl.dot(tl.trans(Qr), do, acc=G_start, input_precision=PREC)
    if STORE_DH0:
        tl.store(dh0_ptr + i_nh.to(tl.int64) * K * V + p_state, G)


@triton.jit
def _grad_sa_kernel(r_ptr, w_ptr, k_ptr, v_ptr, a_ptr, b_ptr, do_ptr, ti_ptr, hs_ptr, dhs_ptr, dv_ptr, sa_ptr, du_ptr,
                    cu_ptr, chunks_ptr, T, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                    IS_VARLEN: tl.constexpr, PREC: tl.constexpr):
    i_h = tl.program_id(1)
    i_s, bos, L, t0 = _chunk_of_program(chunks_ptr, cu_ptr, T, BT, IS_VARLEN)
    p, m = _rows(bos, t0, L, i_h, H, K, BT, 0, K)
    pv, _ = _rows(bos, t0, L, i_h, H, V, BT, 0, V)
    rd, ad, bi, ki, egC = _scaled_chunk(r_ptr, w_ptr, k_ptr, a_ptr, b_ptr, p, m)
    ot = tl.arange(0, BT)
    sh = i_s.to(tl.int64) * H + i_h
    Ti = tl.load(ti_ptr + sh * BT * BT + ot[:, None] * BT + ot[None, :])
    strict = ot[:, None] > ot[None, :]
    lower = ot[:, None] >= ot[None, :]
    A_ak = tl.where(strict, tl.dot(ad, tl.trans(ki), input_precision=PREC), 0.0)
    A_rb = tl.where(lower, tl.dot(rd, tl.trans(bi), input_precision=PREC), 0.0)
    A_rk = tl.where(lower, tl.dot(rd, tl.trans(ki), input_precision=PREC), 0.0)
    v = tl.load(v_ptr + pv, mask=m, other=0.0).to(tl.float32)
    do = tl.load(do_ptr + pv, mask=m, other=0.0).to(tl.float32)
    p_state = sh * K * V + tl.arange(0, K)[:, None] * V + tl.arange(0, V)[None, :]
    S = tl.load(hs_ptr + p_state).to(tl.float32)
    Ge = egC[:, None] * tl.load(dhs_ptr + p_state).to(tl.float32)  # be G = bi (exp(gC) G), ke G likewise
    # S' = exp(gC) S + be^T sa + ke^T v ;  o = rd S + A_rb sa + A_rk v ;  sa = Ti U, U = A_ak v + ad S
    sa = tl.dot(Ti, tl.dot(A_ak, v, acc=tl.dot(ad, S, input_precision=PREC), input_precision=PREC),
                input_precision=PREC)
    d_sa = tl.dot(tl.trans(A_rb), do, acc=tl.dot(bi, Ge, input_precision=PREC), input_precision=PREC)
    dU = tl.dot(tl.trans(Ti), d_sa, input_precision=PREC)
    dv = tl.dot(tl.trans(A_rk), do, acc=tl.dot(ki, Ge, input_precision=PREC), input_precision=PREC)
    dv = tl.dot(tl.trans(A_ak), dU, acc=dv, input_precision=PREC)
    tl.store(dv_ptr + pv, dv.to(dv_ptr.dtype.element_ty), mask=m)
    p_chunk = sh * BT * V + ot[:, None] * V + tl.arange(0, V)[None, :]
    tl.store(sa_ptr + p_chunk, sa.to(sa_ptr.dtype.element_ty))
    tl.store(du_ptr + p_chunk, dU.to(du_ptr.dtype.element_ty))


@triton.jit
def _grad_kernel(r_ptr, w_ptr, k_ptr, v_ptr, a_ptr, b_ptr, do_ptr, hs_ptr, dhs_ptr, sa_ptr, du_ptr,
                 dr_ptr, dw_ptr, dk_ptr, da_ptr, db_ptr, cu_ptr, chunks_ptr, T,
                 H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, IS_VARLEN: tl.constexpr,
                 PREC: tl.constexpr):
    i_h = tl.program_id(1)
    i_s, bos, L, t0 = _chunk_of_program(chunks_ptr, cu_ptr, T, BT, IS_VARLEN)
    p, m = _rows(bos, t0, L, i_h, H, K, BT, 0, K)
    pv, _ = _rows(bos, t0, L, i_h, H, V, BT, 0, V)
    ot = tl.arange(0, BT)
    sh = i_s.to(tl.int64) * H + i_h
    p_chunk = sh * BT * V + ot[:, None] * V + tl.arange(0, V)[None, :]
    # These six stay in the stored dtype: for bf16 inputs the eight products of pairs of them run as bf16 dots
    # (exact, as the tf32 ones were: every operand is a bf16 number) on half the registers.
    ST: tl.constexpr = hs_ptr.dtype.element_ty
    sa = tl.load(sa_ptr + p_chunk)
    dU = tl.load(du_ptr + p_chunk)
    v = tl.load(v_ptr + pv, mask=m, other=0.0).to(ST)
    do = tl.load(do_ptr + pv, mask=m, other=0.0).to(ST)
    p_state = sh * K * V + tl.arange(0, K)[:, None] * V + tl.arange(0, V)[None, :]
    S = tl.load(hs_ptr + p_state)
    G = tl.load(dhs_ptr + p_state)
    dA_rb = tl.dot(do, tl.trans(sa), input_precision=PREC)
    dA_rk = tl.dot(do, tl.trans(v), input_precision=PREC)
    dA_ab = tl.dot(dU, tl.trans(sa), input_precision=PREC)
    dA_ak = tl.dot(dU, tl.trans(v), input_precision=PREC)
    d_rd = tl.dot(do, tl.trans(S), input_precision=PREC)
    d_ad = tl.dot(dU, tl.trans(S), input_precision=PREC)
    GS = tl.sum(G.to(tl.float32) * S.to(tl.float32), 1)
    strict = ot[:, None] > ot[None, :]
    lower = ot[:, None] >= ot[None, :]
    dA_rb = tl.where(lower, dA_rb, 0.0)
    dA_rk = tl.where(lower, dA_rk, 0.0)
    dA_ab = tl.where(strict, dA_ab, 0.0)
    dA_ak = tl.where(strict, dA_ak, 0.0)
    # The chunk's own inputs are loaded once most of the [BT, V] and [K, V] tensors above are no longer needed.
    w = tl.load(w_ptr + p, mask=m, other=0.0)
    g = tl.cumsum(w, 0)
    gC = tl.sum(w, 0)
    r = tl.load(r_ptr + p, mask=m, other=0.0).to(tl.float32)
    a = tl.load(a_ptr + p, mask=m, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + p, mask=m, other=0.0).to(tl.float32)
    k = tl.load(k_ptr + p, mask=m, other=0.0).to(tl.float32)
    rd = r * tl.exp(g)
    ad = a * tl.exp(g - w)
    bi = b * tl.exp(-g)
    ki = k * tl.exp(-g)
    d_rd = tl.dot(dA_rk, ki, acc=tl.dot(dA_rb, bi, acc=d_rd, input_precision=PREC), input_precision=PREC)
    d_ad = tl.dot(dA_ak, ki, acc=tl.dot(dA_ab, bi, acc=d_ad, input_precision=PREC), input_precision=PREC)
    d_bi = tl.dot(tl.trans(dA_ab), ad, input_precision=PREC) + tl.dot(tl.trans(dA_rb), rd, input_precision=PREC)
    d_ki = tl.dot(tl.trans(dA_ak), ad, input_precision=PREC) + tl.dot(tl.trans(dA_rk), rd, input_precision=PREC)
    # Last, while sa, v and G wait in bf16 (fewer registers than these two float32 products): this order and the
    # epilogue below spill less.
    d_be = tl.dot(sa, tl.trans(G), input_precision=PREC)
    d_ke = tl.dot(v, tl.trans(G), input_precision=PREC)
    # The gradients of r, a, b, k, then those of the log decays through them (d_rd * rd = dr * r, d_ad * ad = da * a,
    # d_bi * bi + d_be * be = db * b, d_ki * ki + d_ke * ke = dk * k): the scaled inputs are dead after the products.
    ece = tl.exp(gC[None, :] - g)
    dr = d_rd * tl.exp(g)
    da = d_ad * tl.exp(g - w)
    db = d_bi * tl.exp(-g) + d_be * ece
    dk = d_ki * tl.exp(-g) + d_ke * ece
    dgp = da * a
    x = dr * r + dgp - db * b - dk * k
    dgC = GS * tl.exp(gC) + tl.sum((d_be * b + d_ke * k) * ece, 0)
    dw = tl.sum(x, 0)[None, :] - tl.cumsum(x, 0) + x - dgp + dgC[None, :]  # reverse cumulative sums
    tl.store(dr_ptr + p, dr.to(dr_ptr.dtype.element_ty), mask=m)
    tl.store(da_ptr + p, da.to(da_ptr.dtype.element_ty), mask=m)
    tl.store(db_ptr + p, db.to(db_ptr.dtype.element_ty), mask=m)
    tl.store(dk_ptr + p, dk.to(dk_ptr.dtype.element_ty), mask=m)
    tl.store(dw_ptr + p, dw.to(dw_ptr.dtype.element_ty), mask=m)


def _prec(x):
    return "tf32x3" if x.dtype == torch.float32 else "tf32"


def _stored_dtype(x):
    """dtype of the intermediates that go through memory between launches (Qr, Ov, M, C, chunk states, sa, dU)."""
    return torch.bfloat16 if x.dtype == torch.bfloat16 else torch.float32


def _chunk_table(cu_seqlens, B, T):
    """(number of chunk slots, chunk table [slots, 2] of (sequence, chunk) pairs, per-sequence first slot).

    Without cu_seqlens the slots are (sequence, chunk) in order and both tables are None (no host sync); with it,
    one host sync sizes the table."""
    if cu_seqlens is None:
        return B * triton.cdiv(T, BT), None, None
    counts = (cu_seqlens[1:] - cu_seqlens[:-1] + BT - 1) // BT
    slots = int(counts.sum())
    coff = torch.cumsum(counts, 0) - counts
    seq = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts, output_size=slots)
    chunk = torch.arange(slots, device=counts.device) - coff[seq]
    return slots, torch.stack((seq, chunk), 1).to(torch.int32).contiguous(), coff


def _state_config(n_programs, V, device):
    """(V-block, warps, pipeline stages) of the sequential state kernels: split the state's columns when there are
    fewer (sequence, head) programs than SMs (the best at (B, T, H) = (1, 16384, 32) and (8, 4096, 32))."""
    return (16, 2, 3) if n_programs < sm_count(device) else (V, 4, 2)


def _prepare(r, w, k, v, a, b, cu_seqlens, chunks, slots, store_ti):
    """The parallel pass over chunks (_prep_fwd_kernel). Returns (Ti or None, Qr, Ov, M, C, exp(gC))."""
    B, T, H, K = r.shape
    V = v.shape[-1]
    f32 = dict(dtype=torch.float32, device=r.device)
    stored = dict(dtype=_stored_dtype(r), device=r.device)
    Qr = torch.empty(B, T, H, K, **stored)
    Ov = torch.empty(B, T, H, V, **stored)
    M = torch.empty(slots, H, K, K, **stored)
    C = torch.empty(slots, H, K, V, **stored)
    egC = torch.empty(slots, H, K, **f32)
    Ti = torch.empty(slots, H, BT, BT, **f32) if store_ti else None
    _prep_fwd_kernel[(slots, H)](r, w, k, v, a, b, Ti, Qr, Ov, M, C, egC, cu_seqlens, chunks, T, H=H, K=K, V=V, BT=BT,
                                 STORE_TI=store_ti, IS_VARLEN=cu_seqlens is not None, PREC=_prec(r), num_warps=4,
                                 maxnreg=PREP_MAXNREG)
    return Ti, Qr, Ov, M, C, egC


def _chunk_forward(r, w, k, v, a, b, initial_state, output_final_state, cu_seqlens, needs_grad):
    """The forward's two launches. Returns (o, final state or None, what the backward needs besides the inputs, or
    None): the parallel pass's Ti, Qr and M (4 [C] vectors of 16 bits a token for 16-bit inputs) among it."""
    B, T, H, K = r.shape
    V = v.shape[-1]
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    slots, chunks, coff = _chunk_table(cu_seqlens, B, T)
    Ti, Qr, Ov, M, C, egC = _prepare(r, w, k, v, a, b, cu_seqlens, chunks, slots, needs_grad)
    hs = torch.empty(slots, H, K, V, dtype=_stored_dtype(r), device=r.device) if needs_grad else None
    o = torch.empty_like(v, dtype=r.dtype)
    ht = torch.empty(N, H, K, V, dtype=torch.float32, device=r.device) if output_final_state else None
    BV, warps, stages = _state_config(N * H, V, r.device)
    _state_fwd_kernel[(V // BV, N * H)](
        Qr, Ov, M, C, egC, initial_state, o, ht, hs, cu_seqlens, coff, T, H=H, K=K, V=V, BT=BT, BV=BV, STAGES=stages,
        USE_H0=initial_state is not None, STORE_FINAL=output_final_state, SAVE=needs_grad,
        IS_VARLEN=cu_seqlens is not None, PREC=_prec(r), num_warps=warps,
    )
    if not needs_grad:
        return o, ht, None
    return o, ht, (Ti, Qr, M, egC, hs, cu_seqlens, chunks, coff)


def _chunk_backward(inputs, saved, do, dht, has_h0):
    """The backward's three launches, from the forward's inputs (r, w, k, v, a, b) and what it saved for the
    backward (_chunk_forward's third result without the inputs). Returns (dr, dw, dk, dv, da, db, dh0 or None)."""
    r, w, k, v, a, b = inputs
    Ti, Qr, M, egC, hs, cu_seqlens, chunks, coff = saved
    B, T, H, K = r.shape
    V = v.shape[-1]
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    slots = hs.shape[0]
    do = do.contiguous()
    dr, dw, dk, dv, da, db = (torch.empty_like(x) for x in inputs)
    dh0 = r.new_empty(N, H, K, V, dtype=torch.float32) if has_h0 else None
    dhs = torch.empty_like(hs)
    meta = dict(H=H, K=K, V=V, BT=BT, IS_VARLEN=cu_seqlens is not None, PREC=_prec(r))
    BV, warps, stages = _state_config(N * H, V, r.device)
    _state_bwd_kernel[(V // BV, N * H)](
        Qr, M, egC, do, None if dht is None else dht.contiguous(), dhs, dh0, cu_seqlens, coff, T,
        BV=BV, STAGES=stages, USE_DHT=dht is not None, STORE_DH0=has_h0, num_warps=warps, **meta,
    )
    sa = torch.empty(slots, H, BT, V, dtype=hs.dtype, device=r.device)
    dU = torch.empty_like(sa)
    _grad_sa_kernel[(slots, H)](r, w, k, v, a, b, do, Ti, hs, dhs, dv, sa, dU, cu_seqlens, chunks, T,
                                num_warps=GRAD_SA_WARPS[r.dtype], **meta)
    _grad_kernel[(slots, H)](r, w, k, v, a, b, do, hs, dhs, sa, dU, dr, dw, dk, da, db, cu_seqlens, chunks, T,
                             num_warps=4, **meta)
    return dr, dw, dk, dv, da, db, dh0


class _ChunkWKV7(torch.autograd.Function):
    @staticmethod
    def forward(ctx, r, w, k, v, a, b, initial_state, output_final_state, cu_seqlens):
        o, ht, saved = _chunk_forward(r, w, k, v, a, b, initial_state, output_final_state, cu_seqlens, True)
        ctx.save_for_backward(r, w, k, v, a, b, *saved)
        ctx.has_h0 = initial_state is not None
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        inputs, saved = ctx.saved_tensors[:6], ctx.saved_tensors[6:]
        return (*_chunk_backward(inputs, saved, do, dht, ctx.has_h0), None, None)


def chunk_wkv7(r, w, k, v, a, b, initial_state=None, output_final_state=False, cu_seqlens=None):
    """WKV-7 over whole sequences; same arguments and results as wkv7_reference. Differentiable."""
    if cu_seqlens is not None and r.shape[0] != 1:
        raise ValueError(f"cu_seqlens packs sequences along T and needs B == 1, got B = {r.shape[0]}")
    r, k, v, a, b = (x.contiguous() for x in (r, k, v, a, b))
    w = w.contiguous().float()
    if initial_state is not None:
        initial_state = initial_state.contiguous().float()
    inputs = (r, w, k, v, a, b, initial_state)
    needs_grad = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in inputs)
    with launch_device(r):
        if needs_grad:
            return _ChunkWKV7.apply(r, w, k, v, a, b, initial_state, output_final_state, cu_seqlens)
        o, ht, _ = _chunk_forward(r, w, k, v, a, b, initial_state, output_final_state, cu_seqlens, False)
    return o, ht
