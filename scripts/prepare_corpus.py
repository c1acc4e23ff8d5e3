"""Builds a small, openly licensed English training corpus from Debian packages and tokenises it for RWKV-7.

The corpus is meant for training a SMALL model for a few minutes until it writes recognisable English. It is
made of three sources, each a package of the Debian archive (Debian 12), fetched with ``apt-get download`` at a
pinned version and read straight from the .deb (nothing is installed):

  austen    r-cran-janeaustenr 1.0.0-1: Jane Austen's six novels (Sense and Sensibility, Pride and Prejudice,
            Mansfield Park, Emma, Northanger Abbey, Persuasion) as Project Gutenberg lines inside an R data file.
            The novels are in the public domain; the package is MIT licensed. One document per chapter.
  pydocs    python3.11-doc 3.11.2-6+deb12u9: the reStructuredText sources of the Python 3.11 documentation
            (tutorial, library reference, HOWTOs, what's new...), PSF License Agreement (permissive). Only the
            prose paragraphs are kept (code, tables, directives and markup are dropped); one document per page.
            The FAQ pages become chat examples instead: each question with the prose of its answer.
  wordnet   wordnet-base 1:3.0-37: WordNet 3.0 (Princeton University, WordNet 3.0 license: use, copy, modify and
            distribute for any purpose with the copyright notice kept). Each common word (one with a sense seen in
            WordNet's tagged corpus) becomes a chat example "What does X mean?" answered from its definitions,
            examples and synonyms.

Chat examples are written the way this package's chat template writes a turn ("User: ...\\n\\nAssistant: ...\\n\\n",
no blank line inside a message). Prose paragraphs are joined by a single newline for the same reason: the
template folds blank lines and generation stops at "\\n\\n", so a blank line would read as the end of a turn.

Documents are split into train and held-out sets per source (about 1%, whole documents, fixed seed), shuffled,
tokenised with this repository's World tokenizer and written as flat uint16 token arrays, each document followed
by id 0 (end of document):

  OUT/train.npy, OUT/heldout.npy    numpy uint16 arrays (np.load(path, mmap_mode="r"))
  OUT/manifest.json                 packages (version, license, sha256), per split and per source documents and
                                    tokens, the unigram entropy of the train tokens (nats/token) and the
                                    held-out cross-entropy of a unigram model fitted on train, the baselines a
                                    trained model's held-out loss should beat
  OUT/samples.txt                   the start of a few train documents of each source, to eyeball the cleaning
  OUT/downloads/                    the .deb files (reused by later runs)

Run (needs `apt-get update` to have been run once on the machine; about 10 seconds, 21 MB downloaded):

    .venv/bin/python scripts/prepare_corpus.py                       # -> .cache/corpus/
    .venv/bin/python scripts/prepare_corpus.py --out /tmp/corpus --max-mb 20 --sources austen,wordnet

If a pinned version has left the archive (python3.11-doc gets security updates), the current version is used
and both are recorded in the manifest.
"""

import argparse
import collections
import hashlib
import io
import itertools
import json
import random
import re
import subprocess
import sys
import tarfile
import time
import zlib
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tokenization_rwkv7 import RWKV7Tokenizer  # noqa: E402

EOD = 0  # end-of-document id of the World tokenizer
JOIN = b"\0"  # joins documents for one bulk encode; byte 0 is in no multi-byte token, so it is a token boundary
JOIN_ID = 1  # the id of the single byte 0, turned into EOD after encoding

PACKAGES = {  # "wanted": the files of the package that the source reads
    "austen": {
        "package": "r-cran-janeaustenr",
        "version": "1.0.0-1",
        "license": "novels: public domain (published 1811-1818); package: MIT (Julia Silge)",
        "wanted": lambda path: path.endswith("janeaustenr/data/Rdata.rdb"),
    },
    "pydocs": {
        "package": "python3.11-doc",
        "version": "3.11.2-6+deb12u9",
        "license": "PSF License Agreement for the documentation text (Python Software Foundation)",
        "wanted": lambda path: "/_sources/" in path and path.endswith(".rst.txt"),
    },
    "wordnet": {
        "package": "wordnet-base",
        "version": "1:3.0-37",
        "license": "WordNet 3.0 license (Princeton University): permissive, copyright notice must be kept",
        "wanted": lambda path: re.search(r"wordnet/(index|data)\.(noun|verb|adj|adv)$", path) is not None,
    },
}


