"""RWKV World tokenizer (rwkv_vocab_v20230424) for RWKV-7 models.

Encoding is greedy longest match over the UTF-8 bytes of the text, exactly like the official ``TRIE_TOKENIZER``
of the ``rwkv`` pip package: no normalisation, no pre-tokenisation, no BOS/EOS. Id 0 is the end-of-document
token; it is the pad and eos token, and typed text never encodes to it (the literal ``<|endoftext|>`` is plain
bytes, as in the official tokenizer).

Speed (see ``_GreedyTrieEncoder``): short texts are walked over a byte trie in pure Python; long texts are split
at byte pairs that occur inside no token (guaranteed token boundaries), and the greedy chains of all pieces are
walked in lock step with numpy. Both are identical to the official encoding (checked on a large corpus and by
randomized property tests, through both paths).
"""

import codecs
import hashlib
import itertools
import os
import re
from typing import Dict, List, Optional, Tuple

import numpy as np
from transformers import BatchEncoding, PreTrainedTokenizer

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
_PLAIN_KWARGS = frozenset({"add_special_tokens"})  # the only option of a plain encode (it adds nothing)
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
    """Greedy longest-match encoder over bytes: a pure-Python walk for short texts, vectorised numpy for long ones.

    Short texts (``SHORT``, ``_encode_short``): the trie is walked byte by byte with one dict lookup per byte
    ((node << 8 | byte) -> child); the deepest token seen is emitted and the walk restarts after it. This has no
    fixed cost, so it wins below about 1 KB.

    Long texts (``_encode_array``):

    * Segments. A byte pair that occurs inside no token (e.g. "e" + "\\xe4") is a token boundary of every
      tokenization, so the text falls into independent segments (about 4 bytes long on typical text), and no trie
      walk crosses a segment boundary. A segment of at most 8 bytes that is itself a token (most segments) is
      looked up whole in a hash table of the tokens of at most 8 bytes, keyed by their bytes as one uint64.
    * Chains. The greedy chains of the other segments are walked in lock step, one vectorised longest match
      (``_longest``) per token: the first two bytes index a 65536-entry table (deepest node of depth <= 2), bytes
      3..``DENSE_DEPTH`` go through dense 256-entry child blocks, and deeper walks go two bytes per step through an
      exact hash table keyed by (node, next byte or two). Only the positions whose walk goes on take part in the
      next step.
    * Long segments. Segments longer than ``CHUNK`` bytes are cut every ``CHUNK`` bytes, so that the lock step
      needs few steps. A chain that starts at a cut may be off, so the chain before each cut walks on until it
      lands on a position visited by a later chain: from there on both coincide (the chain from a position depends
      only on the position), and the true chain is assembled from exact pieces. Chains that have not met after
      ``SYNC_STEPS`` steps (periodic runs such as "aaaa...") are finished by a walk over all positions of a window.
    * Output. Every token of the true chain is written at its start position; read in position order, they are
      the tokenization.
    """

    SHORT = 1024  # texts shorter than this many bytes take the pure-Python walk
    CHUNK = 128
    DENSE_DEPTH = 4
    SYNC_STEPS = 256  # lock-step steps for a chain to meet the next (periodic runs meet within about CHUNK)
    WINDOW = 1 << 16
    _PAD = 136  # zero bytes after the text: byte 0 never follows another byte in a token, so every walk stops there
    _MULT = np.uint64(0x9E3779B97F4A7C15)
    _LOW_BYTES = np.array([0] + [(1 << (8 * k)) - 1 for k in range(1, 8)] + [(1 << 64) - 1], np.uint64)

    def __init__(self, tokens: List[bytes]):
        n_tok = len(tokens)
        lens = np.fromiter(map(len, tokens), np.int64, n_tok)
        buf = np.frombuffer(b"".join(tokens), np.uint8).astype(np.int64)
        starts = np.zeros(n_tok, np.int64)
        np.cumsum(lens[:-1], out=starts[1:])
        ids = np.arange(1, n_tok + 1, dtype=np.int32)
        if int(lens.min()) < 1 or np.count_nonzero(lens == 1) != 256:
            raise ValueError("the vocabulary must contain every single byte")
        if n_tok >= 1 << 16:
            raise ValueError("token ids must fit in 16 bits")
        # Trie nodes numbered level by level; the depth-1 node of byte b is b.
        node = buf[starts]
        parent, label, depth = [np.full(256, -1)], [np.arange(256)], [np.ones(256, np.int64)]
        term = [np.zeros(256, np.int32)]
        term[0][node[lens == 1]] = ids[lens == 1]
        n_nodes = 256
        sel = np.arange(n_tok)
        for d in range(2, int(lens.max()) + 1):
            keep = lens[sel] >= d
            sel, node = sel[keep], node[keep]
            uniq, inv = np.unique(node * 256 + buf[starts[sel] + d - 1], return_inverse=True)
            inv = inv.reshape(-1)
            parent.append(uniq >> 8)
            label.append(uniq & 255)
            depth.append(np.full(len(uniq), d))
            t = np.zeros(len(uniq), np.int32)
            fin = lens[sel] == d
            t[inv[fin]] = ids[sel[fin]]
            term.append(t)
            node = n_nodes + inv
            n_nodes += len(uniq)
        parent, label, depth, term = map(np.concatenate, (parent, label, depth, term))
        if np.any(label[256:] == 0):
            raise ValueError("a vocabulary entry has a zero byte after its first byte")
        has_child = np.zeros(n_nodes, bool)
        has_child[parent[256:]] = True
        # Deepest token at or above each node (parents come before children).
        best_tok = term
        best_len = np.where(term > 0, depth, 0).astype(np.int32)
        for d in range(2, int(depth.max()) + 1):
            lv = np.flatnonzero(depth == d)
            miss = lv[best_tok[lv] == 0]
            best_tok[miss] = best_tok[parent[miss]]
            best_len[miss] = best_len[parent[miss]]
        self.best_tok, self.best_len = best_tok, best_len
        # For the pure-Python walk: (node << 8 | byte) -> child node, and the two tables above as lists.
        self.child = dict(zip(((parent[256:] << 8) | label[256:]).tolist(), range(256, n_nodes)))
        self.best_tok_list, self.best_len_list = best_tok.tolist(), best_len.tolist()
        # Byte pairs that occur inside no token: the text always splits between them.
        inner = np.flatnonzero(depth >= 2)
        inside = np.zeros(65536, bool)
        inside[label[parent[inner]] | (label[inner] << 8)] = True
        self.splits = ~inside
        # First two bytes (little-endian uint16) -> deepest node of depth <= 2, and whether the walk goes on from it.
        self.t16 = np.tile(np.arange(256), 256)
        d2 = np.flatnonzero(depth == 2)
        self.t16[parent[d2] | (label[d2] << 8)] = d2
        self.t16_list = self.t16.tolist()
        self.t16_on = np.zeros(65536, bool)
        self.t16_on[parent[d2] | (label[d2] << 8)] = has_child[d2]
        # Depths 3..DENSE_DEPTH: a dense 256-entry child block (offset ``blk``) for every internal node of depth
        # 2..DENSE_DEPTH - 1. A missing child is -1, and blk[-1] is a block of -1: a walk that has stopped stays
        # stopped. Nodes are numbered level by level, so the deeper of two nodes on a path is the larger.
        D = self.DENSE_DEPTH
        inner = np.flatnonzero(has_child & (depth >= 2) & (depth < D))
        self.blk = np.full(n_nodes + 1, len(inner) * 256, np.intp)
        self.blk[inner] = np.arange(len(inner)) * 256
        self.dense = np.full((len(inner) + 1) * 256, -1, np.int32)
        kids = np.flatnonzero((depth >= 3) & (depth <= D))
        self.dense[self.blk[parent[kids]] + label[kids]] = kids
        self.has_child = np.append(has_child, False)
        # Below DENSE_DEPTH, two bytes per step: a node at an even distance below DENSE_DEPTH is keyed by
        # (grandparent, its two bytes), one at an odd distance by (parent, flag 0x10000, its byte).
        two = np.flatnonzero((depth >= D + 2) & ((depth - D) % 2 == 0))
        one = np.flatnonzero((depth >= D + 1) & ((depth - D) % 2 == 1))
        keys = np.concatenate(
            [
                (parent[parent[two]] << 17) | label[parent[two]] | (label[two] << 8),
                (parent[one] << 17) | 0x10000 | label[one],
            ]
        )
        if n_nodes >= 1 << 17:
            raise ValueError("vocabulary too large for the trie tables")
        # Tokens of at most 8 bytes by their bytes as a little-endian uint64 (zero-padded; unambiguous, since no
        # token has a zero byte after its first).
        few = np.flatnonzero(lens <= 8)
        padded = np.append(buf, np.zeros(8, np.int64)).take(starts[few, None] + np.arange(8))
        padded *= np.arange(8) < lens[few, None]
        self.word_table = self._build_table(padded.astype(np.uint8).view("<u8").reshape(-1), ids[few])
        self.trie_table = self._build_table(keys.astype(np.uint64), np.concatenate([two, one]))

    def _build_table(self, keys, vals):
        """Exact hash table (open addressing, linear probing) from uint64 keys to nonzero values."""
        nbits = max(8, int(np.ceil(np.log2(len(keys) * 4))))
        shift = np.uint64(64 - nbits)
        tab_k = np.zeros((1 << nbits) + 256, np.uint64)
        tab_v = np.zeros((1 << nbits) + 256, vals.dtype)  # 0: empty slot
        home = ((keys * self._MULT) >> shift).astype(np.intp)
        pending = np.arange(len(keys))
        r = 0
        while len(pending):  # round r: the keys not placed yet try slot home + r; one of those that collide wins
            s = home[pending] + r
            free = tab_v[s] == 0
            cand, s = pending[free], s[free]
            tab_k[s], tab_v[s] = keys[cand], vals[cand]
            pending = np.concatenate([pending[~free], cand[tab_k[s] != keys[cand]]])
            r += 1
            if r >= 256:
                raise RuntimeError("hash table construction failed")
        return tab_k, tab_v, shift

    def _lookup(self, table, key):
        """The value of each key (uint64 array) in a table of ``_build_table``, 0 where there is none."""
        tab_k, tab_v, shift = table
        s = ((key * self._MULT) >> shift).astype(np.intp)
        res = tab_v.take(s)
        pend = np.flatnonzero((tab_k.take(s) != key) & (res != 0))  # another key in the slot: probe on
        res[pend] = 0
        r = 1
        while len(pend):
            ss = s.take(pend) + r
            v = tab_v.take(ss)
            hit = tab_k.take(ss) == key.take(pend)
            res[pend[hit]] = v[hit]
            pend = pend[~hit & (v != 0)]
            r += 1
        return res

    def _longest(self, w1, w2, p):
        """Deepest trie node matching the text at each position in p.

        w1, w2: the text's bytes and byte pairs (a little-endian uint16 view of w1), padded. No walk crosses a segment boundary: the
        byte pair there occurs inside no token, and the zero padding after the text follows no byte in a token.
        """
        w = w2[p].astype(np.intp)
        node = self.t16.take(w)
        idx = np.flatnonzero(self.t16_on.take(w))  # positions still walking
        cur = node.take(idx)
        q = p.take(idx) + 2
        blk, dense = self.blk, self.dense
        c = cur
        for k in range(self.DENSE_DEPTH - 2):  # one byte per level, without compaction
            c = dense.take(blk.take(c) + w1.take(q + k))
            cur = np.maximum(c, cur)
        node[idx] = cur
        more = np.flatnonzero(self.has_child.take(c))  # reached DENSE_DEPTH and goes on
        cur, idx, q = cur.take(more), idx.take(more), q.take(more) + (self.DENSE_DEPTH - 2)
        while len(idx):  # two bytes per step
            w = w2[q].astype(np.intp)
            v = self._lookup(self.trie_table, ((cur << 17) | w).view(np.uint64))
            hit = np.flatnonzero(v > 0)
            if len(hit) < len(idx):  # no two-byte child: the one-byte child, if any, is the end
                miss = np.flatnonzero(v == 0)
                cm = cur.take(miss)
                v1 = self._lookup(self.trie_table, ((cm << 17) | 0x10000 | (w.take(miss) & 255)).view(np.uint64))
                node[idx.take(miss)] = np.maximum(v1, cm)
            cur, idx, q = v.take(hit), idx.take(hit), q.take(hit) + 2
            node[idx] = cur
            more = np.flatnonzero(self.has_child.take(cur))
            cur, idx, q = cur.take(more), idx.take(more), q.take(more)
        return node

    def encode(self, data: bytes) -> List[int]:
        """Token ids of the greedy longest-match tokenization of data."""
        if len(data) < self.SHORT or not data:
            return self._encode_short(data)
        return self._encode_array(data).tolist()

    def _encode_short(self, data: bytes) -> List[int]:
        """The greedy walk in pure Python (no fixed numpy cost, for short texts): the first two bytes through the
        pair table, then one dict lookup per byte."""
        pair, child, best_tok, best_len = self.t16_list, self.child.get, self.best_tok_list, self.best_len_list
        data += b"\0"  # stops every walk (byte 0 follows no byte in a token)
        out = []
        i, n = 0, len(data) - 1
        while i < n:
            node = pair[data[i] | data[i + 1] << 8]
            if node > 255:  # depth 2: walk on
                j = i + 2
                while True:
                    c = child(node << 8 | data[j])
                    if c is None:
                        break
                    node = c
                    j += 1
            out.append(best_tok[node])
            i += best_len[node]
        return out

    def _encode_array(self, data: bytes) -> np.ndarray:
        """Token ids (uint16 array) of the greedy longest-match tokenization of data, vectorised (data not empty)."""
        n = len(data)
        w1 = np.frombuffer(data + bytes(self._PAD), np.uint8)
        w2 = np.ndarray((n + self._PAD - 1,), "<u2", w1, strides=(1,))
        w8 = np.ndarray((n + self._PAD - 7,), "<u8", w1, strides=(1,))
        best_tok, best_len = self.best_tok, self.best_len
        # Chains start at every guaranteed boundary and every CHUNK bytes inside longer segments.
        bound = np.ones(n + 1, bool)  # guaranteed token boundaries, 0 and n included
        bound[1:n] = self.splits[w2[: n - 1]]
        b = np.flatnonzero(bound)
        starts, ends, seg = b[:-1], b[1:], np.diff(b)
        C = self.CHUNK
        long = np.flatnonzero(seg > C)
        if len(long):
            reps = (seg[long] - 1) // C
            k = np.arange(int(reps.sum())) - np.repeat(np.cumsum(reps) - reps, reps) + 1
            starts = np.sort(np.concatenate((starts, np.repeat(starts[long], reps) + k * C)))
            ends = np.append(starts[1:], n)
            seg = ends - starts
        K = len(starts)
        # Output: every token of the tokenization is written at its start position (0: no token starts there).
        at = np.zeros(n, np.uint16)
        # A segment of at most 8 bytes that is a token is that one token (most segments are).
        short = np.flatnonzero(seg <= 8)
        if len(long):  # a piece of a cut segment is not a segment
            short = short[bound.take(starts.take(short)) & bound.take(ends.take(short))]
        p = starts.take(short)
        word = w8[p] & self._LOW_BYTES.take(seg.take(short))
        tok = self._lookup(self.word_table, word)
        at[p] = tok
        # Phase 1: the other chains in lock step. records: per step (chains, their tokens, their positions).
        walk = np.ones(K, bool)
        walk[short] = tok == 0
        chains = np.flatnonzero(walk)
        q, e = starts.take(chains), ends.take(chains)
        records = []
        stop = ends.copy()  # where each chain stopped
        while len(chains):
            node = self._longest(w1, w2, q)
            records.append((chains, best_tok.take(node), q))
            q = q + best_len.take(node)
            done = q >= e
            if len(long):
                i = np.flatnonzero(done)
                stop[chains.take(i)] = q.take(i)
            i = np.flatnonzero(~done)
            chains, q, e = chains.take(i), q.take(i), e.take(i)
        valid = [None] * len(records)
        if len(long):
            self._resync(w1, w2, starts, ends, stop, records, valid, at != 0)
        for (_, tok, q), ok in zip(records, valid):
            if ok is None:
                at[q] = tok
            else:
                at[q[ok]] = tok[ok]
        return at.take(np.flatnonzero(at != 0))

    def _resync(self, w1, w2, starts, ends, stop, records, valid, whole):
        """Phase 2 (chains cut inside a segment): extends ``records``; sets ``valid`` masks for records off the chain.

        whole: the start positions of the segments that are one token (they took no phase-1 step).
        """
        n, K, n1 = int(ends[-1]), len(starts), len(records)
        best_tok, best_len = self.best_tok, self.best_len
        own = np.append(whole, True)  # positions visited by phase 1
        for _, _, q in records:
            own[q] = True
        walking = np.flatnonzero(~own.take(stop))
        for _ in range(self.SYNC_STEPS):
            if not len(walking):
                break
            q = stop.take(walking)
            node = self._longest(w1, w2, q)
            records.append((walking, best_tok.take(node), q))
            q = q + best_len.take(node)
            stop[walking] = q
            walking = walking[~own.take(q)]
        valid.extend([None] * (len(records) - n1))
        stuck = np.zeros(K, bool)
        stuck[walking] = True
        # The true chain starts in chain 0 and hops to the chain whose positions it meets; chains it jumps over
        # are off it, and in the chain it enters, the positions before the meeting point are off it.
        entry = starts.copy()
        on_path = np.ones(K, bool)
        skip_to = 0
        for k in np.flatnonzero(stop != ends).tolist():
            if k < skip_to:
                continue
            b = int(stop[k])
            if stuck[k]:
                b = self._walk_until_own(w1, w2, b, own, k, records, valid)
            r = int(np.searchsorted(starts, b, "right")) - 1 if b < n else K
            on_path[k + 1 : r] = False
            if r < K:
                entry[r] = b
            skip_to = r
        entry[~on_path] = ends[~on_path]
        for i, (ch, _, q) in enumerate(records):
            if isinstance(ch, int):
                continue
            ok = q >= entry.take(ch) if i < n1 else on_path.take(ch)
            if not ok.all():
                valid[i] = ok

    def _walk_until_own(self, w1, w2, p, own, k, records, valid):
        """Chain k's greedy chain from p, over windows of all positions, up to a phase-1 position (returned).

        The windows double from 2 * CHUNK bytes up to WINDOW bytes: the chain usually meets one soon.
        """
        n = len(own) - 1
        width = min(2 * self.CHUNK, self.WINDOW)
        while True:
            lo, hi = p, min(n, p + width)
            width = min(2 * width, self.WINDOW)
            node = self._longest(w1, w2, np.arange(lo, hi))
            lens = self.best_len.take(node).tolist()
            visited = []
            while p < hi and not own[p]:
                visited.append(p - lo)
                p += lens[p - lo]
            v = np.array(visited, np.int64)
            records.append((k, self.best_tok.take(node.take(v)), v + lo))
            valid.append(None)
            if p >= n or own[p]:
                return p


