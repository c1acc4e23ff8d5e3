"""The fused kernels of whole sequences (rwkv7_kernels/time_mix_sequence.py, shift_mix_sequence.py and
norm_shift_mix_fused.py), forward and backward, against their PyTorch references (rwkv7_kernels/ops_reference.py)
run in float64, and the model's prefill through the kernels against its PyTorch path.

Without CUDA (CI) the kernels run on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1, set by
tests/conftest.py before the kernel modules are imported); on a CUDA machine the same file runs them on the GPU:
    python -m pytest -m "gpu or kernels"
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import KERNEL_TEST_DEVICE as DEVICE  # conftest set TRITON_INTERPRET for the CPU
from helpers import relative_rms_error as rel
from helpers import tiny_model

from modeling_rwkv7 import ForwardPath, choose_path
from rwkv7_kernels import TimeMixParams
from rwkv7_kernels.norm_shift_mix_fused import norm_shift_mix_fused
from rwkv7_kernels.ops_reference import norm_shift_mix_reference, shift_mix_reference, time_mix_reference
from rwkv7_kernels.shift_mix_sequence import norm_shift_mix_linear, shift_mix_sequence
from rwkv7_kernels.time_mix_sequence import LinearInput, time_mix_sequence

pytestmark = pytest.mark.kernels
DTYPES = [pytest.param(d, id=str(d).split(".")[1]) for d in (torch.float32, torch.bfloat16)]


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
    norm = (weight, bias, 1e-5)
    mixed, new_prev = norm_shift_mix_fused(x, prev, mix, norm)
    assert mixed.shape == (mixes, B, T, C) and mixed.dtype == dtype and new_prev is not prev
    assert torch.equal(prev, before)  # not in place: the caller's state is untouched
    bound = 1e-6 if dtype == torch.float32 else 5e-3
    assert rel(mixed, ref_mixed) <= bound and rel(new_prev, ref_prev) <= bound, (rel(mixed, ref_mixed),
                                                                                  rel(new_prev, ref_prev))
    with pytest.raises(ValueError, match="one token per row"):
        norm_shift_mix_fused(x, prev, mix, norm, torch.ones(B, T, device=DEVICE))


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

    def params_in(dt):
        return TimeMixParams(*(to(t, dt) for t in params), 64e-5)

    def reference(dt, state_dtype):
        return time_mix_reference(*[to(t, dt) for t in rows], params_in(dt), state=to(state, state_dtype))

    ref = reference(torch.float64, torch.float64)
    y, v_first_out, final_state = time_mix_sequence(*[to(t, dtype) for t in rows], params_in(dtype),
                                                    state=to(state, torch.float32))
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


# relative RMS error bounds of outputs and gradients against float64, per input dtype: float32 measures about 6e-7;
# bf16 about 9e-3 (every input, and k', v', a, b, o between the kernels, rounded to bf16) where the PyTorch path in
# bf16 measures about 1.1e-2
GRAD_BOUNDS = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
PACKED = [0, 13, 14, 30, 37]  # offsets of 4 sequences packed into one row of 37 tokens (one of a single token)


def leaves(tensors, dtype):
    """Copies of `tensors` (None stays None) in dtype, on the test device, requiring gradients."""
    return [None if t is None else t.to(DEVICE, dtype).requires_grad_() for t in tensors]


def gradients(outputs, inputs, seed):
    """The gradients of sum(output * random weights) over the outputs that are not None, float64 weights."""
    g = torch.Generator().manual_seed(seed)
    loss = sum((out.double() * torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.device)).sum()
               for out in outputs if out is not None)
    return torch.autograd.grad(loss, [t for t in inputs if t is not None])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("first_layer", [True, False], ids=["layer0", "layer1+"])
@pytest.mark.parametrize("mode", ["plain", "padding", "packed", "state"])
def test_time_mix_sequence_gradients_match_reference(dtype, first_layer, mode):
    """The time mix's backward (recomputing the elementwise values, then the after-kernel's, WKV-7's and the
    before-kernel's backward): the gradients of every input, parameter and the initial state against float64, with
    a padding mask, packed sequences or a state carried in and out."""
    B, T, H = (1 if mode == "packed" else 2, 37, 2) if DEVICE == "cpu" else (1 if mode == "packed" else 2, 300, 4)
    C, N = H * 64, 64
    g = torch.Generator().manual_seed(int(first_layer))
    inputs = [torch.randn(B, T, C, generator=g) for _ in range(8)]  # r, w_raw, k, v, a_raw, v_gate_raw, v_first, g
    if first_layer:
        inputs[5] = inputs[6] = None
    params = [torch.randn(C, generator=g) * 0.1 + 0.85, torch.randn(C, generator=g) * 0.1 + 1,
              torch.randn(H, N, generator=g) * 0.1, torch.randn(C, generator=g) * 0.1 + 1,
              torch.randn(C, generator=g) * 0.1]  # k_k, k_a, r_k, gn_weight, gn_bias
    state = torch.randn(B, H, N, N, generator=g) * 0.5 if mode == "state" else None
    mask = cu_seqlens = None
    if mode == "padding":
        mask = torch.ones(B, T, dtype=torch.long, device=DEVICE)
        mask[0, :5] = 0  # left padding in one row, right padding in the other
        mask[1, -3:] = 0
    if mode == "packed":
        offsets = PACKED if DEVICE == "cpu" else [0, 13, 14, 230, 300]
        cu_seqlens = torch.tensor(offsets, dtype=torch.int32, device=DEVICE)

    def run(fn, dt, state_dt):
        xs, ps, st = leaves(inputs, dt), leaves(params, dt), leaves([state], state_dt)[0]
        y, _, final = fn(*xs, TimeMixParams(*ps, 64e-5), state=st, attention_mask=mask, cu_seqlens=cu_seqlens)
        return y, final, gradients((y, final), xs + ps + [st], seed=1)

    def errors(y, grads):
        return [rel(y, ref_y)] + [rel(a, b) for a, b in zip(grads, ref_grads)]

    ref_y, _, ref_grads = run(time_mix_reference, torch.float64, torch.float64)
    y, final, grads = run(time_mix_sequence, dtype, torch.float32)
    assert y.dtype == dtype and (final is None) == (state is None)
    bounds = [GRAD_BOUNDS[dtype]] * (len(grads) + 1)
    if dtype == torch.bfloat16:  # some draws are ill-conditioned in bf16: no worse than the PyTorch path in bf16
        plain_y, _, plain_grads = run(time_mix_reference, dtype, torch.float32)
        bounds = [max(bound, 1.5 * e) for bound, e in zip(bounds, errors(plain_y, plain_grads))]
    assert all(e <= bound for e, bound in zip(errors(y, grads), bounds)), (errors(y, grads), bounds)
    for grad, ref in zip(grads, ref_grads):
        assert grad.shape == ref.shape


@pytest.mark.parametrize("autocast", [False, True], ids=["bf16", "autocast_bf16"])
@pytest.mark.parametrize("first_layer", [True, False], ids=["layer0", "layer1+"])
def test_time_mix_sequence_recomputing_the_lora_outputs_changes_nothing(autocast, first_layer):
    """w_raw, a_raw, v_gate_raw and g given with the up-projections that made them (LinearInput): the backward
    recomputes them instead of keeping them, and every output and gradient (the up-projections' x, weight and bias
    included) is bitwise the same as when they are kept; under autocast (float32 weights, bf16 products) too. The
    recomputed inputs are no longer kept."""
    B, T, H, rank = (2, 37, 2, 16) if DEVICE == "cpu" else (2, 300, 4, 64)
    C, N = H * 64, 64
    g = torch.Generator().manual_seed(5)
    dtype = torch.float32 if autocast else torch.bfloat16
    r, k, v, v_first = (torch.randn(B, T, C, generator=g) for _ in range(4))
    ups = [(torch.randn(B, T, rank, generator=g), torch.randn(C, rank, generator=g) / rank**0.5,
            torch.randn(C, generator=g) if bias else None) for bias in (True, True, True, False)]  # w, a, v gate, g
    if first_layer:
        ups[2], v_first = None, None
    params = [torch.randn(C, generator=g) * 0.1 + 0.85, torch.randn(C, generator=g) * 0.1 + 1,
              torch.randn(H, N, generator=g) * 0.1, torch.randn(C, generator=g) * 0.1 + 1,
              torch.randn(C, generator=g) * 0.1]

    def run(recompute):
        xs = leaves([r, k, v, v_first], dtype)
        up_leaves = [None if up is None else leaves(up, dtype) for up in ups]
        ps = leaves(params, dtype)
        kept = set()

        def pack(t):
            kept.add(t.untyped_storage().data_ptr())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=autocast):
            w_raw, a_raw, vg, gate = (None if up is None else F.linear(*up) for up in up_leaves)
            linears = [None if up is None or not recompute else LinearInput(*up) for up in up_leaves]
            y, _, _ = time_mix_sequence(xs[0], w_raw, xs[1], xs[2], a_raw, vg, xs[3], gate,
                                        TimeMixParams(*ps, 64e-5), recompute=linears)
        inputs = xs + [t for up in up_leaves if up is not None for t in up if t is not None] + ps
        recomputable = {t.untyped_storage().data_ptr() for t in (w_raw, a_raw, vg, gate) if t is not None}
        return y, gradients([y], inputs, seed=2), kept & recomputable

    y, grads, kept = run(recompute=False)
    y_recomputed, grads_recomputed, kept_recomputed = run(recompute=True)
    assert torch.equal(y, y_recomputed)
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_recomputed))
    assert len(kept) == (3 if first_layer else 4) and not kept_recomputed


def check_shift_mix(out, ref_out, grads, ref_grads, dtype, packed):
    """The outputs and the gradients of (x, prev, ...) within GRAD_BOUNDS of float64's, in the inputs' shapes and
    dtype; packed sequences each start from zeros, so prev gets no gradient from them."""
    errors = [rel(a, b) for a, b in zip(out, ref_out)]
    errors += [rel(a, b) for a, b in zip(grads, ref_grads) if b.abs().sum() > 0]
    assert max(errors) <= GRAD_BOUNDS[dtype], errors
    if packed:
        assert torch.equal(grads[1], torch.zeros_like(grads[1]))
    assert all(a.shape == b.shape and a.dtype == dtype for a, b in zip(grads, ref_grads))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mixes", [6, 1])
@pytest.mark.parametrize("packed", [False, True], ids=["rows", "packed"])
def test_shift_mix_sequence_gradients_match_reference(dtype, mixes, packed):
    """The token shift and lerps, forward and backward (x, prev and each mix), against float64."""
    B, T, C = (1 if packed else 2, 37, 192) if DEVICE == "cpu" else (1 if packed else 3, 300, 2560)
    g = torch.Generator().manual_seed(mixes)
    x, prev = torch.randn(B, T, C, generator=g), torch.randn(B, C, generator=g)
    mix = [torch.rand(1, 1, C, generator=g) for _ in range(mixes)]  # the model's [1, 1, C] parameters
    cu_seqlens = torch.tensor(PACKED, dtype=torch.int32, device=DEVICE) if packed else None

    def run(fn, dt):
        xs = leaves([x, prev, *mix], dt)
        mixed, last = fn(xs[0], xs[1], xs[2:], cu_seqlens=cu_seqlens)
        return [*mixed, last], gradients([*mixed, last], xs, seed=2)

    ref_out, ref_grads = run(shift_mix_reference, torch.float64)
    out, grads = run(shift_mix_sequence, dtype)
    check_shift_mix(out, ref_out, grads, ref_grads, dtype, packed)
    with pytest.raises(ValueError, match="without padding"):
        shift_mix_sequence(x.to(DEVICE), prev.to(DEVICE), mix, attention_mask=torch.ones(B, T))


def norm_shift_mix_linear_reference(x, weight, bias, eps, prev, mixes, weights, cu_seqlens=None):
    """norm_shift_mix_linear's math in PyTorch: LayerNorm, the lerps, then each mix's linear layers."""
    mixed, last = shift_mix_reference(F.layer_norm(x, (x.shape[-1],), weight, bias, eps), prev, mixes,
                                      cu_seqlens=cu_seqlens)
    return [m @ w.T for m, read in zip(mixed, weights) for w in read], last


def layer_norm_parameters(C, g, bias=True):
    """A LayerNorm's weight and bias away from their initial ones and zeros, so that their gradients matter."""
    return 1 + 0.2 * torch.randn(C, generator=g), (0.2 * torch.randn(C, generator=g) if bias else None)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("packed", [False, True], ids=["rows", "packed"])
