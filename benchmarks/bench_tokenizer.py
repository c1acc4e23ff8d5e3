"""Load time and encode throughput: this package's RWKV7Tokenizer vs the official rwkv TRIE_TOKENIZER.

Usage: python benchmarks/bench_tokenizer.py [--mb 3]
"""

import argparse
import os
import random
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


def best_of(f, n):
    best, out = float("inf"), None
    for _ in range(n):
        t = time.perf_counter()
        out = f()
        best = min(best, time.perf_counter() - t)
    return best, out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=3.0)
    ap.add_argument("--repeat", type=int, default=3, help="best of this many runs, for every timing")
    args = ap.parse_args()
    import transformers  # noqa: F401  (imported before timing loads)
    from rwkv import rwkv_tokenizer
    from tokenization_rwkv7 import RWKV7Tokenizer

    official_vocab = os.path.join(os.path.dirname(rwkv_tokenizer.__file__), "rwkv_vocab_v20230424.txt")
    r = args.repeat
    t_off, official = best_of(lambda: rwkv_tokenizer.TRIE_TOKENIZER(official_vocab), r)
    t_ours, tok = best_of(lambda: RWKV7Tokenizer.from_pretrained(str(ROOT)), r)
    text = corpus(args.mb)
    nbytes = len(text.encode("utf-8"))
    # The same text for all; each timing includes the str -> UTF-8 step where the API takes str.
    e_off, ids_off = best_of(lambda: official.encode(text), r)
    e_enc, ids_enc = best_of(lambda: tok.encode(text), r)
    e_call, out = best_of(lambda: tok(text), r)
    e_raw, ids_raw = best_of(lambda: tok.encode_bytes(text.encode("utf-8")), r)
    assert ids_enc == ids_off and out["input_ids"] == ids_off and ids_raw == ids_off, "encodings differ"
    mbs = lambda t: f"{nbytes / t / 1e6:.2f} MB/s ({e_off / t:.1f}x)"  # noqa: E731
    print(f"transformers {transformers.__version__}, text {nbytes / 1e6:.2f} MB, {len(ids_off)} tokens, best of {r}")
    print(f"load:   official TRIE_TOKENIZER {t_off:.3f} s | RWKV7Tokenizer.from_pretrained {t_ours:.3f} s")
    print(f"encode: official {nbytes / e_off / 1e6:.2f} MB/s | tokenizer.encode {mbs(e_enc)} | tokenizer(text) "
          f"{mbs(e_call)} | encode_bytes {mbs(e_raw)}")


if __name__ == "__main__":
    main()
