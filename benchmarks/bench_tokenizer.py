"""Load time, encode throughput and short-input latency: this package's RWKV7Tokenizer vs the official rwkv
TRIE_TOKENIZER.

The two implementations are timed in alternation, round after round, on the same inputs in one process, so that the
noise of a shared machine hits both alike; the reported ratio is the median of the per-round ratios (with the
range over rounds).

Usage: python benchmarks/bench_tokenizer.py [--mb 3] [--rounds 7] [--short 1000]
"""

import argparse
import os
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def corpus(mb):
    rng = random.Random(0)
    parts = []
    for p in sorted(Path(sys.modules["transformers"].__file__).parent.glob("*.py"))[:40]:
        parts.append(p.read_text(encoding="utf-8"))  # code
    parts += [
        "The quick brown fox jumps over the lazy dog. It was a bright cold day in April. " * 200,
        "中文测试：今天天气很好，我们去公园散步吧。人工智能正在改变世界。" * 300,
        "日本語のテキストです。한국어 텍스트입니다. Русский текст. العربية " * 200,
        "emoji 😀 👍🏽 👨‍👩‍👧‍👦 🇯🇵 " * 300,
        "".join(chr(rng.randrange(0x20, 0x3000)) for _ in range(50000)),
    ]
    text = "\n\n".join(parts)
    reps = max(1, int(mb * 1e6 / len(text.encode("utf-8"))) + 1)
    text = (text * reps)[: int(mb * 1e6)]
    return text


def chat_strings(text, count):
    """Chat-sized prompts: "User: <snippet>\\n\\nAssistant:" with snippets of 5..300 characters of the corpus."""
    rng = random.Random(1)
    out = []
    for _ in range(count):
        i = rng.randrange(len(text) - 300)
        out.append(f"User: {text[i : i + rng.randrange(5, 300)]}\n\nAssistant:")
    return out


def timed(f):
    t = time.perf_counter()
    out = f()
    return time.perf_counter() - t, out


def rounds(fns, n):
    """Times every function once per round, in a rotating order; returns the per-round times of each."""
    times = [[] for _ in fns]
    for r in range(n):
        for k in range(len(fns)):
            i = (k + r) % len(fns)
            times[i].append(timed(fns[i])[0])
    return times


def summary(t_off, t_ours):
    ratios = [a / b for a, b in zip(t_off, t_ours)]
    return statistics.median(ratios), min(ratios), max(ratios)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=3.0, help="megabytes of text to encode (default 3)")
    ap.add_argument("--rounds", type=int, default=7, help="timed rounds; the median is reported (default 7)")
    ap.add_argument("--short", type=int, default=1000, help="number of chat-sized strings")
    args = ap.parse_args()
    import transformers  # noqa: F401  (imported before timing loads)
    from rwkv import rwkv_tokenizer
    from tokenization_rwkv7 import RWKV7Tokenizer

    official_vocab = os.path.join(os.path.dirname(rwkv_tokenizer.__file__), "rwkv_vocab_v20230424.txt")
    t_off_load, official = timed(lambda: rwkv_tokenizer.TRIE_TOKENIZER(official_vocab))
    loads = [timed(lambda: RWKV7Tokenizer.from_pretrained(str(ROOT)))[0] for _ in range(5)]
    tok = RWKV7Tokenizer.from_pretrained(str(ROOT))
    print(f"transformers {transformers.__version__}")
    print(f"load: official TRIE_TOKENIZER {t_off_load:.2f} s | RWKV7Tokenizer.from_pretrained median "
          f"{statistics.median(loads):.3f} s (min {min(loads):.3f}, max {max(loads):.3f}, 5 loads)")

    # Throughput on one long text. Every timing includes the str -> UTF-8 step where the API takes str.
    text = corpus(args.mb)
    nbytes = len(text.encode("utf-8"))
    ids = official.encode(text)
    assert tok.encode(text) == ids and tok(text)["input_ids"] == ids, "encodings differ"
    fns = [lambda: official.encode(text), lambda: tok.encode(text), lambda: tok(text),
           lambda: tok.encode_bytes(text.encode("utf-8"))]
    t_off, *t_ours = rounds(fns, args.rounds)
    print(f"throughput: {nbytes / 1e6:.2f} MB of mixed text, {len(ids)} tokens, {args.rounds} interleaved rounds")
    print(f"  official encode       {nbytes / statistics.median(t_off) / 1e6:6.2f} MB/s (median round)")
    for name, t in zip(["tokenizer.encode(text)", "tokenizer(text)", "encode_bytes"], t_ours):
        med, lo, hi = summary(t_off, t)
        print(f"  {name:22s}{nbytes / statistics.median(t) / 1e6:6.2f} MB/s   {med:5.1f}x official "
              f"(median of per-round ratios; range {lo:.1f}-{hi:.1f}x)")

    # Latency on many short (chat-sized) strings, one call each.
    prompts = chat_strings(text, args.short)
    assert [tok.encode(p) for p in prompts] == [official.encode(p) for p in prompts], "encodings differ"
    mean_bytes = sum(len(p.encode("utf-8")) for p in prompts) / len(prompts)
    fns = [lambda: [official.encode(p) for p in prompts], lambda: [tok.encode(p) for p in prompts],
           lambda: [tok(p) for p in prompts]]
    t_off, *t_ours = rounds(fns, args.rounds)
    us = lambda t: statistics.median(t) / len(prompts) * 1e6  # noqa: E731
    print(f"short inputs: {len(prompts)} chat prompts of {mean_bytes:.0f} bytes on average, one call each")
    print(f"  official encode       {us(t_off):6.1f} us per string")
    for name, t in zip(["tokenizer.encode(text)", "tokenizer(text)"], t_ours):
        med, lo, hi = summary(t_off, t)
        print(f"  {name:22s}{us(t):6.1f} us per string   {med:5.2f}x official (range {lo:.2f}-{hi:.2f}x)")
    hello = [lambda: [official.encode("Hello world") for _ in range(1000)],
             lambda: [tok.encode("Hello world") for _ in range(1000)],
             lambda: [tok("Hello world") for _ in range(1000)]]
    h = [statistics.median(t) * 1e3 for t in rounds(hello, args.rounds)]
    print(f'  "Hello world": official {h[0]:.1f} us, tokenizer.encode {h[1]:.1f} us, tokenizer(text) {h[2]:.1f} us')


if __name__ == "__main__":
    main()