@pytest.mark.parametrize("norm_bias", [True, False], ids=["bias", "no_bias"])
def test_norm_shift_mix_linear_gradients_match_reference(dtype, packed, norm_bias):
    """LayerNorm, the token shift and lerps with the linear layers reading them, as the time mix reads them (one mix
    read twice, as v is by v_proj and v_lora's down-projection), forward and backward against float64: x, prev, the
    LayerNorm's weight and bias, every mix and every weight, with the normalised x and the lerps recomputed in the
    backward; the new prev (the last token's normalised x) gets a gradient too."""
    B, T, C = (1 if packed else 2, 37, 64) if DEVICE == "cpu" else (1 if packed else 3, 300, 1024)
    g = torch.Generator().manual_seed(7)
    x, prev = 2 + 3 * torch.randn(B, T, C, generator=g), torch.randn(B, C, generator=g)
    norm = layer_norm_parameters(C, g, norm_bias)
    mix = [torch.rand(1, 1, C, generator=g) for _ in range(6)]
    sizes = [[C], [16], [C], [C, 8], [16], [24]]  # r; w's LoRA; k; v and v's LoRA; a's LoRA; g's LoRA
    weights = [[torch.randn(n, C, generator=g) / C**0.5 for n in read] for read in sizes]
    cu_seqlens = torch.tensor(PACKED, dtype=torch.int32, device=DEVICE) if packed else None

    def run(fn, dt):
        xs = leaves([x, prev, *norm, *mix], dt)
        ws = [leaves(read, dt) for read in weights]
        outs, last = fn(xs[0], xs[2], xs[3], 1e-5, xs[1], xs[4:], ws, cu_seqlens=cu_seqlens)
        leaves_ = xs + [w for read in ws for w in read]
        return [*outs, last], gradients([*outs, last], leaves_, seed=3)

    ref_out, ref_grads = run(norm_shift_mix_linear_reference, torch.float64)
    out, grads = run(norm_shift_mix_linear, dtype)
    assert [o.shape for o in out] == [o.shape for o in ref_out]
    assert len(grads) == len(ref_grads) == 2 + norm_bias + 1 + 6 + 7
    check_shift_mix(out, ref_out, grads, ref_grads, dtype, packed)


