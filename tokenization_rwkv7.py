"""RWKV World tokenizer (rwkv_vocab_v20230424) for RWKV-7 models.

Encoding is greedy longest match over the UTF-8 bytes of the text, exactly like the official ``TRIE_TOKENIZER``
of the ``rwkv`` pip package: no normalisation, no pre-tokenisation, no BOS/EOS. Id 0 is the end-of-document
token; it is the pad and eos token, and typed text never encodes to it (the literal ``<|endoftext|>`` is plain
bytes, as in the official tokenizer).

Speed: the greedy match runs vectorised in numpy. A byte trie of the vocabulary is built at load time (dense
transition tables for the first three levels, an open-addressing hash table below), every text position walks
down the trie in lock step, and the greedy chain through the resulting "longest match at each position" array is
followed with pointer doubling. The encoding is identical to the official one (checked on a large corpus by the
tests).
"""

import codecs
import hashlib
import os
import re
from typing import Dict, List, Optional, Tuple

import numpy as np
from transformers import PreTrainedTokenizer

try:
    from transformers.utils import logging

    logger = logging.get_logger(__name__)
except Exception:  # pragma: no cover
    import logging as _logging

    logger = _logging.getLogger(__name__)


VOCAB_FILES_NAMES = {"vocab_file": "rwkv_vocab_v20230424.txt"}
# sha256 of rwkv_vocab_v20230424.txt with LF line endings (this repository) and with CRLF line endings (the copy
# inside the `rwkv` pip wheel). Both parse to the same table.
VOCAB_SHA256_LF = "e6dee3d4e31b4d5c40ac99508ac6c701ceef4bed681bf2167ce9a908552bca89"
VOCAB_SHA256_CRLF = "8324476023347dec2964625ccb2075c864d250a9c6d9a74f36daba628de8c008"
VOCAB_SIZE = 65530  # ids 0..65529; id 0 = end of document, ids 1..65529 from the vocab file
EOD_TOKEN = "<|endoftext|>"

_LINE_RE = re.compile(r"^(\d+) (b?)(['\"])(.*)\3 (\d+)$", re.M)
_SEP = "\ue000"  # joins str literals for one batched unescape; no vocab token contains U+E000


def _bytes_to_unicode() -> List[str]:
    """GPT-2's reversible byte -> printable character map, used for the token *strings* only."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + list(range(0xAE, 0x100))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = [""] * 256
    for b, c in zip(bs, cs):
        table[b] = chr(c)
    return table


def check_vocab_file(vocab_file: str) -> bytes:
    """Returns the file's bytes; raises ValueError unless it is the official vocabulary (checked by sha256)."""
    with open(vocab_file, "rb") as f:
        data = f.read()
    digest = hashlib.sha256(data).hexdigest()
    if digest not in (VOCAB_SHA256_LF, VOCAB_SHA256_CRLF):
        raise ValueError(
            f"{vocab_file} is not the RWKV World vocabulary rwkv_vocab_v20230424.txt: its sha256 is {digest}, "
            f"expected {VOCAB_SHA256_LF} (LF line endings) or {VOCAB_SHA256_CRLF} (CRLF). "
            "Re-download the file; do not edit it."
        )
    return data


def load_rwkv_vocab(vocab_file: str) -> List[bytes]:
    """Reads the vocab file; returns the token bytes of ids 1..65529 (index i holds id i + 1).

    The file's sha256 must match the official vocabulary (LF or CRLF line endings).
    """
    data = check_vocab_file(vocab_file)
    text = data.decode("utf-8").replace("\r\n", "\n")
    rows = _LINE_RE.findall(text)
    if len(rows) != VOCAB_SIZE - 1:
        raise ValueError(f"{vocab_file}: parsed {len(rows)} entries, expected {VOCAB_SIZE - 1}")
    # The file is hash-checked, so its literals are known: they are Python reprs. Unescape all str literals in one
    # batch (non-latin-1 characters become \uXXXX escapes first, so unicode_escape sees pure escapes + latin-1).
    joined = _SEP.join([r[3] for r in rows if not r[1]])
    strs = joined.encode("latin-1", "backslashreplace").decode("unicode_escape").split(_SEP)
    it = iter(strs)
    escape_decode = codecs.escape_decode
    tokens = [escape_decode(r[3])[0] if r[1] else next(it).encode("utf-8") for r in rows]
    for i, (row, tok) in enumerate(zip(rows, tokens)):
        if int(row[0]) != i + 1 or len(tok) != int(row[4]):
            raise ValueError(f"{vocab_file}: bad entry for id {row[0]}")
    return tokens


