"""The fused kernels of a decoding step (rwkv7_kernels/time_mix_decode.py, norm_mix_linear_decode.py,
norm_shift_mix_fused.py, linear_decode.py) against their PyTorch references (rwkv7_kernels/ops_reference.py) run in
float64, and the model's fused decoding step against its general path.

Without CUDA (CI) the kernel runs on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1, set by tests/conftest.py before
the kernel module is imported); on a CUDA machine the same file runs it on the GPU:
    python -m pytest tests/test_fused_decode_kernels.py
"""


import pytest
import torch

from conftest import KERNEL_TEST_DEVICE as DEVICE  # noqa: E402  (conftest set TRITON_INTERPRET for the CPU)

from rwkv7_kernels.norm_shift_mix_fused import norm_shift_mix_fused  # noqa: E402
from rwkv7_kernels.ops_reference import (  # noqa: E402
    linear_reference,
    norm_mix_linear_reference,
    norm_shift_mix_reference,
    time_mix_reference,
)
from rwkv7_kernels.time_mix_decode import lora_up, time_mix_decode_  # noqa: E402

BOUNDS = {torch.float32: 1e-5, torch.bfloat16: 5e-3, torch.float16: 2e-3}


RANKS = {"w": 12, "a": 8, "v": 6, "g": 10}  # not powers of two: the kernel masks its LoRA tiles


def make_inputs(B, H, dtype, first_layer, seed):
    g = torch.Generator().manual_seed(seed)
    C, N = H * 64, 64

    def randn(*shape, std=1.0, mean=0.0):
        return torch.randn(*shape, generator=g) * std + mean

    rows = [randn(B, 1, C) for _ in range(4)]  # r, k, v, v_first
    loras = {name: [randn(B, 1, D), randn(C, D, std=D**-0.5), randn(C) if name != "g" else None]
             for name, D in RANKS.items()}  # hidden activations, up weight, bias
    if first_layer:
        rows[3] = loras["v"] = None
    params = [randn(C, std=0.1, mean=0.85), randn(C, std=0.1, mean=1.0), randn(H, N, std=0.1),
              randn(C, std=0.1, mean=1.0), randn(C, std=0.1)]  # k_k, k_a, r_k, gn_weight, gn_bias
    state = randn(B, H, N, N, std=0.5)
    mask = torch.ones(B, 1, dtype=torch.long)
    mask[0] = 0  # row 0 is padding at this step: its state must not move
    dev = lambda t, dt: None if t is None else t.to(DEVICE, dt)  # noqa: E731
    loras = {n: None if lora is None else [dev(t, dtype) for t in lora] for n, lora in loras.items()}
    return [dev(t, dtype) for t in rows], loras, [dev(t, dtype) for t in params], state.to(DEVICE), mask.to(DEVICE)


