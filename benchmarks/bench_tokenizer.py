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


def best_of(f, n=3):
    best, out = float("inf"), None
    for _ in range(n):
        t = time.perf_counter()
        out = f()
        best = min(best, time.perf_counter() - t)
    return best, out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=3.0)
    args = ap.parse_args()
    import transformers  # noqa: F401  (imported before timing loads)
    from rwkv import rwkv_tokenizer
    from tokenization_rwkv7 import RWKV7Tokenizer

    official_vocab = os.path.join(os.path.dirname(rwkv_tokenizer.__file__), "rwkv_vocab_v20230424.txt")
    t_off, official = best_of(lambda: rwkv_tokenizer.TRIE_TOKENIZER(official_vocab), 1)
    t_ours, tok = best_of(lambda: RWKV7Tokenizer.from_pretrained(str(ROOT)))
    text = corpus(args.mb)
    nbytes = len(text.encode("utf-8"))
    e_off, ids_off = best_of(lambda: official.encode(text), 1)
    e_ours, ids_ours = best_of(lambda: tok.encode(text))
    e_raw, _ = best_of(lambda: tok.encode_bytes(text.encode("utf-8")))
    assert ids_ours == ids_off, "encodings differ"
    print(f"transformers {transformers.__version__}, text {nbytes / 1e6:.2f} MB, {len(ids_off)} tokens")
    print(f"load:   official TRIE_TOKENIZER {t_off:.3f} s | RWKV7Tokenizer.from_pretrained {t_ours:.3f} s")
    print(f"encode: official {nbytes / e_off / 1e6:.2f} MB/s | tokenizer.encode {nbytes / e_ours / 1e6:.2f} MB/s "
          f"| encode_bytes {nbytes / e_raw / 1e6:.2f} MB/s")
    print(f"ratio (tokenizer.encode / official): {e_off / e_ours:.2f}x; encode_bytes / official: {e_off / e_raw:.2f}x")


if __name__ == "__main__":
    main()