class _GreedyTrieEncoder:
    """Greedy longest-match encoder over bytes, vectorised with numpy."""

    _MULT = np.uint32(0x9E3779B1)

    def __init__(self, tokens: List[bytes]):
        n_tok = len(tokens)
        lens = np.fromiter(map(len, tokens), np.int64, n_tok)
        buf = np.frombuffer(b"".join(tokens), np.uint8).astype(np.int64)
        starts = np.zeros(n_tok, np.int64)
        np.cumsum(lens[:-1], out=starts[1:])
        ids = np.arange(1, n_tok + 1, dtype=np.int32)
        if int(lens.min()) < 1 or np.count_nonzero(lens == 1) != 256:
            raise ValueError("the vocabulary must contain every single byte")
        # Trie nodes numbered by depth: depth-1 node of byte b is b; deeper nodes follow, level by level.
        node = buf[starts]
        n_nodes = 256
        term = [np.zeros(256, np.int32)]
        term[0][node[lens == 1]] = ids[lens == 1]
        parent_of = [np.full(256, -1, np.int64)]
        parents, labels, children = [], [], []
        level_start = [0, 256]
        sel = np.arange(n_tok)
        for d in range(2, int(lens.max()) + 1):
            keep = lens[sel] >= d
            sel, node = sel[keep], node[keep]
            key = node * 257 + buf[starts[sel] + d - 1]
            uniq, inv = np.unique(key, return_inverse=True)
            inv = inv.reshape(-1)
            new = np.arange(n_nodes, n_nodes + len(uniq))
            parents.append(uniq // 257)
            labels.append(uniq % 257)
            children.append(new)
            parent_of.append(uniq // 257)
            t = np.zeros(len(uniq), np.int32)
            fin = lens[sel] == d
            t[inv[fin]] = ids[sel[fin]]
            term.append(t)
            n_nodes += len(uniq)
            level_start.append(n_nodes)
            node = new[inv]
        term = np.concatenate(term)
        parent_of = np.concatenate(parent_of)
        depth = np.zeros(n_nodes, np.int32)
        for d in range(1, len(level_start)):
            depth[level_start[d - 1] : level_start[d]] = d
        # Deepest token ending at or above each node (nodes are in level order, so parents come first).
        best_tok = term.copy()
        best_len = np.where(term > 0, depth, 0).astype(np.int32)
        for d in range(2, len(level_start)):
            lo, hi = level_start[d - 1], level_start[d]
            miss = best_tok[lo:hi] == 0
            par = parent_of[lo:hi][miss]
            best_tok[lo:hi][miss] = best_tok[par]
            best_len[lo:hi][miss] = best_len[par]
        self.best_tok = best_tok
        self.best_len = best_len
        P = np.concatenate(parents)
        B = np.concatenate(labels)
        C = np.concatenate(children)
        # Dense transitions for parents of depth <= 3, hashed transitions below.
        self.dense_depth = 3
        K = level_start[self.dense_depth]
        dense = np.full(K * 257, -1, np.int32)
        m = P < K
        dense[P[m] * 257 + B[m]] = C[m]
        self.dense = dense
        hk = (P[~m] * 257 + B[~m]).astype(np.int32)
        hv = C[~m].astype(np.int32)
        bits = max(8, int(np.ceil(np.log2(max(1, len(hk)) * 2.5))))
        self.shift = np.uint32(32 - bits)
        size = (1 << bits) + 256
        HK = np.full(size, -1, np.int32)
        HV = np.full(size, -1, np.int32)
        home = self._slot(hk).astype(np.int64)
        pending = np.arange(len(hk))
        r = 0
        while len(pending):
            s = home[pending] + r
            free = HK[s] == -1
            cand, cs = pending[free], s[free]
            us, first = np.unique(cs, return_index=True)
            won = cand[first]
            HK[us] = hk[won]
            HV[us] = hv[won]
            placed = np.zeros(len(hk), bool)
            placed[won] = True
            pending = pending[~placed[pending]]
            r += 1
            if r >= 256:
                raise RuntimeError("hash table construction failed")
        self.HK, self.HV = HK, HV

    def _slot(self, key):
        return (key.view(np.uint32) * self._MULT) >> self.shift

    def _lookup(self, key):
        s = self._slot(key)
        k0 = self.HK[s]
        res = self.HV[s]
        miss = k0 != key
        res[miss] = -1
        pend = np.flatnonzero(miss & (k0 != -1))
        r = 1
        while len(pend):
            ss = s[pend] + np.uint32(r)
            kk = self.HK[ss]
            hit = kk == key[pend]
            res[pend[hit]] = self.HV[ss[hit]]
            pend = pend[~hit & (kk != -1)]
            r += 1
        return res

    BLOCK = 1 << 20

    def _descend(self, xp, a, b, final):
        dense = self.dense
        f = dense[xp[a:b] * 257 + xp[a + 1 : b + 1]]
        alive = f >= 0
        final[a:b] = np.where(alive, f, xp[a:b])
        idx = np.flatnonzero(alive).astype(np.int32)
        node = f[idx]
        idx += a
        d = 2
        while len(idx):
            key = node * 257 + xp[idx + d]
            child = dense[key] if d <= self.dense_depth else self._lookup(key)
            ok = child >= 0
            if not ok.all():
                dead = ~ok
                final[idx[dead]] = node[dead]
                k = np.flatnonzero(ok)
                idx, node = idx[k], child[k]
            else:
                node = child
            d += 1

    def encode(self, data: bytes) -> List[int]:
        n = len(data)
        if n == 0:
            return []
        xp = np.empty(n + 131, np.int32)
        xp[:n] = np.frombuffer(data, np.uint8)
        xp[n:] = 256  # no transition on 256: every walk stops at the end of the text
        # final[p]: the deepest trie node reached from position p. Blocks keep the arrays in cache.
        final = np.empty(n, np.int32)
        for a in range(0, n, self.BLOCK):
            self._descend(xp, a, min(n, a + self.BLOCK), final)
        tok = self.best_tok[final]
        nxt = np.arange(n + 1, dtype=np.int32)
        nxt[:n] += self.best_len[final]
        # Follow the greedy chain from 0 with 16-step jumps, then expand each jump.
        jump = nxt
        for _ in range(4):
            jump = jump[jump]
        mv = memoryview(jump)
        p = 0
        heads = []
        append = heads.append
        while p < n:
            append(p)
            p = mv[p]
        rows = np.empty((len(heads), 16), np.int32)
        rows[:, 0] = heads
        for i in range(1, 16):
            rows[:, i] = nxt[rows[:, i - 1]]
        pos = rows.reshape(-1)
        pos = pos[pos < n]
        return tok[pos].tolist()


class RWKV7Tokenizer(PreTrainedTokenizer):
    """RWKV World tokenizer (greedy longest byte match, identical to the official ``TRIE_TOKENIZER``).

    Token strings (``tokenize``/``convert_ids_to_tokens``) are the token bytes in GPT-2's byte-to-unicode
    alphabet; id 0 is ``<|endoftext|>``. ``decode`` joins the token bytes and decodes them as UTF-8.
    """

    vocab_files_names = VOCAB_FILES_NAMES
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(
        self,
        vocab_file,
        bos_token=EOD_TOKEN,
        eos_token=EOD_TOKEN,
        pad_token=EOD_TOKEN,
        unk_token=None,
        padding_side="left",
        clean_up_tokenization_spaces=False,
        **kwargs,
    ):
        self.vocab_file = vocab_file
        tokens = load_rwkv_vocab(vocab_file)
        self._id_to_bytes = [b""] + tokens
        b2u = _bytes_to_unicode()
        self._byte_to_char = b2u
        self._char_to_byte = {c: i for i, c in enumerate(b2u)}
        self._id_to_str = [EOD_TOKEN] + ["".join([b2u[c] for c in t]) for t in tokens]
        self._str_to_id = {s: i for i, s in enumerate(self._id_to_str)}
        self._encoder = _GreedyTrieEncoder(tokens)
        kwargs.pop("split_special_tokens", None)
        super().__init__(
            bos_token=bos_token,
            eos_token=eos_token,
            pad_token=pad_token,
            unk_token=unk_token,
            padding_side=padding_side,
            clean_up_tokenization_spaces=clean_up_tokenization_spaces,
            # typed text is never split on special tokens: "<|endoftext|>" in text is plain bytes
            split_special_tokens=True,
            **kwargs,
        )

    @classmethod
    def _from_pretrained(cls, resolved_vocab_files, *args, **kwargs):
        # Check the vocab before transformers' loader runs __init__: transformers 4.x wraps __init__ in a try whose
        # `except` clause needs protobuf, which would hide our error behind an ImportError.
        vocab_file = (resolved_vocab_files or {}).get("vocab_file")
        if vocab_file is not None:
            check_vocab_file(vocab_file)
        return super()._from_pretrained(resolved_vocab_files, *args, **kwargs)

    # ----- vocabulary -------------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return VOCAB_SIZE

    def get_vocab(self) -> Dict[str, int]:
        return dict(self._str_to_id)

    def __len__(self) -> int:
        return VOCAB_SIZE

    # ----- encoding ---------------------------------------------------------------------------------------------
    def encode_bytes(self, data: bytes) -> List[int]:
        """Token ids of raw bytes (greedy longest match; equals the official ``encodeBytes``)."""
        return self._encoder.encode(bytes(data))

    def tokenize(self, text: str, **kwargs) -> List[str]:
        # Bypasses transformers' added-token splitter on purpose: RWKV has no in-text special tokens.
        ids = self._encoder.encode(text.encode("utf-8"))
        id_to_str = self._id_to_str
        return [id_to_str[i] for i in ids]

    def _tokenize(self, text, **kwargs):
        return self.tokenize(text)

    def convert_tokens_to_ids(self, tokens):
        if tokens is None:
            return None
        if isinstance(tokens, str):
            return self._convert_token_to_id(tokens)
        table = self._str_to_id
        try:
            return [table[t] for t in tokens]
        except KeyError:
            return [self._convert_token_to_id(t) for t in tokens]

    def _convert_token_to_id(self, token):
        try:
            return self._str_to_id[token]
        except KeyError:
            raise ValueError(f"{token!r} is not a token of the RWKV World vocabulary") from None

    def _convert_id_to_token(self, index):
        return self._id_to_str[self._check_id(index)]

    def convert_ids_to_tokens(self, ids, skip_special_tokens: bool = False):
        if isinstance(ids, (int, np.integer)):
            return self._convert_id_to_token(int(ids))
        ids = self._as_id_list(ids)
        if skip_special_tokens:
            ids = [i for i in ids if i != 0]
        return [self._convert_id_to_token(i) for i in ids]

    def convert_tokens_to_string(self, tokens: List[str]) -> str:
        char_to_byte = self._char_to_byte
        out = bytearray()
        for t in tokens:
            if t == EOD_TOKEN:
                out += EOD_TOKEN.encode()
            else:
                out += bytes(char_to_byte[c] for c in t)
        return out.decode("utf-8", errors="replace")

    # ----- decoding ---------------------------------------------------------------------------------------------
    @staticmethod
    def _check_id(i) -> int:
        if not 0 <= i < VOCAB_SIZE:
            raise ValueError(
                f"token id {i} is outside the RWKV World vocabulary (valid ids: 0..{VOCAB_SIZE - 1}; "
                f"the model's rows {VOCAB_SIZE}..65535 are unused)"
            )
        return i

    @staticmethod
    def _as_id_list(token_ids) -> List[int]:
        if hasattr(token_ids, "tolist"):
            token_ids = token_ids.tolist()
        if isinstance(token_ids, int):
            return [token_ids]
        out = []
        for i in token_ids:
            if isinstance(i, (list, tuple)):
                raise ValueError("decode expects a flat sequence of token ids; use batch_decode for a batch")
            out.append(int(i))
        return out

    def decode_bytes(self, token_ids, skip_special_tokens: bool = False) -> bytes:
        """The raw bytes of the tokens (id 0 is b'' with skip_special_tokens, else b'<|endoftext|>')."""
        ids = self._as_id_list(token_ids)
        table = self._id_to_bytes
        try:
            if min(ids, default=0) < 0:
                raise IndexError
            parts = [table[i] for i in ids]
        except IndexError:
            for i in ids:
                self._check_id(i)
            raise
        if 0 in ids and not skip_special_tokens:
            eod = EOD_TOKEN.encode()
            parts = [eod if i == 0 else p for i, p in zip(ids, parts)]
        return b"".join(parts)

    def _decode(self, token_ids, skip_special_tokens: bool = False, clean_up_tokenization_spaces=None, **kwargs):
        # Invalid or incomplete UTF-8 (a character cut between tokens) becomes U+FFFD; a stream that stops in the
        # middle of a character therefore ends with one U+FFFD, which TextStreamer holds back until it completes.
        text = self.decode_bytes(token_ids, skip_special_tokens=skip_special_tokens).decode("utf-8", errors="replace")
        if clean_up_tokenization_spaces:
            text = self.clean_up_tokenization(text)
        return text

    # ----- saving -----------------------------------------------------------------------------------------------
    def save_vocabulary(self, save_directory: str, filename_prefix: Optional[str] = None) -> Tuple[str]:
        if not os.path.isdir(save_directory):
            raise ValueError(f"{save_directory} is not a directory")
        name = (filename_prefix + "-" if filename_prefix else "") + VOCAB_FILES_NAMES["vocab_file"]
        path = os.path.join(save_directory, name)
        if os.path.abspath(path) != os.path.abspath(self.vocab_file):
            with open(self.vocab_file, "rb") as f:
                data = f.read().replace(b"\r\n", b"\n")
            with open(path, "wb") as f:
                f.write(data)
        return (path,)
