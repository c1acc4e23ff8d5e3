"""Block shapes for rwkv7_kernels/linear_decode.py: times the one-row linear kernel on the weight shapes of a decoding step
of the released models, for a grid of (BLOCK_N, BLOCK_K, warps), against cuBLAS through F.linear, as CUDA-graph
replays (how the decoding step runs).

    python benchmarks/bench_linear_row.py
"""

import argparse
import itertools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]
import needs  # noqa: E402
from rwkv7_kernels.linear_decode import _linear_row_kernel  # noqa: E402

SHAPES = {  # (N, K): the projections, FFN, LoRA down / up and the head of the 0.4B and 1.5B shapes
    "proj 1024": (1024, 1024), "proj 2048": (2048, 2048), "ffn key 0.4B": (4096, 1024), "ffn value 0.4B": (1024, 4096),
    "ffn key 1.5B": (8192, 2048), "lora down": (64, 1024), "lora up": (1024, 64), "head 0.4B": (65536, 1024),
}
CONFIGS = list(itertools.product([1, 2, 4, 8, 16], [128, 256, 512, 1024], [1, 2, 4, 8]))


def time_us(fn):
    return triton.testing.do_bench_cudagraph(fn, rep=20) * 1e3


def main():
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    needs.cuda_gpu("bench_linear_row.py")
    print(f"{torch.cuda.get_device_name()}, triton {triton.__version__}")
    for name, (N, K) in SHAPES.items():
        x = torch.randn(K, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
        y = torch.empty(N, device="cuda", dtype=torch.bfloat16)
        results = []
        for block_n, block_k, warps in CONFIGS:
            if block_k > max(128, triton.next_power_of_2(K)):
                continue

            def run():
                _linear_row_kernel[(triton.cdiv(N, block_n),)](x, w, w, x, y, N, K, HAS_BIAS=False, HAS_RESIDUAL=False,
                                                                ACTIVATION=0, BLOCK_N=block_n, BLOCK_K=block_k, PDL=False,
                                                                num_warps=warps)

            results.append((time_us(run), block_n, block_k, warps))
        cublas = time_us(lambda: F.linear(x[None], w))
        best = sorted(results)[:3]
        floor = N * K * 2 / 4.0e12 * 1e6
        print(f"{name:16s} N={N:6d} K={K:5d}  cuBLAS {cublas:6.2f} us  best "
              + ", ".join(f"{t:6.2f} us (BN={bn}, BK={bk}, warps={wp})" for t, bn, bk, wp in best)
              + f"  bytes/4 TB/s {floor:.2f} us")


if __name__ == "__main__":
    main()
