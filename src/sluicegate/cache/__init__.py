"""Response caches: the semantic cache of chat completions (docs/semantic-cache.md)."""
