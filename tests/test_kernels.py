"""The chunked Triton WKV-7 kernel (rwkv7_kernels/wkv7_chunk.py) against a float64 recurrence.

Errors are relative RMS, ||x - ref|| / ||ref||, against rwkv7_kernels/wkv7_reference.py run in float64 on the same
(rounded) inputs, for the output, the final state and every gradient (r, w, k, v, a, b, initial state).

Without CUDA (CI), the kernels run on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1, set by tests/conftest.py before
the kernel modules are imported) at small shapes. On a CUDA machine the same file runs them on the GPU, at larger
shapes too, T = 65536 included (no drift over long sequences):
    python -m pytest -m "gpu or kernels"              # on a CUDA machine; WKV7_TEST_DEVICE=cpu forces the CPU
On the GPU this takes several minutes, mostly the float64 reference's Python loop over time steps.
"""


import pytest
import torch
import torch.nn.functional as F
from conftest import KERNEL_TEST_DEVICE as DEVICE  # conftest set TRITON_INTERPRET for the CPU
from helpers import relative_rms_error as rel

from rwkv7_kernels import triton_supported
from rwkv7_kernels.common import DECAY_SCALE
from rwkv7_kernels.wkv7_chunk import chunk_wkv7
from rwkv7_kernels.wkv7_reference import wkv7_reference

pytestmark = pytest.mark.kernels

K = V = 64
# (outputs and states, gradients) bounds per input dtype
BOUNDS = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (5e-3, 1e-2), torch.float16: (2e-3, 4e-3)}
DTYPES = [pytest.param(d, id=str(d).split(".")[1]) for d in BOUNDS]


def test_kernels_need_triton_3_5():
    """The decoding kernels' griddepcontrol does not compile before triton 3.5: with an older one every op runs its
    PyTorch reference (kernels.HAS_TRITON is False; a warning says so on CUDA machines)."""
    assert not triton_supported("3.4.0") and not triton_supported("3.0.0") and not triton_supported("2.3.1")
    assert triton_supported("3.5.0") and triton_supported("3.10.1+git1a2b3c4") and triton_supported("4.0.0")


def make_inputs(B, T, H, dtype, seed=0, long_memory=False):
    """r, w, k, v, a, b drawn as RWKV-7 produces them; w float32 (log decay), the rest in `dtype`. long_memory: decays
    within about 1e-5 of 1, the channels that carry a state over the longest spans."""
    g = torch.Generator().manual_seed(seed)
    n = lambda: torch.randn(B, T, H, K, generator=g)  # noqa: E731
    r, k, v = n() * 0.5, n() * 0.5, torch.randn(B, T, H, V, generator=g)
    w = -DECAY_SCALE * torch.sigmoid(n() * 2 - (12 if long_memory else 1))
    kk = F.normalize(n(), dim=-1)
    a_gate = torch.sigmoid(n())
    a, b = -kk, kk * a_gate
    dev = lambda x, dt: x.to(DEVICE, dt)  # noqa: E731
    return dev(r, dtype), dev(w, torch.float32), dev(k, dtype), dev(v, dtype), dev(a, dtype), dev(b, dtype)


