"""The fused kernels of a prefill (rwkv7_kernels/time_mix_sequence.py, rwkv7_kernels/norm_shift_mix_fused.py on sequences) against
their PyTorch references (rwkv7_kernels/ops_reference.py) run in float64, and the model's fused prefill against its
general path.

Without CUDA (CI) the kernels run on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1, set by
tests/conftest.py before the kernel modules are imported); on a CUDA machine the same file runs them on the GPU:
    python -m pytest tests/test_fused_prefill_kernels.py
"""

import importlib

import pytest
import torch

from conftest import KERNEL_TEST_DEVICE as DEVICE  # noqa: E402  (conftest set TRITON_INTERPRET for the CPU)

from rwkv7_kernels.norm_shift_mix_fused import norm_shift_mix_fused  # noqa: E402
from rwkv7_kernels.ops_reference import norm_shift_mix_reference, time_mix_reference  # noqa: E402
from rwkv7_kernels.time_mix_sequence import time_mix_sequence  # noqa: E402

DTYPES = [pytest.param(d, id=str(d).split(".")[1]) for d in (torch.float32, torch.bfloat16)]


def rel(x, ref):
    assert torch.isfinite(x).all()
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mixes", [6, 1])
def test_norm_shift_mix_sequence_matches_reference(dtype, mixes):
    B, T, C = (2, 5, 192) if DEVICE == "cpu" else (3, 77, 2560)  # C not a power of two
    g = torch.Generator().manual_seed(mixes)
    x = (torch.randn(B, T, C, generator=g) * 3 + 1).to(DEVICE, dtype)
    weight = (torch.randn(C, generator=g) * 0.1 + 1).to(DEVICE, dtype)
    bias = (torch.randn(C, generator=g) * 0.1).to(DEVICE, dtype)
    prev = torch.randn(B, C, generator=g).to(DEVICE, dtype)
    mix = torch.rand(mixes, C, generator=g).to(DEVICE, dtype)
    ref_mixed, ref_prev = norm_shift_mix_reference(x.double(), weight.double(), bias.double(), 1e-5, prev.double(),
                                                   mix.double())
    ref_mixed = torch.stack(ref_mixed)
    before = prev.clone()
    mixed, new_prev = norm_shift_mix_fused(x, weight, bias, 1e-5, prev, mix)
    assert mixed.shape == (mixes, B, T, C) and mixed.dtype == dtype and new_prev is not prev
    assert torch.equal(prev, before)  # not in place: the caller's state is untouched
    bound = 1e-6 if dtype == torch.float32 else 5e-3
    assert rel(mixed, ref_mixed) <= bound and rel(new_prev, ref_prev) <= bound, (rel(mixed, ref_mixed),
                                                                                  rel(new_prev, ref_prev))
    with pytest.raises(ValueError, match="one token per row"):
        norm_shift_mix_fused(x, weight, bias, 1e-5, prev, mix, torch.ones(B, T, device=DEVICE))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("first_layer", [True, False], ids=["layer0", "layer1+"])
