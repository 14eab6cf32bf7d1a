"""Checks of a request's content before it is routed (APIM's ``llm-content-safety``).

Imported only when a product configures one: a gateway without guardrails loads nothing of
this package.
"""