def check_chunk(B, T, H, dtype, with_h0, cu_seqlens=None, grads=True, seed=0, long_memory=False):
    xs = make_inputs(B, T, H, dtype, seed, long_memory)
    N = B if cu_seqlens is None else len(cu_seqlens) - 1
    h0 = torch.randn(N, H, K, V, generator=torch.Generator().manual_seed(seed + 1)).to(DEVICE) * 0.5 if with_h0 else None
    cu = None if cu_seqlens is None else torch.tensor(cu_seqlens, dtype=torch.int32, device=DEVICE)
    leaves = [x.clone().requires_grad_(grads) for x in xs] + ([h0.clone().requires_grad_(grads)] if with_h0 else [])
    ref_leaves = [x.detach().double().requires_grad_(grads) for x in leaves]
    h0_, rh0 = (leaves[6], ref_leaves[6]) if with_h0 else (None, None)
    o, ht = chunk_wkv7(*leaves[:6], initial_state=h0_, output_final_state=True, cu_seqlens=cu)
    ro, rht = wkv7_reference(*ref_leaves[:6], initial_state=rh0, output_final_state=True, cu_seqlens=cu)
    assert o.dtype == dtype and o.shape == (B, T, H, V) and ht.dtype == torch.float32 and ht.shape == (N, H, K, V)
    bound, gbound = BOUNDS[dtype]
    errors = {"o": rel(o, ro), "state": rel(ht, rht)}
    if grads:
        gen = torch.Generator().manual_seed(seed + 2)
        do = torch.randn(o.shape, generator=gen).to(DEVICE, dtype)
        dht = torch.randn(ht.shape, generator=gen).to(DEVICE)
        got = torch.autograd.grad((o.float() * do.float()).sum() + (ht * dht).sum(), leaves)
        want = torch.autograd.grad((ro * do.double()).sum() + (rht * dht.double()).sum(), ref_leaves)
        for name, g_, w_ in zip("r w k v a b h0".split(), got, want):
            assert g_.dtype == leaves["r w k v a b h0".split().index(name)].dtype
            errors["d" + name] = rel(g_, w_)
    print(f"\n{DEVICE} {str(dtype)[6:]} B={B} T={T} H={H} h0={with_h0} cu={cu_seqlens}: "
          + " ".join(f"{k_}={v_:.1e}" for k_, v_ in errors.items()))
    for name, err in errors.items():
        assert err <= (bound if name in ("o", "state") else gbound), (name, err)
    return o, ht


SHAPES = {"cpu": [(2, 37, 2), (1, 70, 1)], "cuda": [(2, 37, 2), (2, 1000, 4)]}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_h0", [False, True], ids=["no_h0", "h0"])
@pytest.mark.parametrize("shape", SHAPES[DEVICE], ids=lambda s: "B{}_T{}_H{}".format(*s))
def test_chunk(shape, with_h0, dtype):
    check_chunk(*shape, dtype, with_h0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_chunk_single_step(dtype):
    check_chunk(2, 1, 2, dtype, with_h0=True)


@pytest.mark.gpu  # T = 65536: far too slow under the interpreter
@pytest.mark.parametrize("dtype", [pytest.param(torch.bfloat16, id="bfloat16")])
@pytest.mark.parametrize("long_memory", [False, True], ids=["decay", "long_memory"])
def test_chunk_long_sequence(dtype, long_memory):
    # the float64 autograd reference would be slow: outputs and final state only
    check_chunk(1, 65536, 1, dtype, with_h0=True, grads=False, long_memory=long_memory)


@pytest.mark.parametrize("dtype", DTYPES)
def test_chunk_varlen_matches_separate_sequences(dtype):
    cu = [0, 5, 37, 38, 70] if DEVICE == "cpu" else [0, 5, 37, 38, 1100]
    o, ht = check_chunk(1, cu[-1], 2, dtype, with_h0=True, cu_seqlens=cu)
    xs = make_inputs(1, cu[-1], 2, dtype)
    h0 = torch.randn(len(cu) - 1, 2, K, V, generator=torch.Generator().manual_seed(1)).to(DEVICE) * 0.5
    for n, (s, e) in enumerate(zip(cu[:-1], cu[1:])):
        o_n, ht_n = chunk_wkv7(*(x[:, s:e] for x in xs), initial_state=h0[n : n + 1], output_final_state=True)
        torch.testing.assert_close(o[:, s:e], o_n, rtol=0, atol=0)
        torch.testing.assert_close(ht[n : n + 1], ht_n, rtol=0, atol=0)


def test_chunk_inference_path():
    """Without gradients the forward stores nothing for the backward: same results, initial and final state."""
    check_chunk(2, 37, 2, torch.bfloat16, with_h0=True, grads=False)


def test_chunk_without_grad_or_final_state():
    xs = make_inputs(1, 40, 2, torch.bfloat16)
    with torch.no_grad():
        o, ht = chunk_wkv7(*xs)
    ro, _ = wkv7_reference(*(x.double() for x in xs))
    assert ht is None and rel(o, ro) <= BOUNDS[torch.bfloat16][0]