@pytest.mark.parametrize("read", ["first_output", "new_prev"])
def test_norm_shift_mix_linear_outputs_nothing_reads(read):
    """Outputs nothing reads get no gradient from autograd (None, not zeros): with only the first projection read, or
    only the new prev (whose gradient the kernels then take alone), every gradient is float64's, zeros for what
    nothing reads. Without the LayerNorm's weight: a clear error."""
    B, T, C = (2, 37, 64) if DEVICE == "cpu" else (2, 300, 1024)
    g = torch.Generator().manual_seed(11)
    x, prev = 2 + 3 * torch.randn(B, T, C, generator=g), torch.randn(B, C, generator=g)
    norm = layer_norm_parameters(C, g)
    mix = [torch.rand(1, 1, C, generator=g) for _ in range(2)]
    weights = [[torch.randn(C, C, generator=g) / C**0.5], [torch.randn(8, C, generator=g) / C**0.5]]

    def run(fn, dt):
        xs = leaves([x, prev, *norm, *mix], dt)
        ws = [leaves(read, dt) for read in weights]
        outs, last = fn(xs[0], xs[2], xs[3], 1e-5, xs[1], xs[4:], ws)
        out = outs[0] if read == "first_output" else last
        loss = (out.double() * torch.randn(out.shape, generator=torch.Generator().manual_seed(5),
                                           dtype=torch.float64).to(out.device)).sum()
        return torch.autograd.grad(loss, xs + [w for r in ws for w in r], allow_unused=True, materialize_grads=True)

    ref_grads, grads = run(norm_shift_mix_linear_reference, torch.float64), run(norm_shift_mix_linear, torch.float32)
    for grad, ref in zip(grads, ref_grads):
        if bool((ref == 0).all()):
            assert bool((grad == 0).all())
        else:
            assert rel(grad, ref) <= GRAD_BOUNDS[torch.float32], rel(grad, ref)
    with pytest.raises(ValueError, match="LayerNorm's weight"):
        norm_shift_mix_linear(x.to(DEVICE), None, None, 1e-5, prev.to(DEVICE), mix, weights)


