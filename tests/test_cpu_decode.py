"""The decoding step without kernels (rwkv7_kernels/torch_decode.py, tuned for the CPU) against the references it
shortcuts, and the decoding step of a float64 model against the exact official math."""

import pytest
import torch
from official import official_math_fp64, random_official_weights, to_fla

from configuration_rwkv7 import RWKV7Config
from modeling_rwkv7 import ForwardPath, RWKV7ForCausalLM, choose_path
from rwkv7_kernels import TimeMixParams
from rwkv7_kernels.ops_reference import time_mix_reference
from rwkv7_kernels.torch_decode import _wkv7_step, time_mix_step
from rwkv7_kernels.wkv7_reference import wkv7_reference


def wkv7_inputs(B, T, H, K, V, dtype=torch.float64, seed=0):
    """r, w, k, v, a, b as RWKV-7 makes them (a = -kk, b = kk * a_gate), and a state [B, H, K, V]."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    kk = torch.nn.functional.normalize(randn(B, T, H, K), dim=-1)
    w = -0.6065306597126334 * torch.sigmoid(randn(B, T, H, K))
    r, k, v, b = randn(B, T, H, K), randn(B, T, H, K), randn(B, T, H, V), kk * torch.sigmoid(randn(B, T, H, K))
    inputs = [t.to(dtype) for t in (r, w, k, v, -kk, b)]
    inputs[1] = w.to(torch.promote_types(dtype, torch.float32))  # the log decay is float32 at least
    return inputs, randn(B, H, K, V) * 0.5


def test_wkv7_steps_equal_the_sequence_recurrence():
    B, T, H, K, V = 2, 5, 3, 16, 8
    (r, w, k, v, a, b), state = wkv7_inputs(B, T, H, K, V)
    o_seq, final_seq = wkv7_reference(r, w, k, v, a, b, initial_state=state, output_final_state=True)
    h, outputs = state.clone(), []
    for t in range(T):
        outputs.append(_wkv7_step(*(x[:, t : t + 1] for x in (r, w, k, v, a, b)), h))
    torch.testing.assert_close(torch.cat(outputs, dim=1), o_seq, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h, final_seq, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "strided"])
def test_wkv7_step_writes_the_new_state_into_the_given_one(dtype, contiguous):
    """o in the inputs' dtype; the float32 state updated where it lies, or, where it cannot be (float64 inputs step in
    float64; a strided state does not view as [B * H, K, V]), with the new state copied in."""
    inputs, state = wkv7_inputs(2, 1, 3, 16, 16, dtype)
    state = state.float()
    if not contiguous:
        state = state.transpose(-1, -2).contiguous().transpose(-1, -2)
    ref_o, ref_h = wkv7_reference(*inputs, initial_state=state, output_final_state=True)
    o = _wkv7_step(*inputs, state)
    assert o.dtype == dtype
    torch.testing.assert_close(o, ref_o)
    torch.testing.assert_close(state, ref_h.float())


@pytest.mark.parametrize("padded", [False, True], ids=["token", "padding"])
@pytest.mark.parametrize("first_layer", [False, True], ids=["layer_n", "layer_0"])
def test_time_mix_step_equals_the_reference(padded, first_layer):
    B, H, N = 2, 2, 64
    C = H * N
    g = torch.Generator().manual_seed(1)
    rows = [torch.randn(B, 1, C, generator=g, dtype=torch.float64) for _ in range(8)]
    if first_layer:
        rows[5] = rows[6] = None  # no v LoRA, no v_first: layer 0 makes v_first
    params = TimeMixParams(*(torch.randn(C, generator=g, dtype=torch.float64) * 0.1 + 1 for _ in range(2)),
                           torch.randn(H, N, generator=g, dtype=torch.float64) * 0.1,
                           *(torch.randn(C, generator=g, dtype=torch.float64) for _ in range(2)), 64e-5)
    state = torch.randn(B, H, N, N, generator=g, dtype=torch.float64)
    mask = torch.tensor([[0], [1]]) if padded else None
    ref_y, ref_v_first, ref_state = time_mix_reference(*rows, params, state=state.clone(), attention_mask=mask)
    y, v_first, new_state = time_mix_step(*rows, params, state, attention_mask=mask)
    assert new_state is state
    torch.testing.assert_close(y, ref_y, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(v_first, ref_v_first, rtol=0, atol=0)
    torch.testing.assert_close(state, ref_state, rtol=1e-12, atol=1e-12)


def test_float64_decoding_steps_match_exact_math():
    """Token by token after a prompt (which makes the cache's states float64), against the official one-token math
    in float64: the decoding step holds to rounding, not just to float32 tolerances."""
    official = random_official_weights(hidden=128, layers=2, head_dim=64, seed=5)
    tokens = [5, 17, 3, 90, 42, 42, 7, 0]
    exact_logits, exact_states = official_math_fp64(official, tokens)
    config, state = to_fla(official)
    model = RWKV7ForCausalLM(RWKV7Config(**config)).double().eval()
    model.load_state_dict(state)
    with torch.no_grad():
        out = model(torch.tensor([tokens[:3]]), use_cache=True)
        logits = [out.logits[0]]
        for token in tokens[3:]:
            assert choose_path(model, torch.tensor([[token]]), out.cache, None) is ForwardPath.DECODE_PYTORCH
            out = model(torch.tensor([[token]]), cache=out.cache, use_cache=True)
            logits.append(out.logits[0])
    torch.testing.assert_close(torch.cat(logits), exact_logits, rtol=1e-10, atol=1e-10)
    for wkv, exact in zip(out.cache.wkv, exact_states):
        torch.testing.assert_close(wkv[0], exact.transpose(-1, -2), rtol=1e-10, atol=1e-10)
