"""RWKV World tokenizer: exactness against the official TRIE_TOKENIZER, transformers behaviour, loading paths."""

import copy
import io
import json
import os
import random
import shutil
import sys
import threading
import unicodedata
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from helpers import run_python  # noqa: E402
from tokenization_rwkv7 import RWKV7Tokenizer, VOCAB_SHA256_LF, load_rwkv_vocab  # noqa: E402

TOKENIZER_FILES = [
    "tokenization_rwkv7.py",
    "rwkv_vocab_v20230424.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
]


@pytest.fixture(scope="module")
def official():
    from rwkv.rwkv_tokenizer import TRIE_TOKENIZER
    import rwkv.rwkv_tokenizer as m

    return TRIE_TOKENIZER(os.path.join(os.path.dirname(m.__file__), "rwkv_vocab_v20230424.txt"))


@pytest.fixture(scope="module")
def tok():
    return RWKV7Tokenizer(str(ROOT / "rwkv_vocab_v20230424.txt"))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("rwkv7_tokenizer")
    for name in TOKENIZER_FILES:
        shutil.copy(ROOT / name, d / name)
    return d


def _random_codepoint_text(rng, n):
    out = []
    while len(out) < n:
        c = rng.choice(
            [rng.randrange(0x20, 0x7F), rng.randrange(0, 0x20), rng.randrange(0x80, 0x800),
             rng.randrange(0x800, 0xD800), rng.randrange(0xE000, 0x10000), rng.randrange(0x10000, 0x110000)]
        )
        out.append(chr(c))
    return "".join(out)


def build_corpus():
    """Deterministic, varied texts (str)."""
    rng = random.Random(1234)
    texts = [
        "", " ", "\n", "\n\n", "\r\n", "\r\n\r\n\r\n", "a", "Hello world", "<|endoftext|>", "x<|endoftext|>y",
        "The quick brown fox jumps over the lazy dog. " * 20,
        "中文测试：今天天气很好，我们去公园散步吧。人工智能正在改变世界。" * 10,
        "日本語のテキストです。ひらがなとカタカナと漢字。" * 5,
        "한국어 텍스트입니다. 안녕하세요!" * 5,
        "Русский текст: съешь же ещё этих мягких французских булок." * 5,
        "العربية: مرحبا بالعالم" * 5, "עברית: שלום עולם" * 5, "हिन्दी: नमस्ते दुनिया" * 5,
        "ไทย: สวัสดีชาวโลก" * 5, "Ελληνικά: Γειά σου Κόσμε" * 5, "Tiếng Việt: Xin chào thế giới" * 5,
        "emoji 😀😃😄 👍🏽 🇺🇸🇯🇵 👨‍👩‍👧‍👦 🏳️‍🌈 ❤️‍🔥 🧑🏿‍💻" * 5,
        "\x00\x01\x02\x1b[31mred\x1b[0m\x7f\t\v\f" * 5,
        " " * 1000, "\n" * 500, "\t" * 300, " \n" * 200, "\r\n" * 300, "  \n\n \t\t  \r\n\n   " * 30,
        "a" * 3000, "ab" * 1500, "=" * 257, "-" * 400, "0123456789" * 100,
        "def f(x):\n    return {'a': [1, 2, 3], \"b\": x ** 2}  # comment\n\n" * 20,
        "#include <stdio.h>\nint main(void) {\n\tprintf(\"%d\\n\", 42);\n\treturn 0;\n}\n" * 10,
        "<html><body><div class=\"x\">&amp; &lt;</div></body></html>" * 10,
        '{"key": [1, 2.5e-3, null, true], "nested": {"k": "v"}}' * 10,
        "User: hi\n\nAssistant: <think>\n</think>\nHello!\n\n" * 10,
        unicodedata.normalize("NFD", "café naïve résumé") + unicodedata.normalize("NFC", "café naïve résumé"),
    ]
    with open(ROOT / "tokenization_rwkv7.py", encoding="utf-8") as f:
        texts.append(f.read())
    for _ in range(60):
        texts.append(_random_codepoint_text(rng, rng.randrange(1, 400)))
    # glued vocab entries (valid UTF-8 ones), long and short
    tokens = load_rwkv_vocab(str(ROOT / "rwkv_vocab_v20230424.txt"))
    valid = []
    for t in tokens:
        try:
            valid.append(t.decode("utf-8"))
        except UnicodeDecodeError:
            pass
    for _ in range(40):
        texts.append("".join(rng.choice(valid) for _ in range(rng.randrange(1, 300))))
    # glued random entries, including partial-UTF-8 ones, repaired into valid UTF-8 by a complete text around them
    for _ in range(20):
        raw = b"".join(rng.choice(tokens) for _ in range(200))
        texts.append(raw.decode("utf-8", errors="replace"))
    # mixtures of everything
    pool = list(texts)
    for _ in range(30):
        texts.append("".join(rng.choice(pool)[: rng.randrange(0, 200)] for _ in range(10)))
    return texts


