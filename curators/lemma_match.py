"""Which class a caption names, for all classes in one pass over a column of captions.

LAIONet's rule: a caption names a class when it contains, as whole words, one of the lemmas
that belong to that class alone (a lemma two classes share names neither); a caption that
names more than one class is dropped.

How it is matched: captions are lower-cased and cut into words (letters and digits; hyphens,
apostrophes and other punctuation separate words, so "Jack-o'-lantern" and "jack o lantern"
are the same three words). Every word of every lemma gets an id; a caption's words become ids
(a word no lemma uses: -1). A lemma of n words is then an n-gram of ids, packed into one
64-bit key, and the matcher looks up every n-gram of the captions, n = 1..longest lemma, in
sorted key tables: a word-level automaton run column-wise over all captions with numpy and
Arrow kernels, never a regex per class. Where matches overlap, the longest wins ("tiger
shark" names the shark, not the tiger).

Plurals follow WordNet's noun morphology (morphy's detachment rules, run backwards, plus a
short table of irregular plurals): the last word of a lemma may be plural, "golden
retrievers" names the golden retriever.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .labels import ImageNetClass

# Byte map: ASCII letters lower-cased, digits and non-ASCII bytes (letters of other scripts)
# kept, every other ASCII byte a space. Applied to the UTF-8 bytes of a whole column at once.
_BYTES = np.array([c + 32 if 65 <= c <= 90 else c if (97 <= c <= 122 or 48 <= c <= 57 or c >= 128) else 32 for c in range(256)], dtype=np.uint8)  # fmt: skip
_TABLE = _BYTES.tobytes()
BITS = 21  # bits per word id in a packed key: 3 words per int64; longer lemmas chain
# WordNet noun.exc entries among ImageNet lemma heads (plural -> singular), run backwards.
IRREGULAR = {"mouse": "mice", "louse": "lice", "goose": "geese", "ox": "oxen", "foot": "feet",
             "tooth": "teeth", "wolf": "wolves", "knife": "knives", "leaf": "leaves",
             "loaf": "loaves", "shelf": "shelves", "calf": "calves", "half": "halves",
             "fish": "fish", "sheep": "sheep", "deer": "deer", "moose": "moose",
             "bison": "bison", "salmon": "salmon", "trout": "trout", "child": "children",
             "person": "people", "cactus": "cacti", "fungus": "fungi", "octopus": "octopuses",
             "hippopotamus": "hippopotamuses", "bus": "buses", "wife": "wives"}  # fmt: skip


def words(text: str) -> list[str]:
    """The words of ``text`` as the matcher sees them."""
    return text.encode("utf-8").translate(_TABLE).decode("utf-8").split()


def _normalised(arr: pa.StringArray) -> pa.StringArray:
    """The column with its bytes mapped through _BYTES: same offsets, one pass over the data."""
    if arr.offset or arr.null_count:
        arr = pa.concat_arrays([pc.fill_null(arr, "")])  # offset 0, no validity bitmap
    _, offsets, data = arr.buffers()
    mapped = data.to_pybytes().translate(_TABLE) if data is not None else b""  # C speed
    return pa.StringArray.from_buffers(len(arr), offsets, pa.py_buffer(mapped))


def plural(word: str) -> str:
    """The plural WordNet's morphy would reduce back to ``word``: its noun detachment rules
    (s<-ses, x<-xes, z<-zes, ch<-ches, sh<-shes, man<-men, y<-ies) run backwards."""
    if word in IRREGULAR:
        return IRREGULAR[word]
    if word.endswith("man"):
        return word[:-3] + "men"
    if word.endswith("s") and not word.endswith(("ss", "us", "is", "as", "os")):
        return word  # already plural ("woods", "sunglasses") or Latin: no "-ses" form
    if word.endswith(("s", "x", "z", "ch", "sh")):
        return word + "es"
    if word.endswith("y") and len(word) > 1 and word[-2] not in "aeiou":
        return word[:-1] + "ies"
    return word + "s"


def class_lemmas(classes: Iterable[ImageNetClass]) -> dict[tuple[str, ...], int]:
    """Word sequence -> class, for the lemmas (and their plurals) that name one class alone.
    Lemmas are compared as words, so "Jack-o'-lantern" and "jack o' lantern" are one lemma."""
    owners: dict[tuple[str, ...], set[int]] = defaultdict(set)
    for c in classes:
        for lemma in {c.name, *c.lemmas}:
            seq = tuple(words(lemma))
            if seq:
                owners[seq].add(c.index)
                owners[(*seq[:-1], plural(seq[-1]))].add(c.index)
    return {seq: next(iter(o)) for seq, o in owners.items() if len(o) == 1}


@dataclass
class Matches:
    """Per caption: the one class it names, or -1 (none, or more than one)."""

    label: np.ndarray  # int32, one per caption
    lemma: np.ndarray  # int32 index into LemmaMatcher.lemmas of the match that decided, or -1
    named: np.ndarray  # int8: how many distinct classes the caption names (0, 1, 2+ as 2)


class LemmaMatcher:
    """``match(captions)`` for a column of captions (a list or an Arrow string array)."""

    def __init__(self, lemmas: dict[tuple[str, ...], int]) -> None:
        vocab = sorted({w for seq in lemmas for w in seq})
        if len(vocab) >= 1 << BITS:
            raise ValueError("too many distinct lemma words")
        self.words = vocab
        self.vocab = pa.array(vocab, pa.string())
        ids = {w: i for i, w in enumerate(vocab)}
        self.lemmas = sorted(lemmas, key=lambda s: (len(s), s))
        self.longest = max(map(len, self.lemmas), default=0)
        self._tables: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        by_len: dict[int, list[tuple[int, int, int]]] = defaultdict(list)
        for n, seq in enumerate(self.lemmas):
            by_len[len(seq)].append((self._key([ids[w] for w in seq]), lemmas[seq], n))
        for length, rows in by_len.items():
            rows.sort()
            keys, labels, which = (np.array(col) for col in zip(*rows, strict=True))
            self._tables[length] = (keys.astype(np.uint64), labels.astype(np.int32), which.astype(np.int32))  # fmt: skip

    @classmethod
    def for_classes(cls, classes: Sequence[ImageNetClass]) -> LemmaMatcher:
        return cls(class_lemmas(classes))

    @staticmethod
    def _key(ids: Sequence[int]) -> int:
        """Words packed 3 to an int64, longer sequences folded by a multiplicative hash (a
        hash hit is confirmed against the words, so a collision cannot match)."""
        key = 0
        for i, w in enumerate(ids):
            if i and i % 3 == 0:
                key = (key * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
            key ^= (w + 1) << (BITS * (i % 3))
        return key

    def word_ids(self, captions) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(positions of the words some lemma uses, in the flat word sequence of all
        captions; their word ids; the caption each belongs to)."""
        arr = captions if isinstance(captions, pa.Array | pa.ChunkedArray) else pa.array(captions, pa.string())  # fmt: skip
        if isinstance(arr, pa.ChunkedArray):
            arr = arr.combine_chunks()
        if arr.type != pa.string():
            arr = arr.cast(pa.string())
        lists = pc.ascii_split_whitespace(_normalised(arr))
        found = pc.index_in(pc.list_flatten(lists), value_set=self.vocab)
        at = np.flatnonzero(found.is_valid().to_numpy(zero_copy_only=False))
        ids = np.frombuffer(found.buffers()[1], np.int32, len(found), found.offset * 4)[at]
        offsets = np.frombuffer(lists.buffers()[1], np.int32, len(lists) + 1, lists.offset * 4)
        return at, ids, np.searchsorted(offsets, at, side="right") - 1

    def match(self, captions) -> Matches:
        # Only words some lemma uses can start or continue a match: work on those alone.
        at, wid, cap = self.word_ids(captions)
        hits = []  # (caption, start, length, label, lemma) arrays per lemma length
        n = len(at)
        key = np.zeros(n, dtype=np.uint64)
        alive = np.ones(n, dtype=bool)  # the n-gram from here is consecutive words of one caption
        for length in range(1, self.longest + 1):
            end = length - 1
            if end >= n:
                break
            m = n - end
            alive = alive[:m] & (at[end:] == at[:m] + end) & (cap[end:] == cap[:m])
            key = key[:m]
            if end and end % 3 == 0:
                key = key * np.uint64(0x9E3779B97F4A7C15)
            key = key ^ ((wid[end:] + 1).astype(np.uint64) << np.uint64(BITS * (end % 3)))
            if length not in self._tables:
                continue
            starts = np.flatnonzero(alive)
            if len(starts) == 0:
                break
            keys, labels, which = self._tables[length]
            pos = np.minimum(np.searchsorted(keys, key[starts]), len(keys) - 1)
            found = keys[pos] == key[starts]
            starts, pos = starts[found], pos[found]
            if length > 3:  # a folded key: confirm the words themselves
                ok = np.array([self._words_at(wid, s, length) == self.lemmas[which[p]] for s, p in zip(starts, pos, strict=True)], dtype=bool)  # fmt: skip
                starts, pos = starts[ok], pos[ok]
            hits.append((cap[starts], at[starts], np.full(len(starts), length), labels[pos], which[pos]))  # fmt: skip
        return self._decide(len(captions), hits)

    def _words_at(self, ids: np.ndarray, start: int, length: int) -> tuple[str, ...]:
        return tuple(self.words[int(i)] for i in ids[start : start + length])

    @staticmethod
    def _decide(count: int, hits: list) -> Matches:
        label = np.full(count, -1, dtype=np.int32)
        lemma = np.full(count, -1, dtype=np.int32)
        named = np.zeros(count, dtype=np.int8)
        if not hits or not sum(len(h[0]) for h in hits):
            return Matches(label, lemma, named)
        cap, start, length, lab, which = (np.concatenate(c) for c in zip(*hits, strict=True))
        end = start + length
        # Longest wins: sorted by (start, longest first), a match ending within the reach of
        # an earlier one lies inside a longer lemma. Word positions are global (captions in
        # order), so one caption's matches never cover another's.
        order = np.lexsort((-length, start))
        cap, end, lab, which = cap[order], end[order], lab[order], which[order]
        reach = np.maximum.accumulate(end)
        kept = np.ones(len(end), dtype=bool)
        kept[1:] = reach[:-1] < end[1:]
        cap, lab, which = cap[kept], lab[kept], which[kept]
        # Per caption (cap is sorted): one class when its smallest and largest label agree.
        first = np.flatnonzero(np.r_[True, cap[1:] != cap[:-1]])
        low, high = np.minimum.reduceat(lab, first), np.maximum.reduceat(lab, first)
        one = low == high
        named[cap[first]] = np.where(one, 1, 2)
        label[cap[first[one]]] = lab[first[one]]
        lemma[cap[first[one]]] = which[first[one]]
        return Matches(label, lemma, named)
