"""Times the Triton WKV-7 kernels against flash-linear-attention's (fla) on one CUDA GPU, in one run.

    python benchmarks/bench_kernels.py            # needs a CUDA GPU and fla (pip install fla-core)

bf16, head size 64. Chunked WKV-7 (rwkv7_kernels/wkv7_chunk.py) against fla's chunk_rwkv7, called as fla's RWKV-7 layer
calls it (safe_gate=True, lower_bound=-exp(-0.5), chunk_size=64); the decode step against fla's
fused_mul_recurrent_rwkv7: ours is the model's whole fused time mix of one token (rwkv7_kernels/time_mix_decode.py,
state updated in place), which beyond fla's WKV step also computes the LoRA up-projections, the decay, the kk
normalisation and the k update, the per-head GroupNorm, the bonus and the gate. fla's inputs are computed from
ours, so both WKV steps see the same r, w, k, v, kk, a, and "max rel diff vs fla" compares the updated states. A
second decode row times fla's kernel together with the PyTorch ops its layer runs for the same work. fla's
decoding kernel autotunes on the head size alone, so by default the batch size of its first call picks the
configuration for every batch size (at batch 256 we saw 95 to 224 us, depending on that first call); here it is tuned
anew for each batch size timed (its chosen configuration is printed).
Times are triton.testing.do_bench medians
(decode: replays of a CUDA graph, as the model runs it, and plain launches). Peak memory is the most allocated
during one call beyond the inputs; the floor time is (bytes of inputs + outputs) / measured copy bandwidth.
Cold start: the first call in a fresh process with an empty Triton cache. Prints a markdown table.
"""

import argparse
import math
import os
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
import triton