def build_raw_corpus():
    """Raw byte strings (not valid UTF-8) for the bytes API."""
    rng = random.Random(99)
    tokens = load_rwkv_vocab(str(ROOT / "rwkv_vocab_v20230424.txt"))
    out = [bytes(range(256)) * 3, bytes(rng.randrange(256) for _ in range(5000))]
    for _ in range(30):
        out.append(b"".join(rng.choice(tokens) for _ in range(rng.randrange(1, 400))))
    return out


CORPUS = build_corpus()


def test_vocab_table_matches_official(tok, official):
    assert tok.vocab_size == 65530 and len(tok) == 65530
    assert all(tok._id_to_bytes[i] == official.idx2token[i] for i in range(1, 65530))
    assert max(map(len, official.idx2token.values())) == 128


def test_exact_ids_against_official(tok, official):
    total = 0
    for text in CORPUS:
        ids = tok.encode(text)
        assert ids == official.encode(text), repr(text[:80])
        total += len(text.encode("utf-8"))
    big = "".join(CORPUS)
    assert tok.encode(big) == official.encode(big)
    assert total > 150_000


def test_exact_bytes_against_official(tok, official):
    for raw in build_raw_corpus():
        assert tok.encode_bytes(raw) == official.encodeBytes(raw)
        assert tok.decode_bytes(tok.encode_bytes(raw)) == raw


def test_roundtrip(tok):
    for text in CORPUS:
        assert tok.decode(tok.encode(text)) == text
    assert tok.batch_decode([tok.encode(t) for t in CORPUS[:50]]) == CORPUS[:50]


def test_no_bos_eos_added(tok):
    hi = tok.encode("hi")
    assert len(hi) == 1 and tok._id_to_bytes[hi[0]] == b"hi"
    assert tok("hi")["input_ids"] == tok.encode("hi", add_special_tokens=False) == hi
    assert tok("hi", add_special_tokens=True)["input_ids"] == hi


def test_endoftext_literal_is_plain_text(tok, official):
    for text in ["<|endoftext|>", "a <|endoftext|> b", "<|endoftext|><|endoftext|>"]:
        ids = tok(text)["input_ids"]
        assert 0 not in ids
        assert ids == official.encode(text)
        assert tok.tokenize(text) == tok.convert_ids_to_tokens(ids)
    assert tok.pad_token_id == 0 and tok.eos_token_id == 0
    assert tok.convert_tokens_to_ids("<|endoftext|>") == 0
    assert tok.decode([0]) == "<|endoftext|>"
    hi = tok.encode("hi")
    assert tok.decode(hi + [0] + hi, skip_special_tokens=True) == "hihi"
    assert tok.decode(hi + [0] + hi) == "hi<|endoftext|>hi"


