"""Azure OpenAI error bodies, byte for byte in the shapes Azure returns them.

Azure's ``error.code`` is a string (``"429"``, ``"DeploymentNotFound"``); OpenAI-style
validation errors carry ``type``/``param`` and a null code. Messages follow the wording quoted
in the API reference; clients should match on status and code, never on the text.
"""

from __future__ import annotations

from typing import Any, Literal

import orjson

Operation = Literal["chat", "completions", "embeddings", "responses"]

#: Azure's operation ids as they appear in 429 messages.
OPERATION_IDS: dict[Operation, str] = {
    "chat": "ChatCompletions_Create",
    "completions": "Completions_Create",
    "embeddings": "Embeddings_Create",
    "responses": "Responses_Create",
}

UNAUTHORIZED = orjson.dumps(
    {
        "error": {
            "code": "401",
            "message": (
                "Access denied due to invalid subscription key or wrong API endpoint. Make sure "
                "to provide a valid key for an active subscription and use a correct regional "
                "API endpoint for your resource."
            ),
        }
    }
)

RESOURCE_NOT_FOUND = orjson.dumps({"error": {"code": "404", "message": "Resource not found"}})

DEPLOYMENT_NOT_FOUND = orjson.dumps(
    {
        "error": {
            "code": "DeploymentNotFound",
            "message": (
                "The API deployment for this resource does not exist. If you created the "
                "deployment within the last 5 minutes, please wait a moment and try again."
            ),
        }
    }
)

INTERNAL_ERROR = orjson.dumps(
    {
        "error": {
            "code": "InternalServerError",
            "message": "The server had an error while processing your request. Sorry about that!",
        }
    }
)

SERVICE_UNAVAILABLE = orjson.dumps(
    {
        "error": {
            "code": "ServiceUnavailable",
            "message": (
                "The service is temporarily unable to process your request. Please try again later."
            ),
        }
    }
)


def rate_limited(
    operation: Operation,
    api_version: str,
    retry_after_s: int,
    exceeded: Literal["tokens", "requests"],
) -> bytes:
    """The classic Azure 429 body (``code: "429"``) naming the operation, version and wait."""
    kind = "token rate limit" if exceeded == "tokens" else "call rate limit"
    message = (
        f"Requests to the {OPERATION_IDS[operation]} Operation under Azure OpenAI API version "
        f"{api_version} have exceeded {kind} of your current OpenAI S0 pricing tier. Please "
        f"retry after {retry_after_s} second{'s' if retry_after_s != 1 else ''}. Please go "
        "here: https://aka.ms/oai/quotaincrease if you would like to further increase the "
        "default rate limit."
    )
    return orjson.dumps({"error": {"code": "429", "message": message}})


def invalid_request(message: str, param: str | None = None) -> bytes:
    """An OpenAI-style 400 (``type: invalid_request_error``, ``code: null``)."""
    body: dict[str, Any] = {
        "error": {"message": message, "type": "invalid_request_error", "param": param, "code": None}
    }
    return orjson.dumps(body)


def operation_not_supported(operation: Operation, model: str) -> bytes:
    """The 400 Azure returns when a deployment's model cannot do the operation."""
    name = {
        "chat": "chatCompletion",
        "completions": "completion",
        "embeddings": "embeddings",
        "responses": "responses",
    }[operation]
    message = (
        f"The {name} operation does not work with the specified model, {model}. Please choose "
        "different model and try again. You can learn more about which models can be used "
        "with each operation here: https://go.microsoft.com/fwlink/?linkid=2197993."
    )
    return orjson.dumps({"error": {"code": "OperationNotSupported", "message": message}})


def content_filtered_prompt(results: dict[str, Any]) -> bytes:
    """The 400 Azure returns when the content filter blocks the *prompt*
    (azure-openai-api.md §5): OpenAI-style fields with ``code: "content_filter"``, ``param:
    "prompt"``, ``status: 400`` and an ``innererror`` naming ``ResponsibleAIPolicyViolation``
    with the per-category ``content_filter_result``. Not retryable, not a backend fault."""
    message = (
        "The response was filtered due to the prompt triggering Azure OpenAI's content "
        "management policy. Please modify your prompt and retry. To learn more about our "
        "content filtering policies please read our documentation: "
        "https://go.microsoft.com/fwlink/?linkid=2198766"
    )
    body = {
        "error": {
            "message": message,
            "type": None,
            "param": "prompt",
            "code": "content_filter",
            "status": 400,
            "innererror": {
                "code": "ResponsibleAIPolicyViolation",
                "content_filter_result": results,
            },
        }
    }
    return orjson.dumps(body)