def test_norm_shift_mix_linear_under_autocast_computes_as_nn_modules():
    """Under autocast (float32 weights and input, bf16 products, as transformers' Trainer with bf16=True runs), the
    outputs are bf16 as an nn.Linear's, and the float32 gradients those of nn.LayerNorm, the lerps and nn.Linear
    under autocast."""
    B, T, C = 2, 20, 64
    g = torch.Generator().manual_seed(8)
    x, prev = torch.randn(B, T, C, generator=g), torch.randn(B, C, generator=g)
    norm = layer_norm_parameters(C, g)
    mix = [torch.rand(1, 1, C, generator=g) for _ in range(2)]
    weights = [[torch.randn(C, C, generator=g) / C**0.5], [torch.randn(32, C, generator=g) / C**0.5]]

    def run(fn):
        xs = leaves([x, prev, *norm, *mix], torch.float32)
        ws = [leaves(read, torch.float32) for read in weights]
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            outs, _ = fn(xs[0], xs[2], xs[3], 1e-5, xs[1], xs[4:], ws)
        assert all(o.dtype == torch.bfloat16 for o in outs)
        return gradients(outs, xs + [w for read in ws for w in read], seed=4)

    ref_grads, grads = run(norm_shift_mix_linear_reference), run(norm_shift_mix_linear)
    for grad, ref in zip(grads, ref_grads):
        assert grad.dtype == torch.float32
        assert rel(grad, ref) <= GRAD_BOUNDS[torch.bfloat16], rel(grad, ref)


