"""Prompt and completion logging (APIM's LLM logs, ``ApiManagementGatewayLlmLog``): per product,
the text of each request's messages and of its answer, written as JSON lines off the request
path (docs/message-log.md).

``config``: the settings; ``capture``: what the request path keeps (references, nothing
parsed); ``flatten``: bodies and streams to text, cut and chunked (pure); ``sink``: the queue,
the thread and the rotating file.
"""
