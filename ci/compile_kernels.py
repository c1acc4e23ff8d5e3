"""Compile every Triton kernel of rwkv7_kernels for an NVIDIA Hopper GPU (sm_90) with the installed triton, on a
machine without a GPU: the check that a triton release (the one a new torch requires, say) still builds the kernels.

    .venv/bin/python ci/compile_kernels.py                                  # the environment's triton
    PYTHONPATH=/tmp/triton-3.7.1 .venv/bin/python ci/compile_kernels.py     # another one, beside the environment:
        .venv/bin/python -m pip install --no-deps --target /tmp/triton-3.7.1 triton==3.7.1

How: the kernels' Python wrappers run on small CPU tensors (`workloads` below: every dtype, flag and launch
configuration the model uses) with Triton's launch replaced by a recorder, so no kernel runs. Each launch is
turned into what Triton's launcher would compile on a GPU (argument types, divisibility hints, constexprs, integers
equal to 1 and None as constants, num_warps and the other options), and each distinct variant is compiled ahead of
time to a cubin for sm_90, as triton/tools/compile.py does (ASTSource, triton.compile with a GPUTarget; the ptxas
bundled with triton, no driver). The wrappers run as on an H100: programmatic dependent launch on (rwkv7_kernels/
pdl.py) and 132 SMs, which pick launch configurations.

Prints a line per kernel variant and exits with status 1 if one fails to compile, or if a @triton.jit function of
rwkv7_kernels is neither launched by a workload nor called from another one (a new kernel needs a workload here).
"""

import argparse
import concurrent.futures
import contextlib
import importlib
import inspect
import multiprocessing
import os
import pkgutil
import re
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

# Under TRITON_INTERPRET=1 (the tests' setting on CPU) @triton.jit makes interpreted functions, which do not compile;
# triton reads it when the kernel modules are imported, below
os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

import rwkv7_kernels  # noqa: E402
from rwkv7_kernels import pdl, wkv7_chunk  # noqa: E402
from rwkv7_kernels import TimeMixParams, decode_step  # noqa: E402
from rwkv7_kernels import shift_mix_sequence as shift_mix  # noqa: E402
from rwkv7_kernels.cross_entropy_rows import cross_entropy_rows  # noqa: E402
from rwkv7_kernels.linear_decode import linear_row  # noqa: E402
from rwkv7_kernels.norm_mix_linear_decode import norm_mix_linear_row  # noqa: E402
from rwkv7_kernels.norm_shift_mix_fused import norm_shift_mix_fused  # noqa: E402
from rwkv7_kernels.relu_square import relu_square, relu_square_linear  # noqa: E402
from rwkv7_kernels.shift_mix_sequence import norm_shift_mix_linear, shift_mix_sequence  # noqa: E402
from rwkv7_kernels.time_mix_sequence import time_mix_sequence  # noqa: E402
from rwkv7_kernels.wkv7_chunk import chunk_wkv7  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)  # compute capability 9.0 (H100, H200), 32 threads a warp
H100_SMS = 132
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# torch dtype -> the element type of a pointer argument, as Triton's launcher names it
POINTER_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
                 torch.int8: "i8", torch.int16: "i16", torch.int32: "i32", torch.int64: "i64", torch.uint8: "u8",
                 torch.bool: "u1"}


# -- workloads: calls of the kernels' wrappers covering every kernel variant the model launches ---------------------

def randn(*shape, dtype=torch.float32, grad=False):
    return torch.randn(*shape, dtype=dtype).requires_grad_(grad)


def wkv7_inputs(B, T, H, dtype, grad=False):
    """r, w, k, v, a, b [B, T, H, 64] as chunk_wkv7 takes them (w float32); values do not matter, nothing runs."""
    r, k, v, a, b = (randn(B, T, H, 64, dtype=dtype, grad=grad) for _ in range(5))
    return r, randn(B, T, H, 64, grad=grad), k, v, a, b


