"""Training step speed and memory of this package against flash-linear-attention's RWKV7ForCausalLM.

Both models are built from the same random weights of a released shape (bf16 parameters) and timed in the same
process on the same GPU. One step is `model(input_ids=ids, labels=ids).loss.backward()`; the time is the median of
4 steps after 2 warm-ups, and the peak is the most memory allocated during a step, the weights of both models
included (both stay on the GPU). The two models' timed steps alternate, so that a drift of the machine's speed
during a run moves both alike. Rows:
  - full fine-tuning at 0.4B 4 x 4096 and 16 x 1024, 1.5B 2 x 4096;
  - ours with gradient checkpointing (model.gradient_checkpointing_enable()), against fla without;
  - LoRA fine-tuning (PEFT, rank 16 on r/k/v/o_proj, key and value, the base frozen), both models the same config.

    python benchmarks/bench_train.py                  # every row; needs a CUDA GPU and flash-linear-attention
    python benchmarks/bench_train.py --profile        # also the CUDA kernels of one step of each, by time

Prints a markdown table with the ratios, the GPU and the versions.
"""

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

import needs  # noqa: E402
from bench_generate import build_fla, build_ours  # noqa: E402

ROWS = [  # (shape, batch, tokens, variant)
    ("0.4B", 4, 4096, "full"),
    ("0.4B", 16, 1024, "full"),
    ("1.5B", 2, 4096, "full"),
    ("0.4B", 4, 4096, "checkpointing"),
    ("0.4B", 4, 4096, "lora"),
]


def step(model, ids):
    model(input_ids=ids, labels=ids).loss.backward()


def measure(models, ids, steps=4, warmup=2):
    """{name: (median seconds of a step, peak GiB allocated during a step)}, the models' timed steps alternating."""
    for name, model in models.items():  # the first steps compile the kernels (fla's also torch.compile): minutes
        start = time.perf_counter()
        for _ in range(warmup):
            step(model, ids)
            model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        print(f"  {name}: {warmup} warm-up steps in {time.perf_counter() - start:.0f} s", flush=True)
    times, peaks = {name: [] for name in models}, {name: [] for name in models}
    for _ in range(steps):
        for name, model in models.items():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step(model, ids)
            end.record()
            end.synchronize()
            times[name].append(start.elapsed_time(end) / 1e3)
            peaks[name].append(torch.cuda.max_memory_allocated() / 2**30)
            model.zero_grad(set_to_none=True)
    return {name: (statistics.median(times[name]), max(peaks[name])) for name in models}


def with_lora(model):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=16, lora_alpha=32, target_modules=["r_proj", "k_proj", "v_proj", "o_proj", "key", "value"])
    return get_peft_model(model, config)


def profile(model, ids, label):
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    step(model, ids)
    model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        step(model, ids)
        torch.cuda.synchronize()
    model.zero_grad(set_to_none=True)
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    total = sum(e.device_time_total for e in events)
    print(f"\n{label}: {len(events)} kernel kinds, {sum(e.count for e in events)} launches, {total / 1e3:.1f} ms")
    for e in sorted(events, key=lambda e: -e.device_time_total)[:15]:
        print(f"  {e.device_time_total / 1e3:8.2f} ms {100 * e.device_time_total / total:5.1f}%  {e.count:5d} x  "
              f"{e.key[:100]}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="all", help="comma-separated row numbers (0-based) of the table, or all")
    parser.add_argument("--profile", action="store_true", help="also list one step's CUDA kernels by time")
    parser.add_argument("--json", type=Path, help="also write the raw numbers to this file")
    args = parser.parse_args()
    needs.cuda_gpu("bench_train.py")
    fla = needs.fla("bench_train.py")
    import transformers
    import triton

    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, transformers "
          f"{transformers.__version__}, fla {fla.__version__}", flush=True)
    chosen = ROWS if args.rows == "all" else [ROWS[int(i)] for i in args.rows.split(",")]
    results = []
    for shape in dict.fromkeys(row[0] for row in chosen):  # each shape's two models built once
        torch.cuda.empty_cache()
        ours = build_ours(shape).train()
        bases = {"ours": ours, "fla": build_fla(ours).train()}
        for _, batch, tokens, variant in [row for row in chosen if row[0] == shape]:
            row = {"shape": shape, "batch": batch, "tokens": tokens, "variant": variant}
            models = dict(bases)
            if variant == "lora":
                models = {name: with_lora(copy.deepcopy(base)) for name, base in bases.items()}
            if variant == "checkpointing":
                models["ours"].gradient_checkpointing_enable()
            ids = torch.randint(1, 65000, (batch, tokens), device="cuda",
                                generator=torch.Generator("cuda").manual_seed(0))
            for name, (seconds, peak) in measure(models, ids).items():
                row[f"{name}_s"], row[f"{name}_peak_gib"] = seconds, peak
                if args.profile and variant == "full":
                    profile(models[name], ids, f"{name}, {shape} {batch} x {tokens}")
            if variant == "checkpointing":
                models["ours"].gradient_checkpointing_disable()
            del models
            print(json.dumps(row), flush=True)
            results.append(row)
        del ours, bases

    print("\n| shape | batch x tokens | variant | fla tok/s | fla peak GiB | ours tok/s | ours peak GiB | "
          "speed ours / fla | peak ours / fla |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        n = r["batch"] * r["tokens"]
        print(f"| {r['shape']} | {r['batch']} x {r['tokens']} | {r['variant']} | {n / r['fla_s']:,.0f} | "
              f"{r['fla_peak_gib']:.1f} | {n / r['ours_s']:,.0f} | {r['ours_peak_gib']:.1f} | "
              f"{r['fla_s'] / r['ours_s']:.2f}x | {r['ours_peak_gib'] / r['fla_peak_gib']:.2f}x |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
