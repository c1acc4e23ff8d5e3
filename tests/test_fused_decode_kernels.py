"""The fused kernels of a decoding step (rwkv7_kernels/time_mix_decode.py, norm_mix_linear_decode.py,
norm_shift_mix_fused.py, linear_decode.py) against their PyTorch references (rwkv7_kernels/ops_reference.py) run in
float64, and the model's fused decoding step against its general path.

Without CUDA (CI) the kernels run on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1, set by
tests/conftest.py before the kernel modules are imported); on a CUDA machine the same file runs them on the GPU:
    python -m pytest -m "gpu or kernels"
"""

import copy

import pytest
import torch
from conftest import KERNEL_TEST_DEVICE as DEVICE  # conftest set TRITON_INTERPRET for the CPU
from helpers import relative_rms_error as rel
from helpers import tiny_model

from modeling_rwkv7 import ForwardPath, choose_path
from rwkv7_kernels import TimeMixParams
from rwkv7_kernels.linear_decode import linear_row
from rwkv7_kernels.norm_mix_linear_decode import _COUNTERS, norm_mix_linear_row
from rwkv7_kernels.norm_shift_mix_fused import norm_shift_mix_fused
from rwkv7_kernels.ops_reference import (
    linear_reference,
    norm_mix_linear_reference,
    norm_shift_mix_reference,
    time_mix_reference,
)
from rwkv7_kernels.time_mix_decode import lora_up, time_mix_decode_

pytestmark = pytest.mark.kernels

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
    params = TimeMixParams(*(dev(t, dtype) for t in params), 64e-5)
    return [dev(t, dtype) for t in rows], loras, params, state.to(DEVICE), mask.to(DEVICE)


def in_float64(params):
    return TimeMixParams(*(t.double() for t in params[:5]), params.gn_eps)


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
                                     double(v_first), lora_out("g"), in_float64(params), state=ref_state,
                                     attention_mask=mask, in_place=True)
    before = state.clone()
    if lora_inputs == "outputs":  # the LoRAs applied outside the kernel
        loras = {n: None if lora is None else (lora_out(n).to(dtype), None, None) for n, lora in loras.items()}
    if lora_inputs == "lora_up":  # applied outside by the one-launch kernel, as for many rows
        loras = dict(zip(loras, lora_up(list(loras.values()))))
    y, returned_v_first, returned = time_mix_decode_(r, k, v, (loras["w"], loras["a"], loras["v"], loras["g"]),
                                                     v_first, params, state, mask)
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
    mixed, returned = norm_shift_mix_fused(x, prev, mix, (weight, bias, 1e-5), mask, in_place=True)
    assert returned is prev and mixed.shape == (mixes, B, 1, C) and mixed.dtype == dtype
    bound = 1e-6 if dtype == torch.float32 else 5e-3
    assert rel(mixed, ref_mixed) <= bound and rel(prev, ref_prev) <= bound, (rel(mixed, ref_mixed), rel(prev, ref_prev))
    assert torch.equal(prev[0].double(), ref_prev[0])  # the padded row keeps its previous x


@pytest.mark.parametrize("activation", [None, "tanh", "sigmoid", "relu2"])
@pytest.mark.parametrize("shape", [(96, 200), (1030, 64)], ids=["N96_K200", "N1030_K64"])  # N, K: ragged blocks
@pytest.mark.parametrize("extras", [False, True], ids=["plain", "bias_residual"])
def test_linear_row_matches_reference(activation, shape, extras):
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


@pytest.mark.slow
@pytest.mark.parametrize("batch", [1, 3], ids=["one_row", "three_rows"])
@torch.no_grad()
def test_model_fused_decoding_step_equals_pytorch(batch):
    """The model's decoding step through the fused kernels (implementation "triton"; on the CPU under the interpreter
    in CI) gives the logits and states of the PyTorch path: projections, LoRA halves and mixes are wired to the right
    inputs."""
    model = tiny_model(hidden=128, layers=3, vocab=300, seed=5).to(DEVICE)
    g = torch.Generator().manual_seed(batch)
    prompt = torch.randint(0, 300, (batch, 7), generator=g).to(DEVICE)
    mask = torch.ones(batch, 8, dtype=torch.long, device=DEVICE)
    mask[-1, :3] = 0  # the last row is left-padded
    if batch > 1:
        mask[0, -1] = 0  # and row 0 gets a padding token while decoding
    fused_cache = model(prompt, attention_mask=mask[:, :7], use_cache=True).cache
    pytorch_cache = copy.deepcopy(fused_cache)
    token = torch.randint(0, 300, (batch, 1), generator=g).to(DEVICE)
    for _ in range(2):
        model.set_implementation("triton")  # eager steps: the graph is tested on the GPU (test_gpu_model.py)
        assert choose_path(model, token, fused_cache, mask) is ForwardPath.DECODE_TRITON
        fused = model(token, attention_mask=mask, cache=fused_cache).logits
        model.set_implementation("pytorch")
        assert choose_path(model, token, pytorch_cache, mask) is ForwardPath.DECODE_PYTORCH
        pytorch = model(token, attention_mask=mask, cache=pytorch_cache).logits
        assert rel(fused, pytorch) <= 1e-5, rel(fused, pytorch)
        token = pytorch.argmax(-1)
    for mine, theirs in zip(fused_cache.states, pytorch_cache.states):
        for a, b in zip(mine, theirs):
            assert rel(a, b) <= 1e-5


@torch.no_grad()
def test_decoding_kernels_never_bypass_a_wrapped_or_hooked_projection():
    """The fused decoding kernels read weights directly: with a projection that is not a plain nn.Linear (PEFT,
    quantised) or that accelerate hooks (to move or offload its weight), the step runs the PyTorch path, through
    the module."""
    from accelerate.hooks import ModelHook, add_hook_to_module

    class Double(ModelHook):
        def post_forward(self, module, output):
            return output * 2

    model = tiny_model(hidden=128, layers=2, vocab=300, seed=8).to(DEVICE)
    model.set_implementation("triton")
    cache = model(torch.tensor([[1, 2, 3]], device=DEVICE), use_cache=True).cache
    token = torch.tensor([[4]], device=DEVICE)
    assert choose_path(model, token, cache, None) is ForwardPath.DECODE_TRITON
    add_hook_to_module(model.model.layers[1].ffn.value, Double())
    assert choose_path(model, token, cache, None) is ForwardPath.DECODE_PYTORCH
    hooked = model(token, cache=copy.deepcopy(cache)).logits
    model.set_implementation("pytorch")
    torch.testing.assert_close(hooked, model(token, cache=copy.deepcopy(cache)).logits, rtol=1e-5, atol=1e-5)
    model.model.layers[1].ffn.value = torch.nn.Linear(4 * 128, 128, bias=False, device=DEVICE)  # a plain one again
    model.set_implementation("triton")
    assert choose_path(model, token, cache, None) is ForwardPath.DECODE_TRITON

    class Wrapper(torch.nn.Module):  # as PEFT wraps a layer
        def __init__(self, base_layer):
            super().__init__()
            self.base_layer = base_layer

        def forward(self, x):
            return self.base_layer(x)

    model.model.layers[0].attn.r_proj = Wrapper(model.model.layers[0].attn.r_proj)
    assert choose_path(model, token, cache, None) is ForwardPath.DECODE_PYTORCH
    model.lm_head = Wrapper(model.lm_head)
    model.model.layers[0].attn.r_proj = model.model.layers[0].attn.r_proj.base_layer
    assert choose_path(model, token, cache, None) is ForwardPath.DECODE_PYTORCH  # the head too
