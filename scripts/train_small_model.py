"""Trains the small English RWKV-7 in models/rwkv7-tiny-english/ on one CUDA GPU, with this package's own training
path (RWKV7ForCausalLM, its chunked WKV-7 kernel and its chunked loss), from the corpus of prepare_corpus.py.

    .venv/bin/python scripts/prepare_corpus.py                 # the corpus, into .cache/corpus/ (about 10 s)
    python scripts/train_small_model.py                        # on a machine with a CUDA GPU (a few minutes)

The model: the World vocabulary (65,536 rows), width 128 (two heads of 64), 12 layers, LoRA ranks 16/16/8/32,
channel-mix width 512: 38 MB of bf16 weights, most of them the embedding and the head. Training: float32 weights
(TF32 matrix products), AdamW (betas 0.9, 0.95, weight decay 0.01 on matrices), a linear warm-up then a cosine
decay of the learning rate, windows of 512 tokens drawn at random from the corpus, seed 0. The held-out loss is
measured every `--eval-every` steps and the best weights are kept (the corpus is small and is seen many times).

Writes into --out: config.json and model.safetensors (bf16), nothing else (the demo and the tests add this
checkout's code and tokenizer); and into --log: training.json (the losses, the settings, the time), and
loss_curve.png when matplotlib is installed.
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from configuration_rwkv7 import RWKV7Config  # noqa: E402
from hub_tools.files import AUTO_MAP  # noqa: E402
from modeling_rwkv7 import RWKV7ForCausalLM  # noqa: E402

SHAPE = dict(vocab_size=65536, hidden_size=128, num_hidden_layers=12, head_dim=64, intermediate_size=512,
             decay_low_rank_dim=16, a_low_rank_dim=16, v_low_rank_dim=8, gate_low_rank_dim=32)


def windows(tokens, batch, length, generator):
    """`batch` random windows of `length` tokens [batch, length], int64."""
    starts = torch.randint(0, len(tokens) - length, (batch,), generator=generator)
    return torch.stack([tokens[s : s + length] for s in starts.tolist()])


@torch.no_grad()
def heldout_loss(model, tokens, length, device):
    """Mean next-token loss over the held-out tokens, in windows of `length` (each window's first token is
    predicted from nothing, as a fresh document's)."""
    model.eval()
    usable = len(tokens) // length * length
    ids = tokens[:usable].view(-1, length).to(device)
    total, count = 0.0, 0
    for rows in ids.split(64):
        loss = model(input_ids=rows, labels=rows).loss
        total += loss.item() * rows.shape[0] * (length - 1)
        count += rows.shape[0] * (length - 1)
    model.train()
    return total / count


def learning_rate(step, steps, peak, warmup):
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO / ".cache" / "corpus",
                        help="the folder prepare_corpus.py wrote (train.npy, heldout.npy, manifest.json)")
    parser.add_argument("--out", type=Path, default=REPO / "models" / "rwkv7-tiny-english",
                        help="where the model is written (config.json, model.safetensors)")
    parser.add_argument("--log", type=Path, default=REPO / "docs", help="where training.json and the plot go")
    parser.add_argument("--steps", type=int, default=3000, help="optimizer steps (default 3000)")
    parser.add_argument("--batch", type=int, default=32, help="windows a step (default 32)")
    parser.add_argument("--length", type=int, default=512, help="tokens a window (default 512)")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (default 3e-3)")
    parser.add_argument("--warmup", type=int, default=150, help="warm-up steps (default 150)")
    parser.add_argument("--eval-every", type=int, default=250, help="steps between held-out losses (default 250)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and of the windows (default 0)")
    parser.add_argument("--device", default="cuda", help="cuda (the default), or cpu for a smoke test")
    parser.add_argument("--max-seconds", type=float, help="stop training after this long (the best weights are kept)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("train_small_model.py trains on a CUDA GPU, and this machine has none (--device cpu for a smoke test)")

    torch.backends.cuda.matmul.allow_tf32 = True
    torch.manual_seed(args.seed)
    train = torch.from_numpy(np.load(args.data / "train.npy").astype(np.int64))
    heldout = torch.from_numpy(np.load(args.data / "heldout.npy").astype(np.int64))
    manifest = json.loads((args.data / "manifest.json").read_text())
    config = RWKV7Config(**SHAPE, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model = RWKV7ForCausalLM(config).to(args.device).train()
    matrices = [p for n, p in model.named_parameters() if p.dim() == 2 and "embeddings" not in n]
    others = [p for n, p in model.named_parameters() if not (p.dim() == 2 and "embeddings" not in n)]
    optimizer = torch.optim.AdamW([{"params": matrices, "weight_decay": 0.01}, {"params": others, "weight_decay": 0.0}],
                                  lr=args.lr, betas=(0.9, 0.95), fused=args.device == "cuda")
    generator = torch.Generator().manual_seed(args.seed)

    def shown(value):  # paths relative to the checkout, as the docs give them
        return str(value.resolve().relative_to(REPO)) if isinstance(value, Path) and value.resolve().is_relative_to(REPO) else str(value)

    log = {"settings": {k: shown(v) for k, v in vars(args).items()}, "shape": SHAPE, "corpus": manifest["packages"],
           "train_tokens": len(train), "heldout_tokens": len(heldout), "train": [], "heldout": []}
    best, best_state = float("inf"), None
    start = time.perf_counter()
    for step in range(args.steps + 1):
        if step % args.eval_every == 0 or step == args.steps:
            loss = heldout_loss(model, heldout, args.length, args.device)
            log["heldout"].append({"step": step, "loss": loss, "seconds": time.perf_counter() - start})
            print(f"step {step}: held-out loss {loss:.4f} (perplexity {math.exp(loss):.1f})", flush=True)
            if loss < best:
                best, best_state = loss, {k: v.detach().to("cpu", torch.bfloat16) for k, v in model.state_dict().items()}
        if step == args.steps or (args.max_seconds and time.perf_counter() - start > args.max_seconds):
            break
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.steps, args.lr, args.warmup)
        ids = windows(train, args.batch, args.length, generator).to(args.device)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 50 == 0:
            log["train"].append({"step": step, "loss": loss.item()})
    seconds = time.perf_counter() - start

    args.out.mkdir(parents=True, exist_ok=True)
    model.load_state_dict(best_state)
    config.architectures = ["RWKV7ForCausalLM"]
    config.auto_map = dict(AUTO_MAP)
    saved = {**config.to_diff_dict(), "dtype": "bfloat16", "torch_dtype": "bfloat16"}  # torch_dtype: transformers < 4.56
    (args.out / "config.json").write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in best_state.items()}, str(args.out / "model.safetensors"),
              metadata={"format": "pt"})
    unigram = manifest["heldout_unigram_cross_entropy_nats"]
    log.update(seconds=seconds, steps_done=step, best_heldout_loss=best, best_heldout_perplexity=math.exp(best),
               unigram_heldout_loss=unigram, gpu=torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
               torch=torch.__version__)
    args.log.mkdir(parents=True, exist_ok=True)
    (args.log / "training.json").write_text(json.dumps(log, indent=1))
    print(f"{seconds:.0f} s; best held-out loss {best:.4f} (perplexity {math.exp(best):.1f}); unigram: {unigram}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    figure, axes = plt.subplots(figsize=(7, 4))
    axes.plot([p["step"] for p in log["train"]], [p["loss"] for p in log["train"]], label="train (one batch)")
    axes.plot([p["step"] for p in log["heldout"]], [p["loss"] for p in log["heldout"]], "o-", label="held-out")
    if unigram:
        axes.axhline(unigram, color="gray", linestyle="--", label="unigram model, held-out")
    axes.set_xlabel("step")
    axes.set_ylabel("loss (nats / token)")
    axes.set_title(f"rwkv7-tiny-english: best held-out perplexity {math.exp(best):.1f}")
    axes.legend()
    figure.tight_layout()
    figure.savefig(args.log / "loss_curve.png", dpi=100)


if __name__ == "__main__":
    main()
