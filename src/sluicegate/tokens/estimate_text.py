"""Token counts for text when the backend reported none (used after an aborted stream)."""

from __future__ import annotations


def estimate_text_tokens(text: str, model: str | None) -> int:
    """Count with the model family's tokenizer when one is known offline, else ~4 characters
    per token (OpenAI's rule of thumb for English)."""
    if not text:
        return 0
    try:
        from sluicegate.tokens.counting import count_tokens
    except ImportError:  # pragma: no cover - the tokenizer module ships with the package
        return max(1, (len(text) + 3) // 4)
    return count_tokens(text, model or "")