sys.path[:0] = [os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."), os.path.dirname(os.path.abspath(__file__))]
import needs  # noqa: E402
from rwkv7_kernels import TimeMixParams  # noqa: E402
from rwkv7_kernels.decode_step import time_mix as fused_time_mix  # noqa: E402
from rwkv7_kernels.wkv7_chunk import chunk_wkv7  # noqa: E402

LOWER = -math.exp(-0.5)
K = 64


def inputs(B, T, H, requires_grad=False, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    n = lambda: torch.randn(B, T, H, K, device="cuda", generator=g)  # noqa: E731
    r, k, v = n() * 0.5, n() * 0.5, n()
    w = LOWER * torch.sigmoid(n() * 2 - 1)
    kk = F.normalize(n(), dim=-1)
    a_gate = torch.sigmoid(n())
    bf = lambda x: x.bfloat16().requires_grad_(requires_grad)  # noqa: E731
    return dict(r=bf(r), w=w.requires_grad_(requires_grad), k=bf(k), v=bf(v), kk=kk.bfloat16(),
                a_gate=a_gate.bfloat16(), a=bf(-kk), b=bf(kk * a_gate))


def ours(x, **kw):
    return chunk_wkv7(x["r"], x["w"], x["k"], x["v"], x["a"], x["b"], **kw)


def fla(x, **kw):
    from fla.ops.rwkv7 import chunk_rwkv7

    return chunk_rwkv7(x["r"], x["w"], x["k"], x["v"], x["a"], x["b"], safe_gate=True, lower_bound=LOWER,
                       chunk_size=64, **kw)


def copy_bandwidth():
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    ms = triton.testing.do_bench(lambda: y.copy_(x), return_mode="median")
    return 2 * x.numel() / ms / 1e6  # GB/s


def peak_extra(fn):
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def nbytes(*xs):
    return sum(x.numel() * x.element_size() for x in xs)


def bench_chunk(B, T, H, backward, bw):
    x = inputs(B, T, H, requires_grad=backward)
    do = torch.randn(B, T, H, K, device="cuda", dtype=torch.bfloat16)
    leaves = [x[n] for n in "rwkvab"]
    if backward:
        def run(f):
            o, _ = f(x)
            torch.autograd.backward(o, do)
            for t in leaves:
                t.grad = None
        floor_bytes = 2 * nbytes(*leaves) + 3 * nbytes(do)  # fwd: inputs, o; bwd: inputs, do, input grads
    else:
        def run(f):
            with torch.no_grad():
                f(x, output_final_state=True)
        floor_bytes = nbytes(*leaves) + nbytes(do) + B * H * K * K * 4
    with torch.no_grad():
        err = ((ours(x)[0].float() - fla(x)[0].float()).norm() / fla(x)[0].float().norm()).item()
    row = {}
    for name, f in (("ours", ours), ("fla", fla)):
        run(f)
        row[name] = triton.testing.do_bench(lambda: run(f), return_mode="median")
        row[name + "_mem"] = peak_extra(lambda: run(f))
    row["floor_ms"] = floor_bytes / bw / 1e6
    row["err_vs_fla"] = err
    return row


def decode_inputs(B, H):
    """Ours (decode_step.time_mix's arguments without the state: LoRA hidden activations of the 0.4B ranks, first
    layer, k_k = 1, k_a = 0) and fla's (r, w, k, v, kk, a_gate) computed from them, so both WKV steps see the same
    inputs, and `rest`: the LoRA up-projections and the decay/kk/a ops fla's layer runs around its kernel."""
    C = H * K
    g = torch.Generator(device="cuda").manual_seed(1)

    def randn(*shape, std=1.0):
        return (torch.randn(*shape, device="cuda", generator=g) * std).bfloat16()

    r, k, v = randn(B, 1, C, std=0.5), randn(B, 1, C, std=0.5), randn(B, 1, C)
    w_lora, a_lora, g_lora = ((randn(B, 1, D), randn(C, D, std=D**-0.5), randn(C) if bias else None)
                              for D, bias in ((64, True), (64, True), (128, False)))
    ones, zeros = torch.ones(C, device="cuda").bfloat16(), torch.zeros(C, device="cuda").bfloat16()
    params = TimeMixParams(ones, zeros, randn(H, K, std=0.1), ones, zeros, 64e-5)
    ours_args = (r, k, v, (w_lora, a_lora, None, g_lora), None, params)

    def rest():  # what fla's RWKV-7 layer computes in PyTorch around fused_mul_recurrent_rwkv7, per decoding step
        heads = lambda t: t.view(B, 1, H, K)  # noqa: E731
        w = LOWER * torch.sigmoid(F.linear(w_lora[0], w_lora[1], w_lora[2]).float())
        a_gate = torch.sigmoid(F.linear(a_lora[0], a_lora[1], a_lora[2]))
        kk = F.normalize(heads(k), dim=-1)
        return heads(r), heads(w), heads(k), heads(v), kk, heads(a_gate)

    return ours_args, rest


def bench_decode(B, H):
    """Our fused time mix of one token against fla's WKV step alone, and against fla's WKV step plus the LoRA
    up-projections, decay, kk, GroupNorm, bonus and gate that fla's layer runs in PyTorch around it."""
    from triton.runtime.autotuner import Autotuner
    import fla.ops.rwkv7.fused_recurrent as fla_recurrent
    from fla.ops.rwkv7 import fused_mul_recurrent_rwkv7

    tuner = fla_recurrent.fused_recurrent_rwkv7_fwd_kernel
    while not isinstance(tuner, Autotuner):
        tuner = tuner.fn
    tuner.cache.clear()  # tune again for this batch size (main() turns off fla's on-disk record of tunings)
    ours_args, rest = decode_inputs(B, H)
    fla_args = rest()
    state = torch.randn(B, H, K, K, device="cuda") * 0.3
    s_ours, s_fla = state.clone(), state.clone()
    fused_time_mix(*ours_args, s_ours)
    s_ref = fused_mul_recurrent_rwkv7(*fla_args, initial_state=state.clone(), output_final_state=True)[1]
    err = ((s_ours - s_ref).norm() / s_ref.norm()).item()
    g_lora, r_k = ours_args[3][3], ours_args[5].r_k

    def fla_whole():
        r, w, k, v, kk, a_gate = rest()
        o, _ = fused_mul_recurrent_rwkv7(r, w, k, v, kk, a_gate, initial_state=s_fla, output_final_state=True)
        o = F.group_norm(o.reshape(B, H * K), H, eps=64e-5).view(B, 1, H, K)
        o = o + (r * k * r_k).sum(-1, keepdim=True) * v
        return o.view(B, 1, -1) * F.linear(g_lora[0], g_lora[1])

    fns = {
        "ours": lambda: fused_time_mix(*ours_args, s_ours),
        "fla": lambda: fused_mul_recurrent_rwkv7(*fla_args, initial_state=s_fla, output_final_state=True),
        "fla_whole": fla_whole,
    }
    row = {"err_vs_fla": err, "fla_config": next(iter(tuner.cache.values()))}
    for name, f in fns.items():
        f()
        row[name + "_launch"] = triton.testing.do_bench(f, return_mode="median")
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            row[name] = triton.testing.do_bench_cudagraph(f, return_mode="median")
        row[name + "_mem"] = peak_extra(f)
    return row


def cold(which):
    """Runs in a fresh process: first-call latency of forward, forward+backward and decode."""
    x = inputs(2, 1000, 4, requires_grad=True)
    f = ours if which == "ours" else fla
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    o, _ = f(x)
    torch.cuda.synchronize()
    t1 = time.perf_counter()
    o.float().sum().backward()
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    state = torch.zeros(2, 4, K, K, device="cuda")
    ours_args, rest = decode_inputs(2, 4)
    if which == "ours":
        fused_time_mix(*ours_args, state)
    else:
        from fla.ops.rwkv7 import fused_mul_recurrent_rwkv7

        fused_mul_recurrent_rwkv7(*rest(), initial_state=state, output_final_state=True)
    torch.cuda.synchronize()
    print(f"COLD {t1 - t0:.2f} {t2 - t1:.2f} {time.perf_counter() - t2:.2f}")


def cold_start(which):
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, TRITON_CACHE_DIR=cache)
        out = subprocess.run([sys.executable, __file__, "--cold-child", which], env=env, capture_output=True, text=True)
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("COLD")]
    return line[0].split()[1:] if line else ["failed: " + out.stderr[-300:]]


