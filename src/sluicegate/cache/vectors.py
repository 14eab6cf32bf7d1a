"""The semantic cache's memory: unit vectors, the answers stored under them, and the search for
the nearest one. Pure and synchronous (no I/O, no clock of its own: times are passed in).

Vectors are normalised once, when they arrive, and held as ``array('f')`` (4 bytes a
component: 6 KiB for 1,536 dimensions), so a cosine is a dot product. Pure Python computes one
such dot product of 1,536 components in ~80 µs (Python 3.11, no numpy): scanning thousands of
entries that way would hold the event loop for a fraction of a second. So each vector also
carries its components' signs as one integer, and a search first ranks a partition's entries
by the Hamming distance of their signs to the query's (one XOR and one ``bit_count`` each,
well under a microsecond: binary quantisation, SimHash on the coordinate axes), keeps those
within :func:`sign_bound` of the threshold, and computes the exact cosine of only the
:data:`EXACT_CHECKS` nearest of them. For two directions at angle θ the expected share of
differing signs is θ/π (for isotropic vectors; an axis where all embeddings share a sign only
lowers it), so the bound adds a wide margin and a true neighbour is not cut by the prefilter;
the exact cosine decides every hit.
"""

from __future__ import annotations

import itertools
import math
import operator
import sys
from array import array
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass

#: Entries whose exact cosine a search computes at most (the nearest by their signs).
EXACT_CHECKS = 8
#: Share of differing signs added to the expected share at the threshold (see module docs).
SIGN_MARGIN = 0.15

#: The bytes of answers and vectors one product's store keeps at most (``max_entries``
#: counts answers whatever their size): 10,000 answers of 2 KiB with 1,536-dimension vectors
#: take ~80 MiB.
MAX_STORE_BYTES = 256 * 1024 * 1024

#: What float32 components may leave of an exact match (so threshold 0 still finds the same
#: text: its cosine with itself may come out as 0.99999994).
_ROUNDING = 1e-6
#: Byte → b"1" if its high bit (a float32's sign, little-endian top byte) is set, else b"0".
_SIGN_DIGITS = bytes(0x31 if b & 0x80 else 0x30 for b in range(256))


@dataclass(frozen=True, slots=True)
class Vector:
    """A unit vector and its components' signs (bit ``n - 1 - i`` set when component ``i``
    is negative)."""

    values: array[float]
    signs: int

    def cosine(self, other: Vector) -> float:
        """The cosine similarity of two unit vectors of the same length."""
        total: float = sum(map(operator.mul, self.values, other.values))
        return total


def unit_vector(components: Sequence[float] | array[float]) -> Vector:
    """``components`` normalised to unit length. Raises ``ValueError`` for an empty vector,
    a zero vector or one with a component that is not finite."""
    values = components if isinstance(components, array) else array("f", components)
    if not values:
        raise ValueError("an empty vector")
    norm = math.sqrt(sum(map(operator.mul, values, values)))
    if not norm or not math.isfinite(norm):
        raise ValueError("a vector without a direction")
    # Embedding models answer unit vectors already: scaling those again would change nothing
    # but the last bits, and costs ~150 µs (1,536 components).
    unit = values if abs(norm - 1.0) < 1e-4 else array("f", map((1.0 / norm).__mul__, values))
    raw = unit.tobytes()
    if sys.byteorder != "little":  # pragma: no cover - big-endian hosts
        unit.byteswap()
        raw = unit.tobytes()
        unit.byteswap()
    return Vector(unit, int(raw[3::4].translate(_SIGN_DIGITS), 2))


def float32_vector(raw: bytes) -> Vector:
    """The unit vector of little-endian float32 components (an embeddings answer's
    ``encoding_format: base64``, decoded). Raises ``ValueError`` when ``raw`` is not such."""
    if not raw or len(raw) % 4:
        raise ValueError("not a whole number of float32 components")
    values = array("f")
    values.frombytes(raw)
    if sys.byteorder != "little":  # pragma: no cover - big-endian hosts
        values.byteswap()
    return unit_vector(values)


def sign_bound(threshold: float, dimensions: int) -> int:
    """The most differing signs an entry within ``threshold`` (a cosine distance) may show
    and still be checked exactly: the expected share at that distance plus the margin."""
    angle = math.acos(max(-1.0, min(1.0, 1.0 - threshold)))
    return math.ceil(dimensions * min(1.0, angle / math.pi + SIGN_MARGIN))


class Entry:
    """A stored answer: its partition, the prompt's vector, the answer's body, and when it
    expires (monotonic seconds)."""

    __slots__ = ("body", "expires", "key", "model", "partition", "vector")

    def __init__(
        self,
        key: int,
        partition: bytes,
        vector: Vector,
        body: bytes,
        model: str | None,
        expires: float,
    ) -> None:
        self.key = key
        self.partition = partition
        self.vector = vector
        self.body = body
        self.model = model
        self.expires = expires


