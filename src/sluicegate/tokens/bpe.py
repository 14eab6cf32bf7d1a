"""A compact byte-pair-encoding tokenizer that gives exactly tiktoken's tokens.

Why our own and not ``tiktoken.Encoding``: tiktoken's Rust core keeps the vocabulary as
several hash maps of owned byte vectors (encoder, decoder, sorted token list) and costs
42-50 MiB of resident memory per worker for o200k_base and another ~23 MiB for cl100k_base:
more than the whole rest of the gateway. The gateway only needs token *counts* of request
texts to pre-charge a limit before the backend answers, so here the vocabulary is one
``bytes`` blob (every token's bytes back to back, in rank order), an offsets array and an
open-addressing hash table of ranks: about 5 MiB for o200k_base, built in a third of a
second. The algorithm is tiktoken's (``src/lib.rs``: split with the encoding's regex, a
piece in the vocabulary is one token, otherwise merge the lowest-ranked adjacent pair
first, leftmost on ties), so the tokens are the same ones; ``tests/tokens`` checks it
against tiktoken itself on a corpus and on generated text. The cost is speed: this is
pure Python, 2-3 times slower per character than tiktoken on text it has not seen, which is
why counts of recurring pieces are cached.

The pre-tokenizing patterns use possessive quantifiers and ``\\p{..}`` classes, which the
standard ``re`` module lacks (classes) and the ``regex`` module has.
"""

from __future__ import annotations

import heapq
import itertools
import re
from array import array
from collections.abc import Iterable

import regex

#: Pieces longer than this many bytes are merged with a heap (n log n) instead of tiktoken's
#: rescanning list (n squared): a megabyte of one letter repeated is a single regex piece,
#: and the gateway must not stall on it. Both give the same merges (see _merge_bounds).
_HEAP_MERGE_MIN = 48

#: Pieces longer than this many bytes are counted in slices of at most this many bytes,
#: each merged on its own (cut at character boundaries, see _count_long). Why: a piece is one
#: match of the pre-tokenizing pattern, and a run without a break (a megabyte of one letter,
#: of spaces or of newlines, a long CJK text) is one piece: merging it whole cost ~6 µs a
#: byte (5.7 s for 1 MB of "a"), on the event loop, for a body any client may send. A slice's
#: merge costs at most what a 512-byte piece does, so counting costs a bounded amount per
#: byte (~2 µs at worst, on runs of random letters or whitespace, against ~0.1-0.3 µs for
#: prose; measured 2026-12-07), and identical slices (a run of one character) are counted
#: once (_SLICE_CACHE_SIZE). The price: no token spans two slices, so a sliced piece may
#: count a token or so more per slice than tiktoken (measured: at most +0.7 %, on runs of
#: spaces and tabs; +0.2 % on random letters or CJK). Fewer is possible in principle (BPE is
#: greedy: a slice can merge better on its own than inside the whole) but never seen;
#: ``tests/tokens/test_bpe.py`` allows a token per thousand. A slight over-count is the safe
#: side for a limiter's estimate, which the settle corrects with the reported usage anyway.
#: ``encode_ordinary`` keeps tiktoken's exact tokens and is not bounded (not for untrusted
#: text on the event loop). Pieces of ordinary text (words, numbers, punctuation,
#: indentation) are far shorter, and their counts exact. 512 rather than less: the error
#: halves with each doubling, and the cost per byte is the same from 64 to 512 bytes.
SLICE_BYTES = 512

#: Counts of slices (bytes -> tokens), per encoding; emptied when full, like the piece cache.
_SLICE_CACHE_SIZE = 1024

#: The per-encoding cache of piece -> token count. Pieces are words with their leading space
#: and punctuation runs, so a few thousand of them cover most prose; a full cache is simply
#: emptied (a re-count costs microseconds).
_PIECE_CACHE_SIZE = 20_000
#: Pieces longer than this are not cached (they rarely recur and would pin memory).
_PIECE_CACHE_MAX_CHARS = 64


