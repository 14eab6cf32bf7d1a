"""Token counting with OpenAI's tokenizers, shipped in the package (nothing is downloaded)."""

from sluicegate.tokens.counting import count_tokens, encoding_for, encoding_name_for
from sluicegate.tokens.estimate import TokenEstimate, estimate_request_tokens

__all__ = [
    "TokenEstimate",
    "count_tokens",
    "encoding_for",
    "encoding_name_for",
    "estimate_request_tokens",
]
