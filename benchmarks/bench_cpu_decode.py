"""CPU decoding speed: this package's PyTorch path against the official `rwkv` package (strategy "cpu fp32").

Same random weights (official .pth layout, converted for ours), same shape, same machine, same thread count, one
token per call with the state carried. The two alternate in short rounds of --tokens steps (which one goes
first alternates too), so that load from other processes on a shared machine hits both alike; the table gives
the median over rounds of each one's ms / token and the median of the per-round speed ratios:

    python benchmarks/bench_cpu_decode.py [--shape 0.1B] [--tokens 8] [--rounds 31] [--threads N]
"""

import argparse
import os
import statistics
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
    start = time.perf_counter()
    for token in tokens:
        step(token)
    return (time.perf_counter() - start) / len(tokens)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="0.1B", choices=SHAPES, help="a released model shape (default 0.1B)")
    parser.add_argument("--tokens", type=int, default=8, help="decoding steps per round (default 8)")
    parser.add_argument("--rounds", type=int, default=31, help="rounds, alternating the two models (default 31)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch CPU threads (default: torch's default here)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    official_sd = random_official_weights(vocab=65536, **SHAPES[args.shape])
    with tempfile.TemporaryDirectory() as tmp:
        official = official_model(official_sd, tmp)
    config, state = to_fla(official_sd)
    ours = RWKV7ForCausalLM(RWKV7Config(**config)).eval()
    ours.load_state_dict(state)
    del official_sd, state

    official_state = [None]

    def official_step(token):
        _, official_state[0] = official.forward([token], official_state[0])

    cache = [None]

    @torch.no_grad()
    def our_step(token):
        cache[0] = ours(torch.tensor([[token]]), cache=cache[0], use_cache=True).cache

    steps = {"official": official_step, "ours": our_step}
    for step in steps.values():  # warm up: TorchScript profiling runs, first allocations
        per_token_seconds(step, [0, 1, 2])
    seconds = {name: [] for name in steps}
    for round in range(args.rounds):
        tokens = torch.randint(0, 65536, (args.tokens,)).tolist()
        for name in list(steps)[:: 1 if round % 2 == 0 else -1]:
            seconds[name].append(per_token_seconds(steps[name], tokens))
    ratios = [o / s for o, s in zip(seconds["official"], seconds["ours"])]

    print(f"{args.shape}, fp32, {args.threads} threads, torch {torch.__version__}, "
          f"{args.rounds} rounds of {args.tokens} tokens, load average {os.getloadavg()[0]:.2f}")
    print("| implementation | ms / token (median) | tokens / s | ms / token, each round |")
    print("|---|---|---|---|")
    for name, label in (("official", "official rwkv 0.8.32 (cpu fp32)"), ("ours", "this package (PyTorch path)")):
        median = statistics.median(seconds[name])
        rounds = " ".join(f"{s * 1e3:.1f}" for s in seconds[name])
        print(f"| {label} | {median * 1e3:.1f} | {1 / median:.1f} | {rounds} |")
    print(f"ours / official speed: {statistics.median(ratios):.2f}x (median of rounds; each round: "
          + " ".join(f"{r:.2f}" for r in ratios) + ")")


if __name__ == "__main__":
    main()