def test_out_of_vocab_ids_raise(tok):
    for bad in [-1, 65530, 65535, 70000]:
        with pytest.raises(ValueError, match="outside the RWKV World vocabulary"):
            tok.decode(tok.encode("hi") + [bad])
        with pytest.raises(ValueError, match="outside the RWKV World vocabulary"):
            tok.convert_ids_to_tokens(bad)
    assert tok.decode([65529]) == official_decode_last(tok)


def official_decode_last(tok):
    return tok._id_to_bytes[65529].decode("utf-8", errors="replace")


def test_vocabulary_is_fixed():
    tok = RWKV7Tokenizer(str(ROOT / "rwkv_vocab_v20230424.txt"))  # its own: a refused add leaves it half-changed
    before = len(tok)
    with pytest.raises(ValueError, match="vocabulary is fixed"):
        tok.add_tokens(["<my_token>"])
    with pytest.raises(ValueError, match="vocabulary is fixed"):
        tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    assert tok.add_tokens(["<|endoftext|>"], special_tokens=True) == 0 and len(tok) == before
    assert tok.encode("<my_token>") == tok.encode_bytes(b"<my_token>")


def test_vocab_hash_check(tmp_path, model_dir):
    bad = tmp_path / "bad"
    shutil.copytree(model_dir, bad)
    vocab = bad / "rwkv_vocab_v20230424.txt"
    data = vocab.read_bytes().replace(b"261 '\\n\\n' 2", b"261 '\\n\\r' 2")
    vocab.write_bytes(data)
    with pytest.raises(ValueError, match="sha256"):
        RWKV7Tokenizer.from_pretrained(str(bad))
    import hashlib

    assert hashlib.sha256((model_dir / "rwkv_vocab_v20230424.txt").read_bytes()).hexdigest() == VOCAB_SHA256_LF


