"""Generation speed of this package against flash-linear-attention's RWKV7ForCausalLM (what fla-hub users run).

Both models are built from the same random weights of a released shape (bf16) and timed in the same process:
  - decode through `model.generate` (greedy, min_new_tokens = max_new_tokens, so every run makes them all),
    at batch 1 and batch 32;
  - one decoding step outside generate (model forward of 1 token with a cache), against the memory-bandwidth floor:
    the bytes one step must read (every weight but the embedding table, plus the states read and written) at the
    device-to-device copy bandwidth measured in the same run;
  - prefill of 4096 tokens at batch 1 (logits of the last position only).

    python benchmarks/bench_generate.py                      # 0.4B and 1.5B shapes, ours and fla
    python benchmarks/bench_generate.py --cold-start         # first prefill and first generate, fresh process
    pip install flash-linear-attention fla-core               # the peer; --no-fla to time ours alone

Prints a markdown table; --json writes the raw numbers.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

import needs  # noqa: E402
from configuration_rwkv7 import RWKV7Config  # noqa: E402
from modeling_rwkv7 import RWKV7ForCausalLM  # noqa: E402

SHAPES = {  # released fla-hub shapes (World vocabulary)
    "0.4B": dict(hidden_size=1024, num_hidden_layers=24, intermediate_size=4096, decay_low_rank_dim=64,
                 a_low_rank_dim=64, v_low_rank_dim=32, gate_low_rank_dim=128),
    "1.5B": dict(hidden_size=2048, num_hidden_layers=24, intermediate_size=8192, decay_low_rank_dim=96,
                 a_low_rank_dim=96, v_low_rank_dim=64, gate_low_rank_dim=256),
    "0.1B": dict(hidden_size=768, num_hidden_layers=12, intermediate_size=3072, decay_low_rank_dim=64,
                 a_low_rank_dim=64, v_low_rank_dim=32, gate_low_rank_dim=128),
}


def build_ours(shape, dtype=torch.bfloat16, device="cuda"):
    """A model of a released shape with random weights, initialised on the GPU (seconds, not minutes on a CPU)."""
    torch.manual_seed(0)
    config = RWKV7Config(vocab_size=65536, head_dim=64, **SHAPES[shape], bos_token_id=0, eos_token_id=0,
                         pad_token_id=0)
    with torch.device(device):
        model = RWKV7ForCausalLM(config)
    return model.to(dtype).eval()


def build_fla(ours):
    from fla.models import RWKV7Config as FlaConfig
    from fla.models import RWKV7ForCausalLM as FlaForCausalLM

    c = ours.config
    config = FlaConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_hidden_layers,
                       head_dim=c.head_dim, intermediate_size=c.intermediate_size,
                       decay_low_rank_dim=c.decay_low_rank_dim, a_low_rank_dim=c.a_low_rank_dim,
                       v_low_rank_dim=c.v_low_rank_dim, gate_low_rank_dim=c.gate_low_rank_dim,
                       bos_token_id=0, eos_token_id=0, pad_token_id=0)
    with torch.device(ours.device):  # its random initialisation is overwritten; on a CPU it takes minutes at 1.5B
        fla = FlaForCausalLM(config)
    fla.to(ours.dtype).eval()
    fla.load_state_dict(ours.state_dict(), strict=True)
    return fla


def sync_time(fn):
    torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start, result


def copy_bandwidth():
    """Device-to-device copy bandwidth, bytes read plus bytes written per second."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = [sync_time(lambda: dst.copy_(src))[0] for _ in range(10)]
    return 2 * src.numel() / sorted(times)[len(times) // 2]


def step_floor_bytes(model, batch):
    """Bytes one decoding step must move: every weight but the embedding table (only `batch` rows of it), and
    the recurrent state read and written."""
    c = model.config
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    embedding = model.get_input_embeddings().weight
    weights += (batch - embedding.shape[0]) * embedding.shape[1] * embedding.element_size()
    state = batch * c.num_hidden_layers * (c.num_heads * c.head_dim**2 * 4 + 2 * c.hidden_size * 2)
    return weights + 2 * state


@torch.no_grad()
def decode_rate(model, batch, new_tokens, prompt_len=16):
    ids = torch.randint(1, 65000, (batch, prompt_len), device="cuda")
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                  eos_token_id=None)
    model.generate(ids, **{**kwargs, "max_new_tokens": 4, "min_new_tokens": 4})  # warm up (kernels, graphs)
    seconds, out = sync_time(lambda: model.generate(ids, **kwargs))
    assert out.shape[1] == prompt_len + new_tokens
    return batch * new_tokens / seconds


def returned_cache(output):
    """The cache a forward returned: `cache` from transformers 5.24 on, `past_key_values` before (fla's model)."""
    return output["cache"] if "cache" in output else output["past_key_values"]


@torch.no_grad()
def step_time(model, batch, repeats=50):
    ids = torch.randint(1, 65000, (batch, 16), device="cuda")
    cache = returned_cache(model(ids, use_cache=True))
    token = ids[:, -1:]
    for _ in range(3):
        model(token, past_key_values=cache, use_cache=True)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        model(token, past_key_values=cache, use_cache=True)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


