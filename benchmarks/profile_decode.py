"""Where the time of one forward goes: the CUDA kernels of an eager decoding step (the step a CUDA graph
replays; --tokens 1) or of a prefill (--tokens 4096), by total time, with the graph replay time and the forward's
wall time for comparison, then the host-side ops by their own CPU time (what launching costs).

    python benchmarks/profile_decode.py [--shape 0.4B] [--batch 1] [--tokens 1]
"""

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import needs  # noqa: E402
from bench_generate import SHAPES, build_ours, step_time, sync_time  # noqa: E402


@torch.no_grad()
def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="0.4B", choices=SHAPES, help="a released model shape (default 0.4B)")
    parser.add_argument("--batch", type=int, default=1, help="rows (default 1)")
    parser.add_argument("--tokens", type=int, default=1, help="tokens per row: 1 profiles a decoding step (default), "
                        "more a prefill")
    args = parser.parse_args()
    needs.cuda_gpu("profile_decode.py")
    model = build_ours(args.shape)
    print(f"graph replay step: {step_time(model, args.batch) * 1e3:.3f} ms")
    cache = model(torch.randint(1, 65000, (args.batch, 16), device="cuda"), use_cache=True).cache
    tokens = torch.randint(1, 65000, (args.batch, args.tokens), device="cuda")

    model.set_implementation("triton")  # eager steps, no CUDA graph

    def forward():
        model(tokens, cache=cache, logits_to_keep=1)

    for _ in range(3):
        forward()
    wall = sorted(sync_time(forward)[0] for _ in range(5))[2]
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        forward()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    total_us = sum(e.device_time_total for e in events)
    count = sum(e.count for e in events)
    print(f"eager forward of {args.tokens} token(s): {count} kernels, {total_us / 1e3:.3f} ms of kernel time, "
          f"{wall * 1e3:.3f} ms wall (more wall than kernel time: the CPU launching them is the bound)")
    for e in sorted(events, key=lambda e: -e.device_time_total)[:25]:
        print(f"{e.count:5d} x {e.device_time_total / max(e.count, 1):7.2f} us  {e.key[:110]}")
    host = [e for e in prof.key_averages() if e.device_type.name == "CPU"]
    print(f"host side: {sum(e.count for e in host)} ops, by self time")
    for e in sorted(host, key=lambda e: -e.self_cpu_time_total)[:15]:
        print(f"{e.count:5d} x {e.self_cpu_time_total / max(e.count, 1):7.2f} us  {e.key[:110]}")


if __name__ == "__main__":
    main()
