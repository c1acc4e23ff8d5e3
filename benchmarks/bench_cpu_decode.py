"""CPU decoding speed: this package's PyTorch path against the official `rwkv` package (strategy "cpu fp32").

Same random weights (official .pth layout, converted for ours), same shape, same machine, one token per call
with the state carried:

    python benchmarks/bench_cpu_decode.py [--shape 0.1B] [--tokens 64] [--threads N]
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ["RWKV_V7_ON"] = "1"  # read by the rwkv package at import time

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from official import official_model, random_official_weights, to_fla  # noqa: E402

from configuration_rwkv7 import RWKV7Config  # noqa: E402
from modeling_rwkv7 import RWKV7ForCausalLM  # noqa: E402

SHAPES = {"0.1B": dict(hidden=768, layers=12, ranks=(64, 64, 32, 128)), "0.4B": dict(hidden=1024, layers=24, ranks=(64, 64, 32, 128))}


def per_token_seconds(step, tokens):
    step(0)  # warm up
    start = time.perf_counter()
    for t in range(tokens):
        step(t)
    return (time.perf_counter() - start) / tokens


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="0.1B", choices=SHAPES)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    official_sd = random_official_weights(vocab=65536, **SHAPES[args.shape])
    with tempfile.TemporaryDirectory() as tmp:
        official = official_model(official_sd, tmp)
    config, state = to_fla(official_sd)
    ours = RWKV7ForCausalLM(RWKV7Config(**config)).eval()
    ours.load_state_dict(state)
    del official_sd, state

    tokens = torch.randint(0, 65536, (args.tokens + 1,)).tolist()
    official_state = [None]

    def official_step(t):
        _, official_state[0] = official.forward([tokens[t]], official_state[0])

    cache = [None]

    @torch.no_grad()
    def our_step(t):
        cache[0] = ours(torch.tensor([[tokens[t]]]), past_key_values=cache[0], use_cache=True).past_key_values

    official_s = per_token_seconds(official_step, args.tokens)
    ours_s = per_token_seconds(our_step, args.tokens)
    print(f"{args.shape}, fp32, {args.threads} threads, torch {torch.__version__}")
    print("| implementation | ms / token | tokens / s |")
    print("|---|---|---|")
    print(f"| official rwkv 0.8.32 (cpu fp32) | {official_s * 1e3:.1f} | {1 / official_s:.1f} |")
    print(f"| this package (PyTorch path) | {ours_s * 1e3:.1f} | {1 / ours_s:.1f} |")
    print(f"ours / official speed: {official_s / ours_s:.2f}x")


if __name__ == "__main__":
    main()