def wkv7_training(dtype, B, T, H, with_state, cu_seqlens=None):
    """Forward and backward, the initial state's and final state's gradients with with_state."""
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    h0 = randn(N, H, 64, 64, grad=True) if with_state else None
    o, ht = chunk_wkv7(*wkv7_inputs(B, T, H, dtype, grad=True), h0, with_state, cu_seqlens)
    (o.float().sum() + (ht.sum() if with_state else 0)).backward()


def time_mix_prefill(dtype, B, T, H, first_layer, with_state):
    """time_mix_sequence (the two elementwise kernels around chunk_wkv7's forward) of one layer."""
    C = H * 64
    r, w_raw, k, v, a_raw, v_gate, v_first, g = (randn(B, T, C, dtype=dtype) for _ in range(8))
    state = randn(B, H, 64, 64) if with_state else None
    time_mix_sequence(r, w_raw, k, v, a_raw, None if first_layer else v_gate, None if first_layer else v_first, g,
                      time_mix_params(dtype, H), state=state)


def time_mix_training(dtype, B, T, H, first_layer, masked, cu_seqlens=None):
    """time_mix_sequence forward and backward (training): with a padding mask, or packed sequences (B = 1)."""
    C = H * 64
    r, w_raw, k, v, a_raw, v_gate, v_first, g = (randn(B, T, C, dtype=dtype, grad=True) for _ in range(8))
    mask = torch.ones(B, T, dtype=torch.long) if masked else None
    y, _, state = time_mix_sequence(r, w_raw, k, v, a_raw, None if first_layer else v_gate,
                                    None if first_layer else v_first, g, time_mix_params(dtype, H),
                                    state=randn(B, H, 64, 64), attention_mask=mask, cu_seqlens=cu_seqlens)
    (y.float().sum() + state.sum()).backward()


def shift_mix_training(dtype, B, T, C, mixes, cu_seqlens=None):
    """shift_mix_sequence forward and backward, prev's gradient included (rows) or not (packed)."""
    x, prev = randn(B, T, C, dtype=dtype, grad=True), randn(B, C, dtype=dtype, grad=True)
    mixed, _ = shift_mix_sequence(x, prev, [randn(C, dtype=dtype, grad=True) for _ in range(mixes)],
                                  cu_seqlens=cu_seqlens)
    sum(m.float().sum() for m in mixed).backward()


def norm_shift_mix_linear_training(dtype, B, T, C, bias, last_grad, cu_seqlens=None):
    """norm_shift_mix_linear forward and backward, with the LayerNorm's bias or without, a gradient for the new prev
    or none (training), rows or packed sequences (B = 1)."""
    x, prev = randn(B, T, C, dtype=dtype, grad=True), randn(B, C, dtype=dtype, grad=True)
    outs, last = norm_shift_mix_linear(x, randn(C, dtype=dtype, grad=True), randn(C, dtype=dtype, grad=True)
                                       if bias else None, 1e-5, prev, [randn(C, dtype=dtype, grad=True)] * 2,
                                       [[randn(C, C, dtype=dtype, grad=True)], [randn(8, C, dtype=dtype, grad=True)]],
                                       cu_seqlens=cu_seqlens)
    (sum(o.float().sum() for o in outs) + (last.float().sum() if last_grad else 0)).backward()


def shift_mix_float32_norm(B, T, C):
    """The shift kernels' recomputation of a float32 LayerNorm of bf16 x, forward and backward: CUDA's autocast over
    a bf16 model (its LayerNorm computes in float32; the CPU's autocast leaves it in bf16, so the public function
    cannot show it here)."""
    x, prev = randn(B * T, C, dtype=torch.bfloat16), randn(B, C, dtype=torch.bfloat16)
    mixes = [randn(C, dtype=torch.bfloat16) for _ in range(6)]
    norm = shift_mix.Norm(randn(B * T), randn(B * T), randn(C, dtype=torch.bfloat16), randn(C, dtype=torch.bfloat16),
                          torch.float32)
    mixed = shift_mix._shift_mix(x, prev, None, T, mixes, torch.bfloat16, norm)
    shift_mix._shift_mix_backward(x, prev, None, T, mixes, mixed, False, norm)


