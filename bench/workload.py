"""What the load generator sends: the two request bodies and the scenarios measured."""

from __future__ import annotations

import json

#: (kind, connections): c=1 measures added latency, c=64 throughput.
SCENARIOS: tuple[tuple[str, int], ...] = (("json", 1), ("json", 64), ("stream", 1), ("stream", 64))
MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Explain token buckets in two sentences."},
]
_COMMON = {"model": "gpt-4o-mini", "messages": MESSAGES, "max_tokens": 64, "temperature": 0.2}
#: The body the load generator POSTs for each kind (the stream asks for usage, as SDKs do).
BODIES: dict[str, bytes] = {
    "json": json.dumps(_COMMON).encode(),
    "stream": json.dumps(
        {**_COMMON, "stream": True, "stream_options": {"include_usage": True}}
    ).encode(),
}
