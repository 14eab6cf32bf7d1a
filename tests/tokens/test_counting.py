"""Tokenizers: shipped files, checksums, model families, known counts, no network."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
from importlib import resources
from pathlib import Path

import pytest
import tiktoken_ext.openai_public as openai_public  # type: ignore[import-untyped]

from sluicegate.tokens import encodings
from sluicegate.tokens.counting import count_tokens, encoding_for, encoding_name_for
from sluicegate.tokens.encodings import SPECS, EncodingFileError, EncodingSpec, get_encoding


@pytest.mark.parametrize("name", ["o200k_base", "cl100k_base"])
def test_shipped_files_match_the_pinned_checksums(name: str) -> None:
    spec = SPECS[name]
    data = resources.files("sluicegate.tokens").joinpath("data", spec.filename).read_bytes()
    assert hashlib.sha256(data).hexdigest() == spec.sha256


@pytest.mark.parametrize("name", ["o200k_base", "cl100k_base"])
def test_specs_match_the_installed_tiktoken(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """tiktoken's own constructor, fed our file instead of a download, builds the same thing:
    same pinned hash, pattern, special tokens and ranks."""
    spec = SPECS[name]
    ours = encodings.read_ranks(spec)

    def load_from_package(url: str, expected_hash: str | None = None) -> dict[bytes, int]:
        assert url.endswith("/" + spec.filename)
        assert expected_hash == spec.sha256
        return ours

    monkeypatch.setattr(openai_public, "load_tiktoken_bpe", load_from_package)
    upstream = getattr(openai_public, name)()
    assert upstream["pat_str"] == spec.pattern
    assert upstream["special_tokens"] == spec.special_tokens
    assert upstream["mergeable_ranks"] is ours
    assert len(ours) == {"o200k_base": 199_998, "cl100k_base": 100_256}[name]


def test_a_damaged_file_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    wrong = EncodingSpec("broken", "cl100k_base.tiktoken", "0" * 64, "x", {})
    with pytest.raises(EncodingFileError, match="SHA-256"):
        encodings.read_ranks(wrong)
    missing = EncodingSpec("missing", "nope.tiktoken", "0" * 64, "x", {})
    with pytest.raises(EncodingFileError, match="missing"):
        encodings.read_ranks(missing)


@pytest.mark.parametrize(
    ("model", "encoding"),
    [
        ("gpt-4o", "o200k_base"),
        ("gpt-4o-mini-2024-07-18", "o200k_base"),
        ("GPT-4.1-nano", "o200k_base"),
        ("gpt-4.5-preview", "o200k_base"),
        ("gpt-5", "o200k_base"),
        ("gpt-5-mini", "o200k_base"),
        ("o1", "o200k_base"),
        ("o3-mini", "o200k_base"),
        ("o4-mini-2025-04-16", "o200k_base"),
        ("gpt-oss-120b", "o200k_base"),
        ("azure/gpt-4o", "o200k_base"),
        ("ft:gpt-4o-mini-2024-07-18:acme::abc123", "o200k_base"),
        ("gpt-4", "cl100k_base"),
        ("gpt-4-32k", "cl100k_base"),
        ("gpt-4-turbo-2024-04-09", "cl100k_base"),
        ("gpt-35-turbo", "cl100k_base"),
        ("gpt-35-turbo-16k", "cl100k_base"),
        ("gpt-3.5-turbo-0125", "cl100k_base"),
        ("text-embedding-ada-002", "cl100k_base"),
        ("text-embedding-3-large", "cl100k_base"),
        ("llama-3-70b", None),
        ("gpt-40", None),
        ("omni-moderation-latest", None),
        ("", None),
        (None, None),
    ],
)
def test_model_families(model: str | None, encoding: str | None) -> None:
    assert encoding_name_for(model) == encoding
    assert encoding_name_for(model) == encoding  # again, from the cache of names


def test_the_cache_of_model_names_is_bounded() -> None:
    """Model names can come from request bodies: the cache of their families stays bounded."""
    bound = encoding_name_for.cache_info().maxsize
    assert bound is not None
    for i in range(bound + 50):
        assert encoding_name_for(f"gpt-4o-{i}") == "o200k_base"
        assert encoding_name_for(f"mystery-{i}") is None
        assert encoding_name_for.cache_info().currsize <= bound
    assert encoding_name_for("gpt-4o-49") == "o200k_base"


def test_known_counts() -> None:
    assert count_tokens("hello world", "gpt-4o") == 2
    assert count_tokens("hello world", "gpt-35-turbo") == 2
    assert get_encoding("o200k_base").encode_ordinary("hello world") == [24912, 2375]
    assert get_encoding("cl100k_base").encode_ordinary("hello world") == [15339, 1917]
    assert count_tokens("tiktoken is great!", "gpt-4") == 6
    assert count_tokens("", "gpt-4o") == 0
    # Special-token markers in user text are plain text, not an error.
    assert count_tokens("<|endoftext|>", "gpt-4o") > 1
    # Unknown family: ceil(characters / 4).
    assert count_tokens("hello world", "mistral-large") == 3


def test_encodings_are_built_once() -> None:
    assert encoding_for("gpt-4o") is encoding_for("o3")
    assert encoding_for("unknown") is None


def test_counting_works_offline_without_a_tiktoken_cache(tmp_path: Path) -> None:
    """In a fresh interpreter with sockets disabled and an empty TIKTOKEN_CACHE_DIR, both
    encodings load from the package, and nothing is written to the cache."""
    cache = tmp_path / "tiktoken-cache"
    cache.mkdir()
    script = textwrap.dedent(
        """
        import socket

        def refuse(*args, **kwargs):
            raise OSError("network disabled in this test")

        socket.socket.connect = refuse
        socket.create_connection = refuse
        socket.getaddrinfo = refuse

        from sluicegate.tokens.counting import count_tokens
        print(count_tokens("hello world", "gpt-4o"), count_tokens("hello world", "gpt-4"))
        """
    )
    env = {**os.environ, "TIKTOKEN_CACHE_DIR": str(cache), "DATA_GYM_CACHE_DIR": str(cache)}
    env.update(HTTPS_PROXY="http://127.0.0.1:9", HTTP_PROXY="http://127.0.0.1:9")
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["2", "2"]
    assert list(cache.iterdir()) == []


def test_nothing_is_loaded_at_import() -> None:
    script = (
        "import sluicegate.tokens, sluicegate.tokens.estimate, sluicegate.limits\n"
        "from sluicegate.tokens import encodings\n"
        "assert encodings._cache == {}, encodings._cache\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