def norm_shift_mix_linear_autocast(B, T, C):
    """norm_shift_mix_linear forward and backward under autocast: float32 x, LayerNorm and mixes, lerps and products
    in bf16."""
    x, prev = randn(B, T, C, grad=True), randn(B, C, grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outs, _ = norm_shift_mix_linear(x, randn(C, grad=True), randn(C, grad=True), 1e-5, prev, [randn(C, grad=True)],
                                        [[randn(8, C, grad=True)]])
    outs[0].float().sum().backward()


def relu_square_training(dtype, autocast):
    """relu_square and relu_square_linear, forward and backward; under autocast a float32 k and a bf16 relu(k)^2."""
    k = randn(2, 70, 4096, dtype=dtype, grad=True)
    relu_square(k).float().sum().backward()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = relu_square_linear(k, randn(1024, 4096, dtype=dtype, grad=True))
    out.float().sum().backward()


def cross_entropy(dtype, V, need_grad):
    """cross_entropy_rows: a chunk of the training loss (with the gradient), or a loss without autograd."""
    labels = torch.randint(0, V, (8,))
    cross_entropy_rows(randn(8, V, dtype=dtype), labels, torch.tensor([0.1]), need_grad=need_grad)


def time_mix_params(dtype, H):
    C = H * 64
    k_k, k_a, gn_w, gn_b = (randn(C, dtype=dtype) for _ in range(4))
    return TimeMixParams(k_k, k_a, randn(H, 64, dtype=dtype), gn_w, gn_b, 64e-5)


def norm_shift_mix(dtype, B, T, C, mixes, bias, masked):
    """norm_shift_mix_fused: a prefill (T > 1), or a decoding step of several rows in place with a padding mask."""
    x, prev = randn(B, T, C, dtype=dtype), randn(B, C, dtype=dtype)
    mask = torch.ones(B, 1, dtype=torch.long) if masked else None
    norm = (randn(C, dtype=dtype), randn(C, dtype=dtype) if bias else None, 1e-5)
    norm_shift_mix_fused(x, prev, [randn(C, dtype=dtype) for _ in range(mixes)], norm, mask, in_place=T == 1)


LORA_RANKS = {"w": 64, "a": 64, "v": 32, "g": 128}  # those of the 0.1B model; g has no bias, w's LoRA is tanh'd


def norm_mix_linear(dtype, C, projections, bias, masked):
    """norm_mix_linear_row, one decoding row: projections [(outputs, activation)]."""
    mask = torch.ones(1, 1, dtype=torch.long) if masked else None
    norm_mix_linear_row(randn(1, 1, C, dtype=dtype), randn(C, dtype=dtype), randn(C, dtype=dtype) if bias else None,
                        1e-5, randn(1, C, dtype=dtype),
                        [(randn(C, dtype=dtype), randn(n, C, dtype=dtype), act) for n, act in projections], mask)


def time_mix_projections(C, first_layer):
    """The projections a decoding step of the time mix reads its normalised x with: r, k, v, the LoRA downs."""
    loras = [("w", "tanh"), ("a", None), ("g", "sigmoid")] + ([] if first_layer else [("v", None)])
    return [(C, None)] * 3 + [(LORA_RANKS[name], act) for name, act in loras]


def time_mix_decode(dtype, B, H, first_layer, masked):
    """decode_step.time_mix: beyond 2 programs per SM the LoRA up-projections run first, in their own launch."""
    C = H * 64

    def lora(name):  # (hidden activations, up weight, bias)
        up = randn(C, LORA_RANKS[name], dtype=dtype)
        return randn(B, 1, LORA_RANKS[name], dtype=dtype), up, None if name == "g" else randn(C, dtype=dtype)

    r, k, v, v_first = (randn(B, 1, C, dtype=dtype) for _ in range(4))
    decode_step.time_mix(
        r, k, v, (lora("w"), lora("a"), None if first_layer else lora("v"), lora("g")), None if first_layer else v_first,
        time_mix_params(dtype, H), randn(B, H, 64, 64), torch.ones(B, 1, dtype=torch.long) if masked else None,
    )


def linear(dtype, N, K, bias, activation, residual):
    """linear_row: one row."""
    linear_row(randn(1, 1, K, dtype=dtype), randn(N, K, dtype=dtype), randn(N, dtype=dtype) if bias else None,
               activation, randn(1, 1, N, dtype=dtype) if residual else None)


def workloads(dtype):
    # Sizes: with 16 heads, B = 1 or 2 sequences make fewer WKV-7 state programs than SMs, 9 more (the sequential
    # kernels' two configurations); C = 1024 and 2048 take 8 and 4 warps in norm_mix_linear_row, 2560 8 warps in
    # norm_shift_mix_fused; 1 row and 20 rows of 16 heads are below and above decode_step.time_mix's lora_up threshold.
    cu_int32 = torch.tensor([0, 40, 41, 100, 132, 200, 203, 260, 300, 333], dtype=torch.int32)  # 9 sequences
    return [
        ("time mix prefill, layer 0", lambda: time_mix_prefill(dtype, 1, 70, 16, True, False)),
        ("time mix prefill, with state", lambda: time_mix_prefill(dtype, 9, 40, 16, False, True)),
        ("time mix training, layer 0, mask", lambda: time_mix_training(dtype, 2, 70, 16, True, True)),
        ("time mix training, packed", lambda: time_mix_training(dtype, 1, 333, 16, False, False, cu_int32)),
        ("shift/mix training", lambda: shift_mix_training(dtype, 2, 70, 1024, 6)),
        ("shift/mix training, packed", lambda: shift_mix_training(dtype, 1, 333, 2560, 1, cu_int32)),
        ("norm/shift/mix linear training", lambda: norm_shift_mix_linear_training(dtype, 2, 70, 1024, True, False)),
        ("norm/shift/mix linear training, no bias, new prev's gradient",
         lambda: norm_shift_mix_linear_training(dtype, 2, 70, 1024, False, True)),
        ("norm/shift/mix linear training, packed",
         lambda: norm_shift_mix_linear_training(dtype, 1, 333, 2560, True, False, cu_int32)),
        ("norm/shift/mix linear training, autocast", lambda: norm_shift_mix_linear_autocast(2, 70, 1024)),
        ("shift/mix of a float32 LayerNorm of bf16 x", lambda: shift_mix_float32_norm(2, 70, 1024)),
        ("relu^2 training", lambda: relu_square_training(dtype, False)),
        ("relu^2 training, autocast", lambda: relu_square_training(torch.float32, True)),
        ("cross entropy, World vocabulary", lambda: cross_entropy(dtype, 65536, True)),
        ("cross entropy, no gradient", lambda: cross_entropy(dtype, 65536, False)),
        ("wkv7 varlen, int64 offsets", lambda: chunk_wkv7(*wkv7_inputs(1, 100, 16, dtype), randn(3, 16, 64, 64),
                                                           True, torch.tensor([0, 31, 64, 100]))),
        ("wkv7 training", lambda: wkv7_training(dtype, 2, 70, 16, False)),
        ("wkv7 training, varlen with states", lambda: wkv7_training(dtype, 1, 333, 16, True, cu_int32)),
        ("norm/shift/mix prefill", lambda: norm_shift_mix(dtype, 2, 5, 1024, 7, True, False)),
        ("norm/shift/mix decoding, mask", lambda: norm_shift_mix(dtype, 4, 1, 2560, 1, False, True)),
        ("norm/mix/linear, time mix layer 0", lambda: norm_mix_linear(dtype, 1024, time_mix_projections(1024, True),
                                                                      True, True)),
        ("norm/mix/linear, time mix", lambda: norm_mix_linear(dtype, 2048, time_mix_projections(2048, False),
                                                              True, False)),
        ("norm/mix/linear, channel mix", lambda: norm_mix_linear(dtype, 1024, [(4096, "relu2")], False, True)),
        ("time mix decoding, layer 0, mask", lambda: time_mix_decode(dtype, 1, 16, True, True)),
        ("time mix decoding", lambda: time_mix_decode(dtype, 1, 16, False, False)),
        ("time mix decoding, 20 rows, layer 0", lambda: time_mix_decode(dtype, 20, 16, True, False)),
        ("time mix decoding, 20 rows, mask", lambda: time_mix_decode(dtype, 20, 16, False, True)),
        ("linear, residual (o_proj, value)", lambda: linear(dtype, 1024, 4096, False, None, True)),
        ("linear, bias (LoRA up)", lambda: linear(dtype, 1024, 64, True, None, False)),
    ] + [
        (f"linear, {activation}", lambda activation=activation: linear(dtype, 64, 1024, False, activation, False))
        for activation in ("tanh", "sigmoid", "relu2")
    ]


# -- recording the launches ----------------------------------------------------------------------------------------

def record_launches():
    """[(kernel, args, kwargs)] of every launch of the workloads, for each dtype; the kernels do not run."""
    launches = []

    def record(kernel, *args, grid, warmup, **kwargs):
        launches.append((kernel, args, kwargs))

    with contextlib.ExitStack() as patches:
        patches.enter_context(mock.patch.object(JITFunction, "run", record))
        patches.enter_context(mock.patch.object(pdl, "enabled", lambda device: True))
        for module in (decode_step, wkv7_chunk):
            patches.enter_context(mock.patch.object(module, "sm_count", lambda device: H100_SMS))
        for dtype in DTYPES:
            for description, run in workloads(dtype):
                try:
                    run()
                except Exception as error:
                    raise RuntimeError(f"workload '{description}' ({dtype}) failed: {error!r}") from error
    return launches


def argument_type(value, path, constexprs, divisible, specialize=True, align=True):
    """The signature entry of a (non-constexpr) argument at `path`, as Triton's launcher specialises it
    (triton/runtime/jit.py): None, and an int equal to 1 unless do_not_specialize, become constants (added to
    constexprs); ints and pointers that are multiples of 16 get a divisibility hint (their paths added to divisible);
    a tuple has an entry per element."""
    if isinstance(value, tuple):
        return tuple(argument_type(v, path + (i,), constexprs, divisible) for i, v in enumerate(value))
    if value is None or (type(value) is int and value == 1 and specialize):
        constexprs[path] = value
        return "constexpr"
    if isinstance(value, bool):
        return "u1"
    if isinstance(value, int):
        if specialize and align and value % 16 == 0:
            divisible.append(path)
        return "i32" if -2**31 <= value < 2**31 else "i64" if -2**63 <= value < 2**63 else "u64"
    if isinstance(value, float):
        return "fp32"
    if isinstance(value, torch.Tensor):
        if specialize and align and value.data_ptr() % 16 == 0:
            divisible.append(path)
        return "*" + POINTER_TYPES[value.dtype]
    raise TypeError(f"no Triton type for {type(value).__name__} argument {path}")


def variant(kernel, args, kwargs):
    """(module, name, signature, constexprs, divisible paths, options) that a launch of `kernel` compiles: hashable."""
    names = kernel.arg_names
    bound = inspect.signature(kernel.fn).bind(*args, **{k: v for k, v in kwargs.items() if k in names})
    bound.apply_defaults()
    signature, constexprs, divisible = {}, {}, []
    for i, param in enumerate(kernel.params):
        value = bound.arguments[param.name]
        if param.is_constexpr:
            constexprs[(i,)] = value
            signature[param.name] = "constexpr"
        else:
            signature[param.name] = argument_type(value, (i,), constexprs, divisible, not param.do_not_specialize,
                                                  not param.do_not_specialize_on_alignment)
    options = {k: v for k, v in kwargs.items() if k not in names}  # num_warps, maxnreg, launch_pdl, ...
    return (kernel.fn.__module__, kernel.fn.__name__, tuple(signature.items()), tuple(sorted(constexprs.items())),
            tuple(divisible), tuple(sorted(options.items())))


def describe(v):
    """One line: kernel, its pointers' dtypes, its constexpr parameters and launch options."""
    module, name, signature, constexprs, _, options = v
    pointers = set()
    for _, ty in signature:
        pointers.update(t[1:] for t in (ty if isinstance(ty, tuple) else (ty,)) if t.startswith("*"))
    params = {p.name for p in getattr(importlib.import_module(module), name).params if p.is_constexpr}
    names = [n for n, _ in signature]
    flags = [f"{names[path[0]]}={value}" for path, value in constexprs if len(path) == 1 and names[path[0]] in params]
    return (f"{module.rsplit('.', 1)[-1]}.{name}  {'/'.join(sorted(pointers))}  {' '.join(flags)}  "
            + " ".join(f"{k}={v}" for k, v in options))


# -- compiling -----------------------------------------------------------------------------------------------------

def compile_variant(v):
    """Compile one variant for sm_90 (in a worker process); (seconds, None) or (seconds, the error)."""
    module, name, signature, constexprs, divisible, options = v
    kernel = getattr(importlib.import_module(module), name)
    start = time.perf_counter()
    try:
        source = triton.compiler.ASTSource(fn=kernel, signature=dict(signature), constexprs=dict(constexprs),
                                           attrs={path: [["tt.divisibility", 16]] for path in divisible})
        compiled = triton.compile(source, target=TARGET, options=dict(options))
        if not compiled.asm.get("cubin"):
            raise RuntimeError("no cubin")
        error = None
    except Exception as e:  # noqa: BLE001 (every failure is reported, with its message)
        error = f"{type(e).__name__}: {e}".strip()
    return time.perf_counter() - start, error


def uncovered_jit_functions(launched):
    """@triton.jit functions of rwkv7_kernels that no workload launches and no other such function calls."""
    functions = {}
    for info in pkgutil.iter_modules(rwkv7_kernels.__path__):
        module = importlib.import_module(f"rwkv7_kernels.{info.name}")
        functions.update({(module.__name__, name): f for name, f in vars(module).items()
                          if isinstance(f, JITFunction) and f.fn.__module__ == module.__name__})
    sources = {key: inspect.getsource(f.fn) for key, f in functions.items()}
    called = {key for key in functions for other, src in sources.items()
              if other != key and re.search(rf"\b{key[1]}\(", src)}
    return sorted(f"{module}.{name}" for module, name in functions.keys() - launched - called)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # the CPUs this process may use (a CI container may see more than it gets)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    parser.add_argument("-j", "--jobs", type=int, default=cpus, help="compiler processes (default: the CPUs)")
    args = parser.parse_args()
    start = time.perf_counter()
    launches = record_launches()
    variants = sorted({variant(*launch) for launch in launches}, key=describe)
    launched = {(module, name) for module, name, *_ in variants}
    print(f"triton {triton.__version__} ({Path(triton.__file__).parent}), torch {torch.__version__}: "
          f"{len(launches)} launches, {len(variants)} kernel variants of {len(launched)} kernels to compile for "
          f"sm_90 on {args.jobs} processes", flush=True)

    failures = 0
    # a fresh cache, so that every variant is compiled (the workers inherit the environment)
    with tempfile.TemporaryDirectory(prefix="triton-cache-") as cache:
        os.environ["TRITON_CACHE_DIR"] = cache
        # spawned workers: no fork of a process that has run torch ops
        with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            for v, (seconds, error) in zip(variants, pool.map(compile_variant, variants)):
                print(f"{'ok' if error is None else 'FAIL':4} {seconds:5.1f}s  {describe(v)}", flush=True)
                if error is not None:
                    failures += 1
                    print("      " + error.replace("\n", "\n      "), flush=True)

    uncovered = uncovered_jit_functions(launched)
    for name in uncovered:
        print(f"FAIL  {name}: a @triton.jit function no workload launches (add one to {Path(__file__).name})")
    total = (f"compiled {len(variants)} kernel variants for sm_90 with triton {triton.__version__} in "
             f"{time.perf_counter() - start:.0f} s")
    if failures or uncovered:
        print(f"{total}: {failures} FAILED, {len(uncovered)} jit functions not covered")
        return 1
    print(f"{total}: all ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