@pytest.mark.parametrize("with_state", [False, True], ids=["no_state", "state"])
def test_time_mix_sequence_matches_reference(dtype, first_layer, with_state):
    B, T, H = (2, 37, 2) if DEVICE == "cpu" else (2, 300, 4)  # T not a multiple of the chunk length
    C, N = H * 64, 64
    g = torch.Generator().manual_seed(int(first_layer) + 2 * int(with_state))

    def randn(*shape, std=1.0, mean=0.0):
        return torch.randn(*shape, generator=g) * std + mean

    r, w_raw, k, v, a_raw, v_gate_raw, v_first, gate = (randn(B, T, C) for _ in range(8))
    if first_layer:
        v_gate_raw = v_first = None
    params = [randn(C, std=0.1, mean=0.85), randn(C, std=0.1, mean=1.0), randn(H, N, std=0.1),
              randn(C, std=0.1, mean=1.0), randn(C, std=0.1)]  # k_k, k_a, r_k, gn_weight, gn_bias
    state = randn(B, H, N, N, std=0.5) if with_state else None

    def to(t, dt):
        return None if t is None else t.to(DEVICE, dt)

    rows = [r, w_raw, k, v, a_raw, v_gate_raw, v_first, gate]

    def reference(dt, state_dtype):
        return time_mix_reference(*[to(t, dt) for t in rows + params[:3]], *[to(t, dt) for t in params[3:]], 64e-5,
                                  None, to(state, state_dtype))

    ref = reference(torch.float64, torch.float64)
    y, v_first_out, final_state = time_mix_sequence(*[to(t, dtype) for t in rows + params[:3]],
                                                    *[to(t, dtype) for t in params[3:]], 64e-5, to(state, torch.float32))
    assert y.shape == (B, T, C) and y.dtype == dtype
    if dtype == torch.float32:
        bounds = [1e-4] * 3
    else:  # bf16: every input and the stored k', v', a, b, o are rounded to bf16, so the bound is the error of the
        # PyTorch path in bf16 (about 7e-3 on these inputs), with a margin; a wiring error is of order 1
        bounds = [min(1.5 * rel(mine, theirs), 1e-2) for mine, theirs in zip(reference(dtype, torch.float32), ref)
                  if theirs is not None]
    assert rel(y, ref[0]) <= bounds[0], (rel(y, ref[0]), bounds[0])
    assert rel(v_first_out, ref[1]) <= bounds[1]
    if with_state:
        assert final_state.dtype == torch.float32
        assert rel(final_state, ref[2]) <= bounds[2], (rel(final_state, ref[2]), bounds[2])
    else:
        assert final_state is None


@torch.no_grad()
def test_model_fused_prefill_equals_general_path(monkeypatch):
    """The model's prefill through the fused kernels (on the CPU under the interpreter in CI) gives the logits and
    states of its general path, also when generate's all-ones attention mask comes with the prompt; a prompt with
    padding takes the general path."""
    import copy

    import modeling_rwkv7
    from configuration_rwkv7 import RWKV7Config
    from modeling_rwkv7 import RWKV7ForCausalLM
    from official import random_official_weights, to_fla

    config, weights = to_fla(random_official_weights(hidden=128, layers=3, vocab=300, seed=6))
    model = RWKV7ForCausalLM(RWKV7Config(**config)).eval().to(DEVICE)
    model.load_state_dict(weights)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 300, (2, 37), generator=g).to(DEVICE)
    cache = model(prompt[:, :5], use_cache=True).cache  # the prompt continues a conversation

    kernels = modeling_rwkv7.kernels
    sequence_module = importlib.import_module(kernels.__name__ + ".time_mix_sequence")
    calls = []
    fused_time_mix = sequence_module.time_mix_sequence
    monkeypatch.setattr(sequence_module, "time_mix_sequence", lambda *a: calls.append(1) or fused_time_mix(*a))

    def run(fused, mask):
        monkeypatch.setattr(kernels, "fused_inference", lambda x: fused and not torch.is_grad_enabled())
        out = model(prompt[:, 5:], attention_mask=mask, cache=copy.deepcopy(cache), use_cache=True)
        return out.logits, out.cache

    ones = torch.ones(2, 37, dtype=torch.long, device=DEVICE)
    general, general_cache = run(False, ones)
    assert not calls
    fused, fused_cache = run(True, ones)
    assert len(calls) == 3  # every layer's time mix took the fused sequence path
    assert rel(fused, general) <= 1e-5, rel(fused, general)
    for mine, theirs in zip(fused_cache.wkv + fused_cache.attn_shift + fused_cache.ffn_shift,
                            general_cache.wkv + general_cache.attn_shift + general_cache.ffn_shift):
        assert rel(mine, theirs) <= 1e-5

    padded = ones.clone()
    padded[1, 5:8] = 0  # the new tokens of row 1 are left-padded
    run(True, padded)
    assert len(calls) == 3  # padding inside the prompt: the general (masked) path