def test_batch_padding_truncation_tensors(tok):
    texts = ["Hello world", "中文", "a much longer sentence than the others, surely"]
    enc = tok(texts, padding=True, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    assert isinstance(ids, torch.Tensor) and ids.dtype == torch.long
    assert set(enc.keys()) == {"input_ids", "attention_mask"}
    lengths = [len(tok.encode(t)) for t in texts]
    assert ids.shape == (3, max(lengths))
    for row, m, n, t in zip(ids, mask, lengths, texts):
        pad = ids.shape[1] - n
        assert row[:pad].tolist() == [0] * pad  # left padding with id 0
        assert m.tolist() == [0] * pad + [1] * n
        assert row[pad:].tolist() == tok.encode(t)
    assert tok.batch_decode(ids, skip_special_tokens=True) == texts
    tr = tok(texts, truncation=True, max_length=3)["input_ids"]
    assert [len(x) for x in tr] == [min(3, n) for n in lengths]
    assert tr[2] == tok.encode(texts[2])[:3]
    right = tok(texts, padding="max_length", max_length=12, padding_side="right")
    assert right["input_ids"][0][-1] == 0 and right["attention_mask"][0][-1] == 0


def test_streamer_partial_characters(tok):
    from transformers import TextIteratorStreamer, TextStreamer

    text = "Hello 世界！这是一个测试。😀 emoji 👨‍👩‍👧 mixed 中文 text\n第二行：完成。🇯🇵 end"
    # worst case: every byte as its own token (ids 1..256), so every multi-byte character arrives in pieces
    byte_ids = [b + 1 for b in text.encode("utf-8")]
    for ids in [byte_ids, tok.encode(text)]:
        s = TextStreamer(tok)
        buf = io.StringIO()
        with redirect_stdout(buf):
            for i in ids:
                s.put(torch.tensor([[i]]))
            s.end()
        printed = buf.getvalue()
        assert "\ufffd" not in printed
        assert printed == text + "\n"  # TextStreamer ends with a newline

        it = TextIteratorStreamer(tok)
        chunks = []
        th = threading.Thread(target=lambda: chunks.extend(list(it)))
        th.start()
        for i in ids:
            it.put(torch.tensor([[i]]))
        it.end()
        th.join()
        assert all("\ufffd" not in c for c in chunks)
        assert "".join(chunks) == text


def test_incomplete_character_decodes_to_one_replacement(tok):
    ids = [b + 1 for b in "中".encode("utf-8")]
    assert tok.decode(ids[:2]) == "\ufffd"
    assert tok.decode(ids) == "中"


def test_save_load_roundtrip(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    assert (tmp_path / "rwkv_vocab_v20230424.txt").read_bytes() == (ROOT / "rwkv_vocab_v20230424.txt").read_bytes()
    tok2 = RWKV7Tokenizer.from_pretrained(str(tmp_path))
    assert tok2.padding_side == "left"
    assert tok2.pad_token_id == 0
    assert tok2.chat_template == tok.chat_template or tok.chat_template is None
    for text in CORPUS[:40]:
        assert tok2.encode(text) == tok.encode(text)


def test_generation_config_stops_on_turn_end(tok):
    cfg = json.loads((ROOT / "generation_config.json").read_text())
    want = [0] + sorted(i for i in range(1, 65530) if b"\n\n" in tok._id_to_bytes[i])
    assert sorted(cfg["eos_token_id"]) == want and cfg["eos_token_id"][:2] == [0, 261]
    assert len(want) == 35 and cfg["pad_token_id"] == 0 and cfg["bos_token_id"] == 0


_LOAD_SCRIPT = r"""
import json, time
from transformers import AutoTokenizer
t = time.perf_counter()
tok = AutoTokenizer.from_pretrained(sys.argv[1], trust_remote_code=True)
dt = time.perf_counter() - t
chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
print(json.dumps({"cls": type(tok).__name__, "ids": tok("Hello world<|endoftext|>")["input_ids"],
                  "pad": tok.pad_token_id, "side": tok.padding_side, "chat": chat, "load_s": dt}))
"""


def _run_loader(target, env_extra, tmp_path):
    env = {**env_extra, "HF_MODULES_CACHE": str(tmp_path / "modules")}
    out = run_python(_LOAD_SCRIPT.replace("sys.argv[1]", repr(target)), env=env, cwd="/", timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_autotokenizer_local_folder(model_dir, tmp_path, official):
    r = _run_loader(str(model_dir), {}, tmp_path)
    assert r["cls"] == "RWKV7Tokenizer"
    assert r["ids"] == official.encode("Hello world<|endoftext|>")
    assert r["pad"] == 0 and r["side"] == "left"
    assert r["chat"] == "User: hi\n\nAssistant:"


@pytest.mark.slow
def test_autotokenizer_offline_hub_cache(model_dir, tmp_path, official):
    from hub_cache import add_repo_to_cache

    cache = tmp_path / "hub"
    repo = tmp_path / "repo"
    shutil.copytree(model_dir, repo)
    # a Hub repo has a config.json; offline, AutoTokenizer looks for it in the cache
    (repo / "config.json").write_text(json.dumps({"tokenizer_class": "RWKV7Tokenizer"}))
    add_repo_to_cache(cache, "test-org/rwkv7-tokenizer", repo)
    r = _run_loader("test-org/rwkv7-tokenizer", {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}, tmp_path)
    assert r["cls"] == "RWKV7Tokenizer"
    assert r["ids"] == official.encode("Hello world<|endoftext|>")
    assert r["load_s"] < 2.0


def test_vocab_hash_check_direct(tmp_path):
    bad = tmp_path / "rwkv_vocab_v20230424.txt"
    bad.write_bytes((ROOT / "rwkv_vocab_v20230424.txt").read_bytes() + b"65530 'x' 1\n")
    with pytest.raises(ValueError, match="not the RWKV World vocabulary"):
        RWKV7Tokenizer(str(bad))


def _random_bytes(rng, tokens):
    """Glued vocab entries, random UTF-8, raw bytes and periodic runs (which exercise the chain re-synchronisation)."""
    kind = rng.randrange(5)
    if kind == 0:
        return b"".join(rng.choice(tokens) for _ in range(rng.randrange(1, 400)))
    if kind == 1:
        return _random_codepoint_text(rng, rng.randrange(1, 600)).encode("utf-8", "surrogatepass")
    if kind == 2:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 1500)))
    if kind == 3:  # runs of one token, e.g. "aaaa..." or 1000 spaces, glued to other text
        parts = [rng.choice(tokens) * rng.randrange(1, 700) for _ in range(rng.randrange(1, 4))]
        return b"".join(p + rng.choice(tokens) for p in parts)
    pieces = [rng.choice(tokens) for _ in range(rng.randrange(1, 6))]
    return b"".join(rng.choice(pieces) for _ in range(rng.randrange(1, 3000)))


