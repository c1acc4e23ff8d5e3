"""The fused kernels of a decoding step (kernels/time_mix_decode.py, kernels/norm_shift_mix_decode.py) against
their PyTorch references (kernels/ops_reference.py) run in float64.

Without CUDA (CI) the kernel runs on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1, set by tests/conftest.py before
the kernel module is imported); on a CUDA machine the same file runs it on the GPU:
    python -m pytest tests/test_fused_decode_kernels.py
"""


import pytest
import torch

from conftest import KERNEL_TEST_DEVICE as DEVICE  # noqa: E402  (conftest set TRITON_INTERPRET for the CPU)

from kernels.norm_shift_mix_decode import norm_shift_mix_decode_  # noqa: E402
from kernels.ops_reference import norm_shift_mix_reference, time_mix_reference  # noqa: E402
from kernels.time_mix_decode import time_mix_decode_  # noqa: E402

BOUNDS = {torch.float32: 1e-5, torch.bfloat16: 5e-3, torch.float16: 2e-3}


def make_inputs(B, H, dtype, first_layer, seed):
    g = torch.Generator().manual_seed(seed)
    C, N = H * 64, 64

    def randn(*shape, std=1.0, mean=0.0):
        return torch.randn(*shape, generator=g) * std + mean

    rows = [randn(B, 1, C) for _ in range(8)]  # r, w_raw, k, v, a_raw, v_gate_raw, v_first, g
    if first_layer:
        rows[5] = rows[6] = None
    params = [randn(C, std=0.1, mean=0.85), randn(C, std=0.1, mean=1.0), randn(H, N, std=0.1),
              randn(C, std=0.1, mean=1.0), randn(C, std=0.1)]  # k_k, k_a, r_k, gn_weight, gn_bias
    state = randn(B, H, N, N, std=0.5)
    mask = torch.ones(B, 1, dtype=torch.long)
    mask[0] = 0  # row 0 is padding at this step: its state must not move
    dev = lambda t, dt: None if t is None else t.to(DEVICE, dt)  # noqa: E731
    return [dev(t, dtype) for t in rows], [dev(t, dtype) for t in params], state.to(DEVICE), mask.to(DEVICE)


def rel(x, ref):
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("first_layer", [True, False], ids=["layer0", "layer1+"])
@pytest.mark.parametrize("masked", [False, True], ids=["no_mask", "mask"])
def test_fused_decode_step_matches_reference(dtype, first_layer, masked):
    B, H = (3, 2) if DEVICE == "cpu" else (33, 16)
    rows, params, state, mask = make_inputs(B, H, dtype, first_layer, seed=first_layer + 2 * masked)
    mask = mask if masked else None
    double = lambda t: None if t is None else t.double()  # noqa: E731
    ref_state = state.double().clone()
    ref_y, ref_v_first, _ = time_mix_reference(*map(double, rows), *map(double, params), 64e-5, mask, ref_state,
                                               in_place=True)
    before = state.clone()
    y, v_first, returned = time_mix_decode_(*rows, *params, 64e-5, mask, state)
    assert returned is state and y.dtype == dtype and y.shape == (B, 1, H * 64)
    assert (v_first is rows[3]) if first_layer else (v_first is rows[6])
    errors = {"y": rel(y, ref_y), "state": rel(state, ref_state)}
    print(f"\n{DEVICE} {dtype} first_layer={first_layer} masked={masked}: {errors}")
    assert errors["y"] <= BOUNDS[dtype] and errors["state"] <= BOUNDS[dtype], errors
    if masked:
        torch.testing.assert_close(state[0], before[0], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mixes", [6, 1])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
def test_fused_norm_shift_mix_matches_reference(dtype, mixes, with_bias):
    B, C = (3, 192) if DEVICE == "cpu" else (33, 2560)  # C not a power of two
    g = torch.Generator().manual_seed(mixes)
    x = (torch.randn(B, 1, C, generator=g) * 3 + 1).to(DEVICE, dtype)
    weight = (torch.randn(C, generator=g) * 0.1 + 1).to(DEVICE, dtype)
    bias = (torch.randn(C, generator=g) * 0.1).to(DEVICE, dtype) if with_bias else None
    prev = torch.randn(B, C, generator=g).to(DEVICE, dtype)
    mix = torch.rand(mixes, C, generator=g).to(DEVICE, dtype)
    mask = torch.tensor([[0]] + [[1]] * (B - 1), device=DEVICE)
    ref_prev = prev.double().clone()
    ref_mixed, _ = norm_shift_mix_reference(x.double(), weight.double(), None if bias is None else bias.double(),
                                            1e-5, ref_prev, mix.double(), mask, in_place=True)
    mixed, returned = norm_shift_mix_decode_(x, weight, bias, 1e-5, prev, mix, mask)
    assert returned is prev and mixed.shape == (mixes, B, 1, C) and mixed.dtype == dtype
    bound = 1e-6 if dtype == torch.float32 else 5e-3
    assert rel(mixed, ref_mixed) <= bound and rel(prev, ref_prev) <= bound, (rel(mixed, ref_mixed), rel(prev, ref_prev))
    assert torch.equal(prev[0].double(), ref_prev[0])  # the padded row keeps its previous x


@pytest.mark.parametrize("activation", [None, "tanh", "sigmoid", "relu2"])
@pytest.mark.parametrize("shape", [(96, 200), (1030, 64)], ids=["N96_K200", "N1030_K64"])  # N, K: ragged blocks
@pytest.mark.parametrize("extras", [False, True], ids=["plain", "bias_residual"])
def test_linear_row_matches_reference(activation, shape, extras):
    from kernels.linear_decode import linear_row
    from kernels.ops_reference import linear_reference

    N, K = shape
    g = torch.Generator().manual_seed(N + K)
    x = torch.randn(1, 1, K, generator=g).to(DEVICE, torch.bfloat16)
    weight = (torch.randn(N, K, generator=g) / K**0.5).to(DEVICE, torch.bfloat16)
    bias = torch.randn(N, generator=g).to(DEVICE, torch.bfloat16) if extras else None
    residual = torch.randn(1, 1, N, generator=g).to(DEVICE, torch.bfloat16) if extras else None
    y = linear_row(x, weight, bias, activation, residual)
    ref = linear_reference(x.double(), weight.double(), None if bias is None else bias.double(), activation,
                           None if residual is None else residual.double())
    assert y.shape == (1, 1, N) and y.dtype == torch.bfloat16
    assert rel(y, ref) <= 5e-3, rel(y, ref)
