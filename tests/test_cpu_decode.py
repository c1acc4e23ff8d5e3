"""The one-token shortcuts of the PyTorch path (what a decoding step runs on the CPU) against the general code they
shortcut, and the decoding step of a float64 model against the exact official math.
"""

import pytest
import torch
import torch.nn as nn
from official import official_math_fp64, random_official_weights, to_fla

import modeling_rwkv7
from configuration_rwkv7 import RWKV7Config
from rwkv7_kernels.ops_reference import time_mix_reference
from rwkv7_kernels.wkv7_reference import wkv7_one_token, wkv7_reference
from modeling_rwkv7 import RWKV7ForCausalLM


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


def test_one_token_steps_equal_the_sequence_recurrence():
    B, T, H, K, V = 2, 5, 3, 16, 8
    (r, w, k, v, a, b), state = wkv7_inputs(B, T, H, K, V)
    o_seq, final_seq = wkv7_reference(r, w, k, v, a, b, initial_state=state, output_final_state=True)
    h, outputs = state, []
    for t in range(T):
        o, h = wkv7_one_token(*(x[:, t : t + 1] for x in (r, w, k, v, a, b)), h)
        outputs.append(o)
    torch.testing.assert_close(torch.cat(outputs, dim=1), o_seq, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h, final_seq, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_one_token_step_keeps_the_reference_dtypes_and_state(dtype):
    """o in the inputs' dtype, the new state in the compute dtype (float64 only for float64 inputs), the given
    state untouched (decoding copies the new state into it), gradients those of the sequence recurrence."""
    inputs, state = wkv7_inputs(2, 1, 3, 16, 16, dtype)
    state = state.float()
    before = state.clone()
    o, h = wkv7_one_token(*inputs, state)
    ref_o, ref_h = wkv7_reference(*inputs, initial_state=state, output_final_state=True)
    assert o.dtype == ref_o.dtype == dtype and h.dtype == ref_h.dtype
    assert h.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert torch.equal(state, before)
    torch.testing.assert_close(o, ref_o)
    torch.testing.assert_close(h, ref_h)

    leaves = [x.double().requires_grad_() for x in (*inputs, state)]
    ref_leaves = [x.detach().clone().requires_grad_() for x in leaves]
    o, h = wkv7_one_token(*leaves)
    ref_o, ref_h = wkv7_reference(*ref_leaves[:6], initial_state=ref_leaves[6], output_final_state=True)
    weights = torch.randn_like(o), torch.randn_like(h)
    (o * weights[0]).sum().add((h * weights[1]).sum()).backward()
    (ref_o * weights[0]).sum().add((ref_h * weights[1]).sum()).backward()
    for leaf, ref in zip(leaves, ref_leaves):
        torch.testing.assert_close(leaf.grad, ref.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "strided"])
def test_one_token_step_in_place_writes_the_new_state_into_the_given_one(dtype, contiguous):
    """in_place (decoding): the given float32 state becomes the new state and comes back, the same values as the
    step that leaves it alone. A float32 state updates where it lies; one the step cannot update there (float64
    inputs step in float64; a strided state does not view as [B * H, K, V]) gets the new state copied in."""
    inputs, state = wkv7_inputs(2, 1, 3, 16, 16, dtype)
    state = state.float()
    if not contiguous:
        state = state.transpose(-1, -2).contiguous().transpose(-1, -2)
    ref_o, ref_h = wkv7_one_token(*inputs, state)
    o, h = wkv7_one_token(*inputs, state, in_place=True)
    assert h is state and o.dtype == dtype
    assert torch.equal(o, ref_o)
    assert torch.equal(state, ref_h.float())


@pytest.mark.parametrize("in_place", [True, False], ids=["in_place", "new_state"])
def test_time_mix_one_token_updates_the_state_only_in_place(in_place):
    B, H, N = 2, 2, 64
    C = H * N
    g = torch.Generator().manual_seed(1)
    rows = [torch.randn(B, 1, C, generator=g, dtype=torch.float64) for _ in range(8)]
    params = [torch.randn(C, generator=g, dtype=torch.float64) * 0.1 + 1 for _ in range(2)]
    params += [torch.randn(H, N, generator=g, dtype=torch.float64) * 0.1]
    params += [torch.randn(C, generator=g, dtype=torch.float64) for _ in range(2)]
    state = torch.randn(B, H, N, N, generator=g, dtype=torch.float64)
    before = state.clone()
    y, _, new_state = time_mix_reference(*rows, *params, 64e-5, None, state, in_place)
    # the same token as a sequence of two whose first token is padding (it leaves the state as it was)
    padded = [None if t is None else torch.cat([torch.zeros_like(t), t], dim=1) for t in rows]
    mask = torch.tensor([[0, 1]] * B)
    ref_y, _, ref_state = time_mix_reference(*padded, *params, 64e-5, mask, before.clone())
    torch.testing.assert_close(y, ref_y[:, 1:], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(new_state, ref_state, rtol=1e-12, atol=1e-12)
    assert (new_state is state) == in_place
    assert torch.equal(state, ref_state if in_place else before)


def test_float64_decoding_steps_match_exact_math():
    """Token by token after a prompt (which makes the cache's states float64), against the official one-token math
    in float64: the one-token path holds to rounding, not just to float32 tolerances."""
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
            out = model(torch.tensor([[token]]), cache=out.cache, use_cache=True)
            logits.append(out.logits[0])
    torch.testing.assert_close(torch.cat(logits), exact_logits, rtol=1e-10, atol=1e-10)
    for wkv, exact in zip(out.cache.wkv, exact_states):
        torch.testing.assert_close(wkv[0], exact.transpose(-1, -2), rtol=1e-10, atol=1e-10)


def test_linear_runs_a_hooked_layer_itself():
    """A layer that accelerate hooked (to move or offload its weights) runs through its hook, not kernels.linear."""
    from accelerate.hooks import ModelHook, add_hook_to_module

    class Double(ModelHook):
        def post_forward(self, module, output):
            return output * 2

    modeling_rwkv7.load_kernels()
    layer = nn.Linear(8, 4)
    x = torch.randn(1, 1, 8)
    plain = modeling_rwkv7.linear(layer, x, "relu2", residual=x[..., :4])
    add_hook_to_module(layer, Double())
    hooked = modeling_rwkv7.linear(layer, x, "relu2", residual=x[..., :4])
    torch.testing.assert_close(plain, x[..., :4] + torch.relu(layer.weight @ x[0, 0] + layer.bias).square())
    torch.testing.assert_close(hooked, x[..., :4] + torch.relu(2 * (layer.weight @ x[0, 0] + layer.bias)).square())