@pytest.mark.parametrize(
    "short,chunk,sync_steps,window",
    [(None, None, None, None), (0, 7, 3, 64), (0, 32, 1, 1000), (1 << 30, None, None, None)],
)
def test_random_bytes_against_official(tok, official, short, chunk, sync_steps, window):
    """Property test through both encoders: short=0 forces the vectorised one (with small chunk / sync / window
    sizes for every path: cuts, re-sync, fallback), short=1 << 30 forces the pure-Python walk."""
    enc = copy.copy(tok._encoder)
    if short is not None:
        enc.SHORT = short
    if chunk:
        enc.CHUNK, enc.SYNC_STEPS, enc.WINDOW = chunk, sync_steps, window
    rng = random.Random(f"{chunk}-{sync_steps}-{window}")
    tokens = tok._id_to_bytes[1:]
    for _ in range(150):
        raw = _random_bytes(rng, tokens)
        assert enc.encode(raw) == official.encodeBytes(raw), raw[:80]
    big = b"".join(_random_bytes(rng, tokens) for _ in range(40))
    assert enc.encode(big) == official.encodeBytes(big)
    assert enc.encode(b"") == []


@pytest.mark.parametrize("short", [0, 1 << 30])
def test_corpus_both_encoders(tok, official, short):
    enc = copy.copy(tok._encoder)
    enc.SHORT = short
    for text in CORPUS:
        assert enc.encode(text.encode("utf-8")) == official.encode(text), repr(text[:80])


def test_plain_call_fast_path(tok):
    """tokenizer(text) / tokenizer.encode(text) without options skip transformers; they must give what it gives."""
    for text in ["Hello world", "", "中文 😀", "<|endoftext|>", "x" * 3000]:
        fast = tok(text)
        slow = tok(text, return_attention_mask=True)
        assert type(fast) is type(slow) and dict(fast) == dict(slow)
        assert tok.encode(text) == tok.encode(text, padding=False) == fast["input_ids"]
        assert tok(text, add_special_tokens=True)["input_ids"] == fast["input_ids"]
    assert tok("hi", return_tensors="pt")["input_ids"].shape == (1, 1)


def test_encode_paths_agree(tok, official):
    texts = [t for t in CORPUS[:60] if t]
    want = [official.encode(t) for t in texts]
    assert [tok(t)["input_ids"] for t in texts] == want
    assert tok(texts)["input_ids"] == want
    assert [tok.convert_tokens_to_ids(tok.tokenize(t)) for t in texts] == want
    assert tok(texts[1], texts[2])["input_ids"] == want[1] + want[2]
    assert tok.encode(texts[3], max_length=2, truncation=True) == want[3][:2]
    words = ["Hello", " world", "中文"]
    assert tok(words, is_split_into_words=True)["input_ids"] == [i for w in words for i in official.encode(w)]


def test_tokenize_carries_ids(tok):
    text = "Hello world, 你好 " * 50
    tokens = tok.tokenize(text)
    ids = tok.encode(text)
    assert tok.convert_tokens_to_ids(tokens) == ids == tok.convert_tokens_to_ids(list(tokens))
    tokens.append(tokens[0])  # changed lists are looked up token by token
    assert tok.convert_tokens_to_ids(tokens) == ids + ids[:1]