class _TokenStrings(list):
    """The list ``tokenize`` returns; ``ids`` holds the token ids until the list is changed."""

    __slots__ = ("ids",)

    def _forget_ids(name):
        method = getattr(list, name)

        def wrapper(self, *args, **kwargs):
            self.ids = None
            return method(self, *args, **kwargs)

        return wrapper

    for _name in ("__setitem__", "__delitem__", "__iadd__", "__imul__", "append", "extend", "insert", "pop",
                  "remove", "reverse", "sort", "clear"):
        locals()[_name] = _forget_ids(_name)
    del _name, _forget_ids


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
        self._char_to_byte = {c: i for i, c in enumerate(b2u)}
        # All token strings at once: latin-1 maps bytes to the first 256 code points, translate maps those to b2u.
        text = b"".join(tokens).decode("latin-1").translate({i: c for i, c in enumerate(b2u)})
        ends = list(itertools.accumulate(map(len, tokens)))
        self._id_to_str = [EOD_TOKEN] + [text[a:b] for a, b in zip([0] + ends, ends)]
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

    def _add_tokens(self, new_tokens, special_tokens: bool = False) -> int:
        """The World vocabulary is fixed: its ids are the model's embedding rows, and encoding never splits text on
        added tokens. Tokens already in it (``<|endoftext|>``, id 0) register as usual; new ones are refused."""
        unknown = [str(t) for t in new_tokens if str(t) not in self._str_to_id]
        if unknown:
            raise ValueError(
                f"cannot add tokens {unknown}: the RWKV World vocabulary is fixed (the model has no embedding rows "
                "for new tokens, and text is always encoded byte by byte)"
            )
        return super()._add_tokens(new_tokens, special_tokens=special_tokens)

    # ----- encoding ---------------------------------------------------------------------------------------------
    def encode_bytes(self, data: bytes) -> List[int]:
        """Token ids of raw bytes (greedy longest match; equals the official ``encodeBytes``)."""
        return self._encoder.encode(bytes(data))

    # tokenizer(text) and tokenizer.encode(text) of one plain str without options skip transformers' machinery
    # (tens of microseconds per call); they give what it gives, as no special tokens are ever added.
    def __call__(self, text=None, *args, **kwargs):
        names = self.model_input_names
        plain = type(text) is str and not args and (not kwargs or kwargs.keys() <= _PLAIN_KWARGS)
        if plain and "token_type_ids" not in names:
            ids = self._encoder.encode(text.encode())
            data = {"input_ids": ids}
            if "attention_mask" in names:
                data["attention_mask"] = [1] * len(ids)
            return BatchEncoding(data)
        return super().__call__(text, *args, **kwargs)

    def encode(self, text, *args, **kwargs):
        if type(text) is str and not args and (not kwargs or kwargs.keys() <= _PLAIN_KWARGS):
            return self._encoder.encode(text.encode())
        return super().encode(text, *args, **kwargs)

    def tokenize(self, text: str, **kwargs) -> List[str]:
        # Bypasses transformers' added-token splitter on purpose: RWKV has no in-text special tokens.
        # transformers encodes text as convert_tokens_to_ids(tokenize(text)); the returned list carries the ids so
        # that step costs no string lookups.
        ids = self._encoder.encode(text.encode("utf-8"))
        tokens = _TokenStrings(map(self._id_to_str.__getitem__, ids))
        tokens.ids = ids
        return tokens

    def _encode_plus(self, *args, **kwargs):
        # Plain text goes straight to ids (transformers accepts pre-encoded ids here in 4.x and 5.x alike);
        # everything else (pre-split words, marked chat text, batches in 5.x) takes transformers' own path.
        if not kwargs.get("is_split_into_words") and not kwargs.get("sanitize_control_tokens"):
            for name, i in (("text", 0), ("text_pair", 1)):
                text = kwargs[name] if name in kwargs else args[i] if len(args) > i else None
                if isinstance(text, str) and text:
                    ids = self._encoder.encode(text.encode("utf-8"))
                    if name in kwargs:
                        kwargs[name] = ids
                    else:
                        args = args[:i] + (ids,) + args[i + 1 :]
        return super()._encode_plus(*args, **kwargs)

    def _tokenize(self, text, **kwargs):
        return self.tokenize(text)

    def convert_tokens_to_ids(self, tokens):
        if tokens is None:
            return None
        if isinstance(tokens, str):
            return self._convert_token_to_id(tokens)
        if type(tokens) is _TokenStrings and getattr(tokens, "ids", None) is not None:
            return list(tokens.ids)
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