def rel(x, ref):
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("first_layer", [True, False], ids=["layer0", "layer1+"])
@pytest.mark.parametrize("masked", [False, True], ids=["no_mask", "mask"])
@pytest.mark.parametrize("lora_inputs", ["hidden", "outputs", "lora_up"])
def test_fused_decode_step_matches_reference(dtype, first_layer, masked, lora_inputs):
    B, H = (3, 2) if DEVICE == "cpu" else (33, 16)
    seed = first_layer + 2 * masked
    (r, k, v, v_first), loras, params, state, mask = make_inputs(B, H, dtype, first_layer, seed)
    mask = mask if masked else None
    double = lambda t: None if t is None else t.double()  # noqa: E731

    def lora_out(name):  # the LoRA's output, in float64
        if loras[name] is None:
            return None
        h, up, bias = map(double, loras[name])
        return linear_reference(h, up, bias)

    ref_state = state.double().clone()
    ref_y, _, _ = time_mix_reference(double(r), lora_out("w"), double(k), double(v), lora_out("a"), lora_out("v"),
                                     double(v_first), lora_out("g"), *map(double, params), 64e-5, mask, ref_state,
                                     in_place=True)
    before = state.clone()
    if lora_inputs == "outputs":  # the LoRAs applied outside the kernel
        loras = {n: None if lora is None else (lora_out(n).to(dtype), None, None) for n, lora in loras.items()}
    if lora_inputs == "lora_up":  # applied outside by the one-launch kernel, as for many rows
        loras = dict(zip(loras, lora_up(list(loras.values()))))
    y, returned_v_first, returned = time_mix_decode_(r, k, v, loras["w"], loras["a"], loras["v"], loras["g"], v_first,
                                                     *params, 64e-5, mask, state)
    assert returned is state and y.dtype == dtype and y.shape == (B, 1, H * 64)
    if first_layer:
        assert torch.equal(returned_v_first, v)
    else:
        assert returned_v_first is v_first
    errors = {"y": rel(y, ref_y), "state": rel(state, ref_state)}
    print(f"\n{DEVICE} {dtype} first_layer={first_layer} masked={masked}: {errors}")
    assert errors["y"] <= BOUNDS[dtype] and errors["state"] <= BOUNDS[dtype], errors
    if masked:
        torch.testing.assert_close(state[0], before[0], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_lora_up_matches_reference(dtype):
    """All LoRA up-projections in one launch: each output is its own LoRA's, over more rows than one row block."""
    B, H = (19, 2) if DEVICE == "cpu" else (100, 32)
    _, loras, _, _, _ = make_inputs(B, H, dtype, first_layer=True, seed=7)
    outputs = lora_up(list(loras.values()))
    for name, lora, out in zip(loras, loras.values(), outputs):
        if lora is None:
            assert out is None
            continue
        y, none_up, none_bias = out
        ref = linear_reference(*(None if t is None else t.double() for t in lora))
        assert none_up is None and none_bias is None and y.dtype == dtype and y.shape == (B, 1, H * 64)
        assert rel(y, ref) <= BOUNDS[dtype], (name, rel(y, ref))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("masked", [False, True], ids=["token", "padding"])
def test_norm_mix_linear_row_matches_reference(dtype, masked):
    from rwkv7_kernels.norm_mix_linear_decode import _COUNTERS, norm_mix_linear_row

    C = 96 if DEVICE == "cpu" else 2560  # not a power of two
    sizes_acts = [(C, None), (C, None), (13, "tanh"), (8, None), (7, "sigmoid"), (32, "relu2")]  # ragged blocks
    g = torch.Generator().manual_seed(int(masked))
    dev = lambda t: t.to(DEVICE, dtype)  # noqa: E731
    x = dev(torch.randn(1, 1, C, generator=g) * 3 + 1)
    weight, bias = dev(torch.randn(C, generator=g) * 0.1 + 1), dev(torch.randn(C, generator=g) * 0.1)
    prev = dev(torch.randn(1, C, generator=g))
    projections = [(dev(torch.rand(C, generator=g)), dev(torch.randn(n, C, generator=g) / C**0.5), act)
                   for n, act in sizes_acts]
    mask = torch.tensor([[0 if masked else 1]], device=DEVICE)
    for step in range(2):  # the second call checks that the first left its counter at zero
        ref_prev = prev.double().clone()
        double_projections = [(m.double(), w.double(), act) for m, w, act in projections]
        ref, _ = norm_mix_linear_reference(x.double(), weight.double(), bias.double(), 1e-5, ref_prev,
                                           double_projections, mask, in_place=True)
        outputs = norm_mix_linear_row(x, weight, bias, 1e-5, prev, projections, mask)
        assert [o.shape for o in outputs] == [(1, 1, n) for n, _ in sizes_acts] and outputs[0].dtype == dtype
        bound = 1e-5 if dtype == torch.float32 else 5e-3
        for out, expected in zip(outputs, ref):
            assert rel(out, expected) <= bound, (step, rel(out, expected))
        assert rel(prev, ref_prev) <= bound
        assert all(int(c) == 0 for c in _COUNTERS.values())
        x = x * 0.5 + 0.1
    if masked:
        assert torch.equal(prev.double(), ref_prev)  # a padded token keeps the previous x


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
    ref_mixed = torch.stack(ref_mixed)
    mixed, returned = norm_shift_mix_fused(x, weight, bias, 1e-5, prev, mix, mask, in_place=True)
    assert returned is prev and mixed.shape == (mixes, B, 1, C) and mixed.dtype == dtype
    bound = 1e-6 if dtype == torch.float32 else 5e-3
    assert rel(mixed, ref_mixed) <= bound and rel(prev, ref_prev) <= bound, (rel(mixed, ref_mixed), rel(prev, ref_prev))
    assert torch.equal(prev[0].double(), ref_prev[0])  # the padded row keeps its previous x


@pytest.mark.parametrize("activation", [None, "tanh", "sigmoid", "relu2"])
@pytest.mark.parametrize("shape", [(96, 200), (1030, 64)], ids=["N96_K200", "N1030_K64"])  # N, K: ragged blocks
@pytest.mark.parametrize("extras", [False, True], ids=["plain", "bias_residual"])
def test_linear_row_matches_reference(activation, shape, extras):
    from rwkv7_kernels.linear_decode import linear_row
    from rwkv7_kernels.ops_reference import linear_reference

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


@pytest.mark.parametrize("batch", [1, 3], ids=["one_row", "three_rows"])
@torch.no_grad()
def test_model_fused_decoding_step_equals_general_path(batch, monkeypatch):
    """The model's decoding step through the fused kernels (on the CPU under the interpreter in CI) gives the
    logits and states of its general path: projections, LoRA halves and mixes are wired to the right inputs."""
    import copy

    import modeling_rwkv7
    from configuration_rwkv7 import RWKV7Config
    from modeling_rwkv7 import RWKV7ForCausalLM
    from official import random_official_weights, to_fla

    config, weights = to_fla(random_official_weights(hidden=128, layers=3, vocab=300, seed=5))
    model = RWKV7ForCausalLM(RWKV7Config(**config)).eval().to(DEVICE)
    model.load_state_dict(weights)
    model._decode_graphs = False  # eager steps: the graph is tested on the GPU (test_gpu_model.py)
    g = torch.Generator().manual_seed(batch)
    prompt = torch.randint(0, 300, (batch, 7), generator=g).to(DEVICE)
    mask = torch.ones(batch, 8, dtype=torch.long, device=DEVICE)
    mask[-1, :3] = 0  # the last row is left-padded
    if batch > 1:
        mask[0, -1] = 0  # and row 0 gets a padding token while decoding
    fused_cache = model(prompt, attention_mask=mask[:, :7], use_cache=True).cache
    general_cache = copy.deepcopy(fused_cache)
    fused_kernels = modeling_rwkv7.kernels.fused_decoding
    token = torch.randint(0, 300, (batch, 1), generator=g).to(DEVICE)
    for _ in range(2):
        monkeypatch.setattr(modeling_rwkv7.kernels, "fused_decoding", lambda x, head_dim=None: head_dim in (None, 64))
        fused = model(token, attention_mask=mask, cache=fused_cache).logits
        monkeypatch.setattr(modeling_rwkv7.kernels, "fused_decoding", lambda x, head_dim=None: False)
        general = model(token, attention_mask=mask, cache=general_cache).logits
        assert rel(fused, general) <= 1e-5, rel(fused, general)
        token = general.argmax(-1)
    monkeypatch.setattr(modeling_rwkv7.kernels, "fused_decoding", fused_kernels)
    for mine, theirs in zip(fused_cache.wkv + fused_cache.attn_shift + fused_cache.ffn_shift,
                            general_cache.wkv + general_cache.attn_shift + general_cache.ffn_shift):
        assert rel(mine, theirs) <= 1e-5