@torch.no_grad()
def test_model_prefill_through_kernels_equals_pytorch():
    """The model's prefill through the kernels (implementation "triton"; on the CPU under the interpreter in CI)
    gives the logits and states of its PyTorch path, also when generate's all-ones attention mask comes with the
    prompt; a prompt with padding runs the PyTorch ops with the chunked WKV-7 kernel."""
    model = tiny_model(hidden=128, layers=3, vocab=300, seed=6).to(DEVICE)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 300, (2, 37), generator=g).to(DEVICE)
    cache = model(prompt[:, :5], use_cache=True).cache  # the prompt continues a conversation

    def run(implementation, mask):
        model.set_implementation(implementation)
        out = model(prompt[:, 5:], attention_mask=mask, cache=copy.deepcopy(cache), use_cache=True)
        return out.logits, out.cache

    ones = torch.ones(2, 37, dtype=torch.long, device=DEVICE)
    model.set_implementation("triton")
    assert choose_path(model, prompt[:, 5:], cache, None) is ForwardPath.SEQUENCE_TRITON
    pytorch, pytorch_cache = run("pytorch", ones)
    fused, fused_cache = run("triton", ones)
    assert rel(fused, pytorch) <= 1e-5, rel(fused, pytorch)
    for mine, theirs in zip(fused_cache.states, pytorch_cache.states):
        for a, b in zip(mine, theirs):
            assert rel(a, b) <= 1e-5

    padded = ones.clone()
    padded[1, 5:8] = 0  # the new tokens of row 1 are left-padded
    assert choose_path(model, prompt[:, 5:], cache, padded[:, 5:]) is ForwardPath.SEQUENCE_TRITON_MODULES
    chunked, _ = run("triton", padded)
    reference, _ = run("pytorch", padded)
    assert rel(chunked, reference) <= 1e-5