def main(parts):
    os.environ["FLA_CACHE_RESULTS"] = "0"  # fla would otherwise reuse tunings recorded on disk by earlier runs
    fla_pkg = needs.fla("bench_kernels.py")

    bw = copy_bandwidth()
    print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
          f"fla {getattr(fla_pkg, '__version__', '?')}; copy bandwidth {bw:.0f} GB/s\n")
    print("| op | B, T, H | ours ms | fla ms | ours/fla | target | floor ms | ours peak MiB | fla peak MiB | "
          "max rel diff vs fla |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    cases = [((8, 4096, 32), False), ((8, 4096, 32), True), ((8, 4096, 64), True), ((1, 16384, 32), False)]
    for (B, T, H), backward in cases:
        if ("fwd+bwd" if backward else "fwd") not in parts:
            continue
        r = bench_chunk(B, T, H, backward, bw)
        print(f"| {'fwd+bwd' if backward else 'fwd'} | {B}, {T}, {H} | {r['ours']:.3f} | {r['fla']:.3f} | "
              f"{r['ours'] / r['fla']:.2f} | {0.5 if backward else 0.7} | {r['floor_ms']:.3f} | {r['ours_mem']:.0f} | "
              f"{r['fla_mem']:.0f} | {r['err_vs_fla']:.1e} |", flush=True)
    for B in (1, 256) if "decode" in parts else ():
        r = bench_decode(B, 32)
        floor = (B * 32 * K * K * 4 * 2 + B * 32 * K * 2 * 7) / bw / 1e6
        print(f"| decode (graph) | {B}, 1, 32 | {r['ours']:.4f} | {r['fla']:.4f} | {r['ours'] / r['fla']:.2f} | 1.0 | "
              f"{floor:.4f} | {r['ours_mem']:.1f} | {r['fla_mem']:.1f} | {r['err_vs_fla']:.1e} |")
        print(f"| decode (launch) | {B}, 1, 32 | {r['ours_launch']:.4f} | {r['fla_launch']:.4f} | "
              f"{r['ours_launch'] / r['fla_launch']:.2f} | 1.0 | {floor:.4f} | | | |")
        print(f"| decode, fla kernel + its layer's ops for the same work (graph) | {B}, 1, 32 | {r['ours']:.4f} | "
              f"{r['fla_whole']:.4f} | {r['ours'] / r['fla_whole']:.2f} | | {floor:.4f} | | "
              f"{r['fla_whole_mem']:.1f} | |", flush=True)
        print(f"| | fla's configuration at batch {B}: {r['fla_config']} | | | | | | | | |", flush=True)
    cold_ones = [which for which in ("ours", "fla") if "cold" in parts or f"cold-{which}" in parts]
    if not cold_ones:
        return
    print("\nCold start, first call in a fresh process with an empty Triton cache (s): fwd, bwd, decode")
    for which in cold_ones:
        print(f"- {which}: {' '.join(cold_start(which))}")


PARTS = ("fwd", "fwd+bwd", "decode", "cold", "cold-ours")

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "parts", nargs="*", metavar="PART",
        help=f"what to time, of {', '.join(PARTS)} (default: fwd fwd+bwd decode cold); cold-ours: our cold start "
        "alone (fla's autotunes for minutes in a fresh process)",
    )
    parser.add_argument("--cold-child", choices=("ours", "fla"), help=argparse.SUPPRESS)  # the cold-start process
    args = parser.parse_args()
    if set(args.parts) - set(PARTS):
        parser.error(f"unknown parts {sorted(set(args.parts) - set(PARTS))}; choose from {', '.join(PARTS)}")
    needs.cuda_gpu("bench_kernels.py")
    if args.cold_child:
        cold(args.cold_child)
    else:
        main(args.parts or ["fwd", "fwd+bwd", "decode", "cold"])