@torch.no_grad()
def prefill_rate(model, length=4096, repeats=5):
    ids = torch.randint(1, 65000, (1, length), device="cuda")
    model(ids, use_cache=True, logits_to_keep=1)
    times = [sync_time(lambda: model(ids, use_cache=True, logits_to_keep=1))[0] for _ in range(repeats)]
    return length / sorted(times)[len(times) // 2]


def cold_start(shape):
    """First prefill and first generate of a fresh process with an empty Triton cache, seconds from start."""
    code = f"""
import sys, time
start = time.perf_counter()
sys.path.insert(0, {str(REPO / 'benchmarks')!r})
import torch
from bench_generate import build_ours
model = build_ours({shape!r})
built = time.perf_counter()
ids = torch.randint(1, 65000, (1, 512), device="cuda")
with torch.no_grad():
    model(ids, use_cache=True, logits_to_keep=1)
torch.cuda.synchronize()
prefill = time.perf_counter()
model.generate(ids, max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=0, eos_token_id=None)
torch.cuda.synchronize()
done = time.perf_counter()
print(built - start, prefill - built, done - prefill)
"""
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "TRITON_CACHE_DIR": cache}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    build, prefill, generate = map(float, out.stdout.split()[-3:])
    return {"build_s": build, "first_prefill_s": prefill, "first_generate_s": generate}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="0.4B,1.5B", help=f"comma-separated, of {', '.join(SHAPES)} (default 0.4B,1.5B)")
    parser.add_argument("--new-tokens", type=int, default=256, help="tokens each of our decode runs makes (default 256)")
    parser.add_argument("--fla-new-tokens", type=int, default=64, help="fla decodes slowly; its rate per token is flat")
    parser.add_argument("--no-fla", action="store_true", help="time ours alone (no flash-linear-attention needed)")
    parser.add_argument("--cold-start", action="store_true", help="time a fresh process's first prefill and generate")
    parser.add_argument("--json", type=Path, help="also write the raw numbers to this file")
    args = parser.parse_args()
    needs.cuda_gpu("bench_generate.py")

    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    import transformers
    import triton

    results.update(transformers=transformers.__version__, triton=triton.__version__)
    if not args.no_fla:
        results["fla"] = needs.fla("bench_generate.py").__version__
    if args.cold_start:
        results["cold_start"] = {shape: cold_start(shape) for shape in args.shapes.split(",")}
        print(json.dumps(results, indent=2))
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))
        return

    bandwidth = copy_bandwidth()
    results["copy_bandwidth_GBps"] = bandwidth / 1e9
    rows = []
    for shape in args.shapes.split(","):
        ours = build_ours(shape)
        models = {"ours": ours} if args.no_fla else {"ours": ours, "fla": build_fla(ours)}
        for name, model in models.items():
            new_tokens = args.new_tokens if name == "ours" else args.fla_new_tokens
            r = {"shape": shape, "model": name}
            r["prefill_4096_tok_s"] = prefill_rate(model)
            for batch in (1, 32):
                r[f"decode_b{batch}_tok_s"] = decode_rate(model, batch, new_tokens)
            r["step_b1_ms"] = step_time(model, 1) * 1e3
            r["floor_b1_ms"] = step_floor_bytes(ours, 1) / bandwidth * 1e3
            rows.append(r)
            print(json.dumps(r), flush=True)
        del models, ours
        torch.cuda.empty_cache()
    results["rows"] = rows

    print(f"\n{results['gpu']}, torch {results['torch']}, triton {results['triton']}, "
          f"transformers {results['transformers']}, fla {results.get('fla', '-')}, "
          f"copy bandwidth {bandwidth / 1e9:.0f} GB/s\n")
    print("| shape | measure | fla | ours | ours faster by |")
    print("|---|---|---|---|---|")
    for shape in args.shapes.split(","):
        by = {r["model"]: r for r in rows if r["shape"] == shape}
        for key, label, higher_is_better in [
            ("decode_b1_tok_s", "decode, batch 1, generate (tok/s)", True),
            ("decode_b32_tok_s", "decode, batch 32, generate (tok/s)", True),
            ("prefill_4096_tok_s", "prefill 4096 tokens (tok/s)", True),
            ("step_b1_ms", "one decode step, batch 1 (ms)", False),
        ]:
            mine, theirs = by["ours"][key], by.get("fla", {}).get(key)
            speedup = "-" if theirs is None else f"{(mine / theirs if higher_is_better else theirs / mine):.1f}x"
            print(f"| {shape} | {label} | {'-' if theirs is None else f'{theirs:.4g}'} | {mine:.4g} | {speedup} |")
        floor = by["ours"]["floor_b1_ms"]
        print(f"| {shape} | bandwidth floor of one step, batch 1 (ms) | | {floor:.4g} | "
              f"ours at {100 * floor / by['ours']['step_b1_ms']:.0f}% of the floor |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