def nearest(
    entries: Sequence[Entry], query: Vector, threshold: float, now: float
) -> tuple[Entry, float] | None:
    """The unexpired entry nearest to ``query`` within ``threshold`` (cosine distance), with
    its distance; None when there is none (module docstring: how entries are chosen)."""
    if not entries:
        return None
    bound = sign_bound(threshold, len(query.values))
    signs = query.signs
    ranked: list[tuple[int, int]] = []
    for index, entry in enumerate(entries):
        differing = (entry.vector.signs ^ signs).bit_count()
        if differing <= bound and entry.expires > now:
            ranked.append((differing, index))
    if len(ranked) > EXACT_CHECKS:
        ranked.sort()
        del ranked[EXACT_CHECKS:]
    best: tuple[Entry, float] | None = None
    for _, index in ranked:
        entry = entries[index]
        if len(entry.vector.values) != len(query.values):
            continue  # another model's vector (the embeddings deployment changed)
        distance = max(0.0, 1.0 - entry.vector.cosine(query))
        if distance <= threshold + _ROUNDING and (best is None or distance < best[1]):
            best = (entry, distance)
    return best


class VectorStore:
    """One product's stored answers, by partition, at most ``max_entries`` of them and at
    most ``max_bytes`` of answers and vectors (:attr:`size`): the least recently used (stored
    or hit) goes first; expired ones are dropped as time passes (every entry lives as long,
    so they expire in the order they were stored).

    Not thread-safe: the event loop's thread changes it; a search in another thread reads
    the list :meth:`candidates` returned."""

    def __init__(self, max_entries: int, max_bytes: int = MAX_STORE_BYTES) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        #: Bytes of the answers and vectors held.
        self.size = 0
        self._keys = itertools.count()
        self._recent: OrderedDict[int, Entry] = OrderedDict()
        self._partitions: dict[bytes, dict[int, Entry]] = {}
        self._expiring: deque[Entry] = deque()

    def __len__(self) -> int:
        return len(self._recent)

    def __repr__(self) -> str:
        return (
            f"VectorStore(entries={len(self._recent)}, partitions={len(self._partitions)}, "
            f"max_entries={self.max_entries})"
        )

    def candidates(self, partition: bytes, now: float) -> list[Entry]:
        """The entries of ``partition`` (after dropping every expired entry)."""
        self.prune(now)
        found = self._partitions.get(partition)
        return list(found.values()) if found else []

    def put(
        self,
        partition: bytes,
        vector: Vector,
        body: bytes,
        model: str | None,
        expires: float,
        now: float,
    ) -> Entry:
        """Store an answer; drops expired entries, then the least recently used past
        ``max_entries``."""
        self.prune(now)
        entry = Entry(next(self._keys), partition, vector, body, model, expires)
        self._recent[entry.key] = entry
        self._partitions.setdefault(partition, {})[entry.key] = entry
        self._expiring.append(entry)
        self.size += _size(entry)
        while len(self._recent) > self.max_entries or self.size > self.max_bytes:
            _, oldest = self._recent.popitem(last=False)
            self._drop(oldest)
        if len(self._expiring) > 2 * len(self._recent) + 64:
            # Evicted entries keep their places until they expire: with a long ttl these
            # would pile up (a store's worth each), so they are let go of once they are
            # half the queue (amortised: at most one pass per as many stores).
            self._expiring = deque(e for e in self._expiring if e.key in self._recent)
        return entry

    def used(self, entry: Entry) -> None:
        """``entry`` answered a request: the last to be evicted now."""
        if entry.key in self._recent:
            self._recent.move_to_end(entry.key)

    def prune(self, now: float) -> None:
        """Drop the entries expired at ``now``."""
        expiring = self._expiring
        while expiring and expiring[0].expires <= now:
            entry = expiring.popleft()
            if self._recent.pop(entry.key, None) is not None:
                self._drop(entry)

    def _drop(self, entry: Entry) -> None:
        """Remove ``entry`` from its partition (it left ``_recent`` already) and let go of its
        answer and vector: an evicted entry keeps its place in ``_expiring`` until it
        expires, as a few bytes, not as what it held. (A search running on a copy of the
        partition's list then finds it empty and passes over it.)"""
        members = self._partitions.get(entry.partition)
        if members is not None:
            members.pop(entry.key, None)
            if not members:
                del self._partitions[entry.partition]
        self.size -= _size(entry)
        entry.body = b""
        entry.vector = _GONE


#: What an evicted entry's vector becomes: no components, so no search matches it.
_GONE = Vector(array("f"), 0)


def _size(entry: Entry) -> int:
    """The bytes an entry holds that count against ``max_bytes``: its answer and vector."""
    return len(entry.body) + 4 * len(entry.vector.values)