# ----- fetching and reading .deb files -------------------------------------------------------------------------


def fetch_deb(package: str, version: str, folder: Path) -> Path:
    """The .deb of package=version in folder, downloaded with apt-get unless already there. Falls back to the
    archive's current version (with a warning) when the pinned one is no longer served."""
    folder.mkdir(parents=True, exist_ok=True)
    have = list(folder.glob(f"{package}_*.deb"))
    if have:
        return max(have)
    for spec in (f"{package}={version}", package):
        done = subprocess.run(["apt-get", "download", spec], cwd=folder, capture_output=True, text=True, check=False)
        if done.returncode == 0:
            break
        print(f"warning: apt-get download {spec} failed: {done.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
    else:
        sys.exit(f"could not download {package}; run `apt-get update` (as root) and retry")
    return max(folder.glob(f"{package}_*.deb"))


def read_deb(path: Path, wanted) -> dict:
    """{member path: bytes} of the files of a .deb whose path satisfies wanted(path), plus "control". A .deb is
    an ar archive holding control.tar.* and data.tar.*; reading it here needs neither dpkg nor root."""
    blob = path.read_bytes()
    if blob[:8] != b"!<arch>\n":
        raise ValueError(f"{path} is not a .deb (ar) file")
    out, pos = {}, 8
    while pos < len(blob):
        header = blob[pos:pos + 60]
        name, size = header[:16].decode().strip().rstrip("/"), int(header[48:58])
        body = blob[pos + 60:pos + 60 + size]
        pos += 60 + size + (size & 1)  # members are 2-byte aligned
        if name.startswith(("control.tar", "data.tar")):
            with tarfile.open(fileobj=io.BytesIO(body), mode="r:*") as tar:
                for member in tar:
                    member_path = member.name.lstrip("./")
                    keep = member_path == "control" if name.startswith("control") else wanted(member_path)
                    if member.isfile() and keep:
                        out[member_path] = tar.extractfile(member).read()
    return out


def deb_version(files: dict) -> str:
    return re.search(rb"^Version: (\S+)", files["control"], re.MULTILINE).group(1).decode()


# ----- text helpers ------------------------------------------------------------------------------------------

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def clean_text(text: str) -> str:
    """Drops control characters (byte 0 joins documents) and collapses runs of spaces."""
    return re.sub(r"[ \t]+", " ", _CONTROL.sub("", text)).strip()


def chat(question: str, answer: str) -> str:
    """One chat turn as the chat template writes it (it folds blank lines inside a message, so do we)."""
    answer = re.sub(r"\n\s*\n+", "\n", answer.strip())
    return f"User: {question.strip()}\n\nAssistant: {answer}\n\n"


# ----- Jane Austen -------------------------------------------------------------------------------------------


def r_character_vectors(rdb: bytes) -> list:
    """The objects of an R lazy-load database (.rdb) holding plain character vectors, as lists of str (None for
    NA). Each object is a 4-byte length and a zlib stream of an R serialization (XDR, format 2 or 3)."""
    vectors, pos = [], 0
    while pos < len(rdb):
        stream = zlib.decompressobj()
        raw = stream.decompress(rdb[pos + 4:])
        pos = len(rdb) - len(stream.unused_data)
        vectors.append(_r_unserialize_strings(raw))
    return vectors


def _r_unserialize_strings(raw: bytes) -> list:
    def int32(at):
        return int.from_bytes(raw[at:at + 4], "big", signed=True)

    if raw[:2] != b"X\n":
        raise ValueError("not an XDR R serialization")
    pos = 14  # "X\n", format version, writer's R version, oldest R version that reads it
    if int32(2) == 3:
        pos += 4 + int32(pos)  # format 3 names the native encoding
    if int32(pos) != 16:  # STRSXP without attributes
        raise ValueError(f"expected a plain character vector, got R type flags {int32(pos):#x}")
    count, pos = int32(pos + 4), pos + 8
    strings = []
    for _ in range(count):
        length, pos = int32(pos + 4), pos + 8  # CHARSXP flags (encoding bits), length (-1: NA)
        strings.append(None if length < 0 else raw[pos:pos + length].decode("utf-8"))
        pos += max(length, 0)
    return strings


_CHAPTER = re.compile(r"^\s*chapter\s+[0-9ivxlc]+\.?\s*$", re.IGNORECASE)
_VOLUME = re.compile(r"^\s*(volume|vol\.)\s+[0-9ivxlc]+\.?\s*$", re.IGNORECASE)
_THE_END = re.compile(r"^\s*(the end|finis)\s*$", re.IGNORECASE)
_EDITORIAL = re.compile(r"^\[.*\]$|^[*\s]+$")  # "[End volume one of this edition...]", "* * * * *"


def austen_documents(files: dict) -> list:
    rdb = next(v for k, v in files.items() if k.endswith("janeaustenr/data/Rdata.rdb"))
    docs = []
    for lines in r_character_vectors(rdb):
        title = next(line for line in lines if line and line.strip()).strip().title()
        for number, chapter in enumerate(_split_chapters(lines), 1):
            text = "\n".join(_paragraphs(chapter))
            if len(text) > 200:
                docs.append({"source": "austen", "id": f"{title}, chapter {number}", "text": text})
    return docs


def _split_chapters(lines: list) -> list:
    """Lines of each chapter; the title page and preface before chapter 1, volume headings and the editor's
    note after "THE END" are dropped."""
    chapters = []
    for line in lines:
        line = line or ""
        if _THE_END.match(line):
            break
        if _CHAPTER.match(line):
            chapters.append([])
        elif chapters and not _VOLUME.match(line):
            chapters[-1].append(line)
    return chapters


def _paragraphs(lines: list) -> list:
    """Gutenberg's hard-wrapped lines joined into paragraphs (blank line = paragraph end); _italics_ unmarked."""
    paragraphs, current = [], []
    for line in lines + [""]:
        if line.strip():
            current.append(line.strip())
        elif current:
            paragraph = clean_text(" ".join(current).replace("_", ""))
            if not _EDITORIAL.match(paragraph):
                paragraphs.append(paragraph)
            current = []
    return paragraphs


# ----- Python documentation ----------------------------------------------------------------------------------

# directives whose body is prose (kept, without the directive line); every other directive's body is dropped
_PROSE_DIRECTIVES = {
    "note", "warning", "tip", "important", "caution", "attention", "seealso", "versionadded", "versionchanged",
    "deprecated", "deprecated-removed", "impl-detail", "function", "method", "class", "attribute", "data",
    "exception", "decorator", "classmethod", "staticmethod", "coroutinefunction", "coroutinemethod",
    "abstractmethod", "decoratormethod", "describe", "cmdoption", "option", "envvar", "opcode", "pdbcommand",
    "c:function", "c:macro", "c:type", "c:member", "c:var", "c:struct", "c:enum", "c:enumerator",
    "availability", "rubric", "topic", "sidebar", "admonition", "glossary", "only", "container",
}
_DIRECTIVE = re.compile(r"^\s*\.\.\s+([\w:-]+)::(.*)$")
_UNDERLINE = re.compile(r"^\s*([=\-~^*#+`'\".:_])\1{2,}\s*$")
_ROLE = re.compile(r":([\w:-]+):`([^`]*)`")
_LINK = re.compile(r"`([^`<]+?)\s*<[^>]*>`__?")
_INLINE = [
    (re.compile(r"``([^`]+)``"), r"\1"),  # literals
    (re.compile(r"`([^`]+)`_{0,2}"), r"\1"),  # references, interpreted text
    (re.compile(r"\*\*([^*]+)\*\*"), r"\1"),
    (re.compile(r"(?<![\w*])\*([^*\s][^*]*)\*(?![\w*])"), r"\1"),
    (re.compile(r"\s*\[#\w*\]_|\s*\[\d+\]_"), ""),  # footnote references
    (re.compile(r"\|(\w+)\|"), r"\1"),  # substitutions
    (re.compile(r"(?<=[A-Za-z0-9])_(?=[\s.,;:)]|$)"), ""),  # hyperlink references: BLAKE2_
    (re.compile(r"\\ ?"), ""),  # escapes
]


def _role_text(match) -> str:
    """The visible text of :role:`target`: `title <target>` shows title, `~a.b.c` shows c, `!x` shows x,
    :pep:`8` shows PEP 8."""
    role, inner = match.groups()
    titled = re.match(r"(.+?)\s*<[^>]*>$", inner)
    if titled:
        return titled.group(1)
    if role in ("pep", "rfc"):
        return f"{role.upper()} {inner}"
    inner = inner.lstrip("!")
    return inner.rsplit(".", 1)[-1] if inner.startswith("~") else inner


def unmark(text: str) -> str:
    """reStructuredText inline markup reduced to the text a reader sees."""
    text = _LINK.sub(r"\1", _ROLE.sub(_role_text, text))
    for pattern, replacement in _INLINE:
        text = pattern.sub(replacement, text)
    return clean_text(text.replace("~", ""))


def _is_prose(text: str) -> bool:
    """A paragraph of running text: several words, mostly letters, ending like a sentence."""
    words = text.split()
    letters = sum(c.isalpha() or c == " " for c in text)
    return len(words) >= 6 and letters >= 0.8 * len(text) and text[-1] in ".!?)\"'" and not text.startswith(">>>")


def rst_sections(source: str) -> list:
    """[(heading, [paragraph or None, ...]), ...] of a reStructuredText page (heading "" before the first one).

    Blocks are the runs of lines between blank lines; a paragraph is a block of prose with its markup removed.
    Dropped, each leaving a None where it was: code (after "::", in code directives, doctest), tables, field
    lists, directive lines and the bodies of non-prose directives (found by their indentation), and any other
    block that does not read as prose."""
    sections, skip_deeper_than = [("", [])], None
    for block in _blocks(source):
        indent = len(block[0]) - len(block[0].lstrip())
        if skip_deeper_than is not None and indent > skip_deeper_than:
            _mark_dropped(sections)
            continue
        skip_deeper_than = None
        if len(block) >= 2 and _UNDERLINE.match(block[-1]) and not _UNDERLINE.match(block[-2]):
            sections.append((clean_text(block[-2]), []))  # a heading (the overline, if any, is block[0])
            continue
        directive = _DIRECTIVE.match(block[0])
        if directive:
            name, rest = directive.group(1), directive.group(2).strip()
            if name not in _PROSE_DIRECTIVES:
                skip_deeper_than = indent
                _mark_dropped(sections)
                continue
            # the body's first lines may follow the directive line; option lines (":name: value") are not prose
            block = ([rest] if rest and name in {"note", "warning", "seealso", "tip", "important"} else []) + [
                line for line in block[1:] if not line.strip().startswith(":")]
            if not block:
                _mark_dropped(sections)
                continue
        if block[-1].endswith("::"):  # a literal (code) block follows, indented deeper
            skip_deeper_than = indent
            block[-1] = block[-1][:-1]
        stripped = [line.strip() for line in block]
        text = unmark(" ".join(re.sub(r"^([*\-+]|#\.|\d+\.)\s+", "", line) for line in stripped))
        if stripped[0].startswith((">>>", "+-", "==", ":", "..", "%")) or not _is_prose(text):
            _mark_dropped(sections)
        else:
            sections[-1][1].append(text)
    return sections


def _blocks(source: str) -> list:
    """The runs of non-blank lines (right-stripped) of a text."""
    blocks, current = [], []
    for line in source.splitlines() + [""]:
        if line.strip():
            current.append(line.rstrip())
        elif current:
            blocks.append(current)
            current = []
    return blocks


def _mark_dropped(sections: list):
    if not sections[-1][1] or sections[-1][1][-1] is not None:
        sections[-1][1].append(None)


_SKIP_PAGES = ("license", "copyright", "genindex", "contents", "whatsnew/changelog")


def pydocs_documents(files: dict) -> list:
    docs = []
    for path, data in sorted(files.items()):
        if not path.endswith(".rst.txt"):
            continue
        page = path.split("/_sources/", 1)[1][: -len(".rst.txt")]
        if page.startswith(_SKIP_PAGES):
            continue
        sections = rst_sections(data.decode("utf-8", "replace"))
        if page.startswith("faq/"):
            docs += _faq_chats(page, sections)
            continue
        text = "\n".join(p for _, paragraphs in sections for p in paragraphs if p is not None)
        if len(text) > 300:
            docs.append({"source": "pydocs", "id": page, "text": text})
    return docs


def _faq_chats(page: str, sections: list) -> list:
    """Each FAQ heading that is a question, with the prose paragraphs that open its answer (up to three, and
    none after a dropped block: the text around code often needs the code)."""
    chats = []
    for heading, paragraphs in sections:
        answer = list(itertools.takewhile(lambda p: p is not None, paragraphs))[:3]
        if heading.endswith("?") and answer:
            chats.append({"source": "pydocs-faq", "id": f"{page}: {heading}", "text": chat(heading, "\n".join(answer))})
    return chats


# ----- WordNet -----------------------------------------------------------------------------------------------

_POS_NAMES = {"n": "noun", "v": "verb", "a": "adjective", "s": "adjective", "r": "adverb"}
_QUESTIONS = [  # {kind} is "word" or "phrase"
    'What does "{w}" mean?',
    'What is the meaning of the {kind} "{w}"?',
    'Define "{w}".',
    'Can you explain what "{w}" means?',
    'What does the {kind} "{w}" mean?',
]


def wordnet_documents(files: dict, rng: random.Random) -> list:
    senses = collections.defaultdict(list)  # lemma -> [(pos, synset)] in WordNet's frequency order per pos
    for pos in ("noun", "verb", "adj", "adv"):
        data = next(v for k, v in files.items() if k.endswith(f"wordnet/data.{pos}"))
        index = next(v for k, v in files.items() if k.endswith(f"wordnet/index.{pos}"))
        for lemma, offsets in _common_lemmas(index):
            senses[lemma] += [_synset(data, offset) for offset in offsets]
    docs = []
    for lemma, synsets in senses.items():
        word = lemma.replace("_", " ")
        question = rng.choice(_QUESTIONS).format(w=word, kind="phrase" if " " in word else "word")
        docs.append({"source": "wordnet", "id": lemma, "text": chat(question, _definition_answer(word, synsets))})
    return docs


def _common_lemmas(index: bytes):
    """(lemma, synset offsets) of the index lines of lowercase words with a sense seen in the tagged corpus."""
    for line in index.decode("utf-8").splitlines():
        if line.startswith("  "):  # the license header
            continue
        fields = line.split()
        lemma, pointer_count = fields[0], int(fields[3])
        synset_count, tagged = int(fields[2]), int(fields[5 + pointer_count])
        if tagged > 0 and re.fullmatch(r"[a-z][a-z'_-]*", lemma):
            yield lemma, [int(x) for x in fields[-synset_count:]]


def _synset(data: bytes, offset: int) -> dict:
    """The synset at a byte offset of a data.* file: part of speech, words, definitions, examples."""
    line = data[offset:data.index(b"\n", offset)].decode("utf-8")
    head, gloss = line.split(" | ", 1)
    fields = head.split()
    words = [re.sub(r"\(.*\)$", "", w).replace("_", " ") for w in fields[4:4 + 2 * int(fields[3], 16):2]]
    parts = [p.strip() for p in re.split(r';\s*(?=")|;\s+', gloss.strip()) if p.strip()]
    examples = [p.strip('"').strip() for p in parts if p.startswith('"')]
    definition = "; ".join(p for p in parts if not p.startswith('"'))
    return {"pos": _POS_NAMES[fields[2]], "words": words, "definition": definition, "examples": examples}


def _sense_text(word: str, synset: dict) -> str:
    definition = synset["definition"].rstrip(".")
    text = ("to " if synset["pos"] == "verb" and not definition.startswith("to ") else "") + definition + "."
    if synset["examples"]:
        text += f' For example: "{synset["examples"][0]}".'
    synonyms = [w for w in synset["words"] if w.lower() != word.lower()][:4]
    if synonyms:
        text += " Similar words: " + ", ".join(synonyms) + "."
    return text


def _definition_answer(word: str, synsets: list) -> str:
    synsets = synsets[:3]
    if len(synsets) == 1:
        pos = synsets[0]["pos"]
        article = "an" if pos[0] in "aeiou" else "a"
        return f'As {article} {pos}, "{word}" means {_sense_text(word, synsets[0])}'
    kind = "phrase" if " " in word else "word"
    lines = [f'The {kind} "{word}" has several meanings. The most common are:']
    lines += [f"{i}. ({s['pos']}) {_sense_text(word, s)}" for i, s in enumerate(synsets, 1)]
    return "\n".join(lines)


# ----- split, tokenise, statistics ---------------------------------------------------------------------------


def split_documents(docs: list, fraction: float, rng: random.Random) -> tuple:
    """(train, heldout): a fraction of each source's documents (at least one) held out; both shuffled."""
    by_source = collections.defaultdict(list)
    for doc in docs:
        by_source[doc["source"]].append(doc)
    train, heldout = [], []
    for source in sorted(by_source):
        group = by_source[source]
        rng.shuffle(group)
        n = max(1, round(fraction * len(group)))
        heldout += group[:n]
        train += group[n:]
    rng.shuffle(train)
    rng.shuffle(heldout)
    return train, heldout


def tokenize(tokenizer, docs: list, chunk_bytes: int = 1 << 24) -> np.ndarray:
    """One uint16 array of all documents, each followed by EOD. Documents are joined by byte 0 and encoded in
    large pieces, which takes the tokenizer's vectorised path (tens of MB/s) instead of a Python loop per
    document; the result equals encoding each document alone, since byte 0 is always a token of its own."""
    pieces, batch, size = [], [], 0
    for doc in docs + [None]:
        if doc is None or size > chunk_bytes:
            if batch:
                ids = np.asarray(tokenizer.encode_bytes(JOIN.join(batch) + JOIN), dtype=np.uint16)
                ids[ids == JOIN_ID] = EOD
                pieces.append(ids)
            batch, size = [], 0
        if doc is not None:
            batch.append(doc["text"].encode("utf-8"))
            size += len(batch[-1])
    return np.concatenate(pieces) if pieces else np.zeros(0, np.uint16)


def unigram_baselines(train: np.ndarray, heldout: np.ndarray, vocab_size: int) -> dict:
    """The entropy of the train unigram distribution, and the held-out cross-entropy of that distribution
    (add-0.5 smoothed so unseen tokens cost a finite amount), in nats per token."""
    counts = np.bincount(train, minlength=vocab_size).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    smoothed = (counts + 0.5) / (counts.sum() + 0.5 * vocab_size)
    return {
        "train_unigram_entropy_nats": float(-(p * np.log(p)).sum()),
        "heldout_unigram_cross_entropy_nats": float(-np.log(smoothed[heldout]).mean()) if len(heldout) else None,
        "distinct_train_tokens": int((counts > 0).sum()),
    }


def cap_train(train: list, tokens: np.ndarray, budget_tokens: int) -> tuple:
    """Keeps the first train documents (already shuffled) whose tokens fit the budget."""
    if len(tokens) <= budget_tokens:
        return train, tokens
    ends = np.flatnonzero(tokens == EOD) + 1  # document i ends at ends[i]
    keep = int(np.searchsorted(ends, budget_tokens, side="right"))
    print(f"--max-mb: keeping {keep} of {len(train)} train documents")
    return train[:keep], tokens[:ends[keep - 1]] if keep else tokens[:0]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def split_summary(docs: list, ids: np.ndarray) -> dict:
    """Documents, tokens (EOD included) and characters of a split, in all and per source."""
    ends = np.flatnonzero(ids == EOD) + 1  # document i is ids[ends[i - 1]:ends[i]]
    lengths = np.diff(ends, prepend=0)
    per_source = collections.defaultdict(lambda: {"documents": 0, "tokens": 0, "characters": 0})
    for doc, length in zip(docs, lengths.tolist()):
        entry = per_source[doc["source"]]
        entry["documents"] += 1
        entry["tokens"] += length
        entry["characters"] += len(doc["text"])
    return {"documents": len(docs), "tokens": len(ids), "file_mb": round(ids.nbytes / 2**20, 2),
            "sources": dict(sorted(per_source.items()))}


def write_samples(path: Path, train: list, per_source: int = 3, chars: int = 600):
    """The start of the first few train documents of each source (train is shuffled, so these are random)."""
    shown = collections.Counter()
    with open(path, "w") as f:
        for doc in train:
            if shown[doc["source"]] < per_source:
                shown[doc["source"]] += 1
                f.write(f"===== {doc['source']}: {doc['id']}\n{doc['text'][:chars]}\n\n")


def load_source(source: str, downloads: Path, seed: int) -> tuple:
    """(documents, package record for the manifest) of one source."""
    spec = PACKAGES[source]
    deb = fetch_deb(spec["package"], spec["version"], downloads)
    files = read_deb(deb, spec["wanted"])
    version = deb_version(files)
    if version != spec["version"]:
        print(f"warning: using {spec['package']} {version}, not the pinned {spec['version']} (no longer served, "
              "or an older download in the downloads folder)", file=sys.stderr)
    if source == "austen":
        docs = austen_documents(files)
    elif source == "pydocs":
        docs = pydocs_documents(files)
    else:
        docs = wordnet_documents(files, random.Random(seed))
    package = {"source": source, "package": spec["package"], "registry": "Debian 12 archive (apt-get download)",
               "version_pinned": spec["version"], "version": version, "license": spec["license"],
               "file": deb.name, "sha256": sha256(deb)}
    return docs, package


# ----- main --------------------------------------------------------------------------------------------------


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / ".cache" / "corpus",
                        help="output folder (default: .cache/corpus in the repository)")
    parser.add_argument("--max-mb", type=float, default=48.0,
                        help="cap on the size of train.npy + heldout.npy in MiB; train documents beyond it are "
                             "dropped (default: 48)")
    parser.add_argument("--sources", default="austen,pydocs,wordnet",
                        help="comma-separated sources to include, of: austen, pydocs, wordnet (default: all)")
    parser.add_argument("--heldout-fraction", type=float, default=0.01,
                        help="fraction of each source's documents held out (default: 0.01, at least one)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split and of the shuffles (default: 0)")
    args = parser.parse_args(argv)

    sources = [s.strip() for s in args.sources.split(",") if s.strip()]
    unknown = set(sources) - set(PACKAGES)
    if unknown:
        parser.error(f"unknown sources {sorted(unknown)}; choose from {sorted(PACKAGES)}")
    started = time.time()
    args.out.mkdir(parents=True, exist_ok=True)

    docs, packages = [], []
    for source in sources:
        found, package = load_source(source, args.out / "downloads", args.seed)
        print(f"{source}: {len(found)} documents, {sum(len(d['text']) for d in found) / 1e6:.1f} M characters")
        docs += found
        packages.append(package)

    train, heldout = split_documents(docs, args.heldout_fraction, random.Random(args.seed))
    tokenizer = RWKV7Tokenizer.from_pretrained(str(REPO))
    heldout_ids = tokenize(tokenizer, heldout)
    budget = int(args.max_mb * 2**20 / 2) - len(heldout_ids)
    train, train_ids = cap_train(train, tokenize(tokenizer, train), budget)

    np.save(args.out / "train.npy", train_ids)
    np.save(args.out / "heldout.npy", heldout_ids)
    write_samples(args.out / "samples.txt", train)
    manifest = {
        "description": "English corpus for a small RWKV-7 model; made by scripts/prepare_corpus.py",
        "format": "numpy uint16 token ids (RWKV World tokenizer, rwkv_vocab_v20230424), each document followed "
                  "by id 0 (end of document); token counts and unigram statistics include those 0s",
        "packages": packages,
        "settings": {"sources": sources, "max_mb": args.max_mb, "heldout_fraction": args.heldout_fraction,
                     "seed": args.seed},
        "splits": {name: split_summary(split_docs, ids)
                   for name, split_docs, ids in (("train", train, train_ids), ("heldout", heldout, heldout_ids))},
        "files": {name: {"bytes": (args.out / name).stat().st_size, "sha256": sha256(args.out / name)}
                  for name in ("train.npy", "heldout.npy")},
        **unigram_baselines(train_ids, heldout_ids, len(tokenizer)),
        "seconds": round(time.time() - started, 1),
    }
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    for name, split in manifest["splits"].items():
        print(f"{name}: {split['documents']} documents, {split['tokens']} tokens ({split['file_mb']} MiB)")
    print(f"unigram entropy of train {manifest['train_unigram_entropy_nats']:.3f} nats/token, unigram cross-entropy "
          f"on held-out {manifest['heldout_unigram_cross_entropy_nats']:.3f}; {manifest['seconds']} s")
    print(f"wrote {args.out}/train.npy, heldout.npy, manifest.json, samples.txt")


if __name__ == "__main__":
    main()