class BpeEncoding:
    """One tokenizer: ``count(text)`` and ``encode_ordinary(text)`` as tiktoken has them.

    Special tokens are not recognised in text (``<|endoftext|>`` is ordinary text, as with
    tiktoken's ``encode_ordinary``). Thread-safe for use from several threads: the tables
    are never changed after construction and the cache tolerates races (a lost entry only).
    """

    __slots__ = (
        "_ascii_pattern",
        "_blob",
        "_cache",
        "_mask",
        "_offsets",
        "_pattern",
        "_slices",
        "_table",
        "name",
    )

    def __init__(self, name: str, pattern: str, ranks: Iterable[tuple[bytes, int]]) -> None:
        """Build from ``(token bytes, rank)`` pairs in rank order ``0, 1, ..., n-1``.

        The pairs are consumed one at a time and not kept: a dict of the whole vocabulary
        would cost ~35 MiB for o200k_base, and Python keeps most of such a peak as
        allocator high-water after freeing it.
        """
        self.name = name
        self._pattern = regex.compile(pattern)
        self._ascii_pattern = re.compile(ascii_pattern(pattern))
        blob = bytearray()
        offsets = array("I", [0])
        hashes = array("q")
        for expected, (token, rank) in enumerate(ranks):
            if rank != expected:
                raise ValueError(f"{name}: ranks must be 0..n-1 in order, got {rank} at {expected}")
            blob += token
            offsets.append(len(blob))
            hashes.append(hash(token))
        self._blob = bytes(blob)
        self._offsets = offsets
        size = 1 << max(4, (len(hashes) * 5 // 2).bit_length())  # load factor under 0.4
        self._mask = mask = size - 1
        # Slot holds rank + 1 (0 = empty). Python's hash of bytes is salted per process,
        # which is fine: the table lives and dies with the process.
        table = array("i", bytes(4 * size))
        for rank, token_hash in enumerate(hashes):
            slot = token_hash & mask
            while table[slot]:
                slot = (slot + 1) & mask
            table[slot] = rank + 1
        self._table = table
        self._cache: dict[str, int] = {}
        self._slices: dict[bytes, int] = {}

    def __repr__(self) -> str:
        return f"BpeEncoding({self.name!r}, tokens={len(self._offsets) - 1})"

    @property
    def n_vocab(self) -> int:
        """The number of ordinary tokens (special tokens excluded)."""
        return len(self._offsets) - 1

    def rank(self, token: bytes) -> int | None:
        """The rank (token id) of ``token``'s bytes, or ``None`` when not in the vocabulary."""
        table, mask, blob, offsets = self._table, self._mask, self._blob, self._offsets
        slot = hash(token) & mask
        while True:
            entry = table[slot]
            if not entry:
                return None
            rank = entry - 1
            if blob[offsets[rank] : offsets[rank + 1]] == token:
                return rank
            slot = (slot + 1) & mask

    def count(self, text: str) -> int:
        """How many tokens ``encode_ordinary(text)`` has, without building the list; exactly
        that when no piece of ``text`` is longer than :data:`SLICE_BYTES` bytes (ordinary
        text), else an estimate a little high at worst (see :data:`SLICE_BYTES`). The cost
        is bounded per character of ``text``, whatever it holds."""
        cache = self._cache
        total = 0
        pattern = self._ascii_pattern if text.isascii() else self._pattern
        try:
            for piece in pattern.findall(text):
                cached = cache.get(piece)
                if cached is None:
                    data = piece.encode("utf-8")
                    if len(data) > SLICE_BYTES:
                        cached = self._count_long(data)
                    else:
                        cached = self._count_piece(data)
                    if len(piece) <= _PIECE_CACHE_MAX_CHARS:
                        if len(cache) >= _PIECE_CACHE_SIZE:
                            cache.clear()
                        cache[piece] = cached
                total += cached
        except UnicodeEncodeError:
            return self.count(_without_lone_surrogates(text))
        return total

    def encode_ordinary(self, text: str) -> list[int]:
        """The token ids of ``text``, exactly as ``tiktoken.Encoding.encode_ordinary``."""
        tokens: list[int] = []
        pattern = self._ascii_pattern if text.isascii() else self._pattern
        try:
            for piece in pattern.findall(text):
                data = piece.encode("utf-8")
                rank = self.rank(data)
                if rank is not None:
                    tokens.append(rank)
                    continue
                bounds = self._merge_bounds(data)
                for start, end in itertools.pairwise(bounds):
                    found = self.rank(data[start:end])
                    if found is None:  # every byte is a token, so merges always resolve
                        raise AssertionError(f"{self.name}: no token for {data[start:end]!r}")
                    tokens.append(found)
        except UnicodeEncodeError:
            return self.encode_ordinary(_without_lone_surrogates(text))
        return tokens

    def _count_piece(self, data: bytes) -> int:
        if len(data) == 1 or self.rank(data) is not None:
            return 1
        return len(self._merge_bounds(data)) - 1

    def _count_long(self, data: bytes) -> int:
        """The tokens of a piece longer than :data:`SLICE_BYTES`, counted slice by slice.

        Slices end at a character boundary (never inside a UTF-8 sequence, which would cost
        a token more for nothing), so they hold between ``SLICE_BYTES - 3`` and
        ``SLICE_BYTES`` bytes; a run of one character gives identical slices, counted once.
        """
        slices = self._slices
        total = 0
        start = 0
        end_of_data = len(data)
        while start < end_of_data:
            end = start + SLICE_BYTES
            if end < end_of_data:
                while data[end] & 0xC0 == 0x80:  # a continuation byte: back to its lead
                    end -= 1
            part = data[start:end]
            counted = slices.get(part)
            if counted is None:
                counted = self._count_piece(part)
                if len(slices) >= _SLICE_CACHE_SIZE:
                    slices.clear()
                slices[part] = counted
            total += counted
            start = end
        return total

    def _merge_bounds(self, data: bytes) -> list[int]:
        """The token boundaries of one piece: ``[0, b1, ..., len(data)]``.

        tiktoken's ``byte_pair_merge``: start from single bytes; repeatedly merge the
        adjacent pair whose concatenation has the lowest rank, the leftmost one on ties;
        stop when no adjacent pair is a token.
        """
        if len(data) >= _HEAP_MERGE_MIN:
            return self._merge_bounds_heap(data)
        return self._merge_bounds_list(data)

    def _merge_bounds_list(self, data: bytes) -> list[int]:
        """tiktoken's own loop: rescan the pair ranks for the lowest after each merge."""
        rank = self.rank
        never = 1 << 31
        # starts[i]: where part i begins (the last entry is the end of the piece);
        # ranks[i]: the rank of part i merged with part i+1 (never: not a token).
        starts = list(range(len(data) + 1))
        ranks = [never] * len(starts)
        for i in range(len(data) - 1):
            found = rank(data[i : i + 2])
            if found is not None:
                ranks[i] = found
        while True:
            best = never
            at = -1
            for i in range(len(starts) - 1):
                if ranks[i] < best:
                    best = ranks[i]
                    at = i
            if at < 0:
                return starts
            del starts[at + 1]
            del ranks[at + 1]
            # The merged part's pair with its right neighbour, and the left neighbour's pair.
            if at + 2 < len(starts):
                found = rank(data[starts[at] : starts[at + 2]])
                ranks[at] = never if found is None else found
            else:
                ranks[at] = never
            if at > 0:
                found = rank(data[starts[at - 1] : starts[at + 1]])
                ranks[at - 1] = never if found is None else found

    def _merge_bounds_heap(self, data: bytes) -> list[int]:
        """The same merges as the list version, found with a heap of (rank, start).

        Parts are a linked list over their start offsets. A heap entry is current when its
        part is still alive and still has that pair rank: ranks are unique per byte string,
        and a part's pair only changes by growing, so an equal rank means the same pair.
        Popping (rank, start) in order is tiktoken's order: lowest rank, then leftmost.
        """
        rank = self.rank
        n = len(data)
        following = list(range(1, n + 2))  # following[i]: start of the part after part i
        previous = list(range(-1, n))
        alive = [True] * (n + 1)
        pair: list[int | None] = [None] * (n + 1)
        heap: list[tuple[int, int]] = []
        for i in range(n - 1):
            found = rank(data[i : i + 2])
            pair[i] = found
            if found is not None:
                heap.append((found, i))
        heapq.heapify(heap)
        while heap:
            found, start = heapq.heappop(heap)
            if not alive[start] or pair[start] != found:
                continue
            gone = following[start]
            alive[gone] = False
            after = following[gone]
            following[start] = after
            previous[after] = start
            if after < n:
                merged = rank(data[start : following[after]])
                pair[start] = merged
                if merged is not None:
                    heapq.heappush(heap, (merged, start))
            else:
                pair[start] = None
            before = previous[start]
            if before >= 0:
                merged = rank(data[before:after])
                pair[before] = merged
                if merged is not None:
                    heapq.heappush(heap, (merged, before))
        bounds = [0]
        at = 0
        while at < n:
            at = following[at]
            bounds.append(at)
        return bounds


def _without_lone_surrogates(text: str) -> str:
    """What tiktoken does with text that is not valid UTF-16: replace lone surrogates."""
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


# What the Unicode classes of OpenAI's patterns contain within ASCII. White_Space (Rust's
# and the regex module's \s) has these six ASCII members; the standard re module's \s also
# matches \x1c-\x1f, so it is spelled out.
_ASCII_CLASSES = {
    "L": "A-Za-z",
    "Lu": "A-Z",
    "Ll": "a-z",
    "Lt": "",
    "Lm": "",
    "Lo": "",
    "M": "",
    "N": "0-9",
}
_ASCII_SPACE = "\\t\\n\\x0b\\x0c\\r "
_ESCAPE = re.compile(r"\\p\{(\w+)\}|\\[sS]|\\.|\[|\]|[^\\\[\]]+")


def ascii_pattern(pattern: str) -> str:
    """``pattern`` for the standard ``re`` module, equivalent on ASCII-only text.

    Why: on ASCII text (most prompts) the standard module splits 2-3 times faster than the
    ``regex`` module. Python 3.11's ``re`` has the possessive quantifiers; what it lacks are
    ``\\p{..}`` classes, replaced here by their ASCII members, and Unicode ``\\s``, replaced
    by White_Space's ASCII members. Only ever applied to text for which ``str.isascii()``.
    """
    out: list[str] = []
    in_class = False
    for match in _ESCAPE.finditer(pattern):
        token = match.group(0)
        name = match.group(1)
        if name is not None:
            members = _ASCII_CLASSES[name]
            out.append(members if in_class else f"[{members}]")
        elif token == "\\s":
            out.append(_ASCII_SPACE if in_class else f"[{_ASCII_SPACE}]")
        elif token == "\\S":
            if in_class:
                raise ValueError("\\S inside a character class is not supported")
            out.append(f"[^{_ASCII_SPACE}]")
        else:
            if token == "[":
                in_class = True
            elif token == "]":
                in_class = False
            out.append(token)
    return "".join(out)
