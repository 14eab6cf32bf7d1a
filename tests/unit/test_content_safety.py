"""Content safety's pure parts: the configuration, which text is checked, how it is cut, what
blocks and what the client is told."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest

from sluicegate.config.loader import ConfigError, environment_problems, parse_config
from sluicegate.config.model import ProductContentSafetyConfig
from sluicegate.guardrails.content_safety import (
    ContentSafetyGuard,
    ContentSafetyService,
    Findings,
    blocking_reasons,
    prompt_text,
    refusal,
    split_text,
)
from sluicegate.proxy.context import RequestContext
from sluicegate.proxy.deadlines import Deadlines
from sluicegate.proxy.errors import GatewayError
from sluicegate.proxy.routes import match_route

SERVICE = {
    "name": "cs",
    "url": "https://contoso-safety.cognitiveservices.azure.com/",
    "auth": {"type": "api-key", "key_env": "CS_KEY"},
}


def _config(policy: Any = None, services: Any = None) -> dict[str, Any]:
    product: dict[str, Any] = {"name": "p"}
    if policy is not None:
        product["content_safety"] = policy
    return {
        "backends": [{"name": "b", "url": "https://b.example.com"}],
        "deployments": [{"name": "gpt-4o", "backend": "b"}],
        "products": [product],
        "content_safety": [SERVICE] if services is None else services,
    }


def _problems(config: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(config)
    return caught.value.problems


# -- configuration ---------------------------------------------------------------------------------


def test_a_policy_and_its_service() -> None:
    config = parse_config(_config({"service": "cs", "categories": {"Hate": 4}}))
    service = config.content_safety[0]
    assert service.url == "https://contoso-safety.cognitiveservices.azure.com"
    assert service.auth.header == "Ocp-Apim-Subscription-Key"  # Content Safety's key header
    assert service.auth.scope == "https://cognitiveservices.azure.com/.default"
    policy = config.products[0].content_safety
    assert policy is not None
    assert (policy.output_type, policy.on_error, policy.shield_prompt) == (
        "FourSeverityLevels",
        "block",
        False,
    )


def test_unknown_services_names_and_fields_are_refused() -> None:
    problems = _problems(_config({"service": "nope", "categories": {"Hate": 4}}))
    assert problems == [
        "products[0].content_safety.service: unknown content safety service 'nope' (known: cs)"
    ]
    problems = _problems(_config({"service": "cs", "categories": {"Hate": 4}, "mode": "x"}))
    assert problems == ["products[0].content_safety.mode: Extra inputs are not permitted"]
    problems = _problems(_config(services=[{**SERVICE, "timeout": 3}]))
    assert problems == ["content_safety[0].timeout: Extra inputs are not permitted"]
    problems = _problems(_config(services=[SERVICE, SERVICE]))
    assert problems == ["content_safety[1].name: duplicate name 'cs'"]


@pytest.mark.parametrize(
    ("policy", "where"),
    [
        ({"service": "cs", "categories": {"Hate": 8}}, "categories.Hate"),
        ({"service": "cs", "categories": {"Hatred": 2}}, "categories.Hatred.[key]"),
        ({"service": "cs", "categories": {"Hate": 2}, "output_type": "Six"}, "output_type"),
        ({"service": "cs", "categories": {"Hate": 2}, "on_error": "500"}, "on_error"),
        ({"service": "cs", "blocklists": ["no spaces"]}, "blocklists"),
        ({"service": "cs"}, "products[0].content_safety"),
    ],
)
def test_invalid_policies_are_refused(policy: dict[str, Any], where: str) -> None:
    problems = _problems(_config(policy))
    assert len(problems) == 1 and where in problems[0], problems


def test_a_threshold_four_severity_levels_never_reach_is_refused() -> None:
    # FourSeverityLevels answers 0, 2, 4 or 6: a threshold of 7 never blocks anything.
    (problem,) = _problems(_config({"service": "cs", "categories": {"Hate": 4, "Sexual": 7}}))
    assert problem.startswith("products[0].content_safety: ") and "threshold 7 (Sexual)" in problem
    eight = {"service": "cs", "categories": {"Sexual": 7}, "output_type": "EightSeverityLevels"}
    assert parse_config(_config(eight)).products[0].content_safety is not None


def test_a_service_url_must_be_an_endpoint() -> None:
    problems = _problems(_config(services=[{**SERVICE, "url": "contoso-safety"}]))
    assert problems[0].startswith("content_safety[0].url: ")


def test_a_services_missing_key_is_reported_by_config_check_and_serve() -> None:
    """``environment_problems`` (``config check`` warns, ``serve`` refuses to start with one
    line): a service's key variable unset was reported by neither, and ``serve`` crashed with
    a traceback from the runtime's build."""
    config = parse_config(_config({"service": "cs", "categories": {"Hate": 4}}))
    assert environment_problems(config, {}) == [
        "content_safety[0].auth.key_env: environment variable CS_KEY is not set"
    ]
    assert environment_problems(config, {"CS_KEY": "k"}) == []


# -- which text ------------------------------------------------------------------------------------


def test_chat_text_leaves_out_roles_and_media() -> None:
    body = {
        "messages": [
            {"role": "system", "content": "You help."},
            {
                "role": "user",
                "name": "ann",
                "content": [
                    {"type": "text", "text": "Look at this"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                ],
            },
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"type": "function", "function": {"name": "f", "arguments": '{"q": "x"}'}}
                ],
            },
        ],
        "max_tokens": 5,
    }
    text = prompt_text(body, "chat/completions")
    assert text == 'You help.\nann\nLook at this\nf\n{"q": "x"}'
    assert "base64" not in text and "user" not in text.split("\n")


def test_tool_schemas_and_formats_are_read_whole() -> None:
    # The model reads all of a tool's schema ($defs, nested descriptions, examples, property
    # names) and a custom tool call's input: the estimate's sample of them is not enough.
    tool = {
        "type": "function",
        "function": {
            "name": "f",
            "parameters": {
                "type": "object",
                "description": "params text",
                "properties": {"the_topic": {"$ref": "#/$defs/T", "examples": ["an example"]}},
                "$defs": {"T": {"type": "string", "description": "defs text"}},
            },
        },
    }
    call = {"id": "c1", "type": "custom", "custom": {"name": "run", "input": "custom input"}}
    body = {
        "messages": [{"role": "assistant", "content": None, "tool_calls": [call]}],
        "tools": [tool],
        "response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": {}}},
    }
    lines = prompt_text(body, "chat/completions").split("\n")
    for text in ("custom input", "params text", "the_topic", "an example", "defs text", "T"):
        assert text in lines, text
    assert "function" not in lines and "string" not in lines  # ``type`` words left out
    responses = {
        "input": "hi",
        "tools": [{"type": "function", "name": "g", "description": "tool text"}],
        "text": {"format": {"type": "json_schema", "name": "n", "description": "format text"}},
    }
    assert prompt_text(responses, "responses").split("\n") == [
        "hi", "g", "tool text", "n", "format text"
    ]  # fmt: skip


def test_an_mcp_tools_credentials_are_not_sent_to_the_service() -> None:
    # A Responses MCP tool carries the MCP server's token: not text the model reads.
    mcp = {
        "type": "mcp",
        "server_label": "docs",
        "server_description": "tool text",
        "server_url": "https://mcp.example.com/sse",
        "headers": {"Authorization": "Bearer mcp-secret"},
        "authorization": "mcp-secret",
    }
    text = prompt_text({"input": "hi", "tools": [mcp]}, "responses")
    assert "mcp-secret" not in text
    assert {"hi", "docs", "tool text"} <= set(text.split("\n"))
    # Only an MCP tool's: a function's property named "headers" is read as any other.
    prop = {"headers": {"type": "string", "description": "prop text"}}
    tool = {"type": "function", "name": "f", "parameters": {"properties": prop}}
    assert "prop text" in prompt_text({"input": "hi", "tools": [tool]}, "responses")


def test_other_operations_text() -> None:
    assert prompt_text({"input": "hi", "instructions": "be kind"}, "responses") == "be kind\nhi"
    assert prompt_text({"input": ["a", "b"]}, "embeddings") == "a\nb"
    assert prompt_text({"input": [[1, 2, 3]]}, "embeddings") == ""  # tokens: no text
    assert prompt_text({"prompt": ["x", "y"], "suffix": "z"}, "completions") == "x\ny\nz"


# -- pieces ----------------------------------------------------------------------------------------


def test_short_text_is_one_piece_and_whitespace_none() -> None:
    assert split_text("hello") == ["hello"]
    assert split_text(" \n ") == []
    assert split_text("") == []


def test_long_text_is_cut_after_a_space_in_the_second_half() -> None:
    text = "word " * 5000  # 25,000 characters
    pieces = split_text(text, 10_000)
    assert len(pieces) == 3 and text.startswith(pieces[0]) and text.endswith(pieces[-1])
    assert all(len(p) <= 10_000 for p in pieces)
    assert all(p.startswith("word") and p.endswith(" ") for p in pieces)  # no word cut in two
    # Each piece repeats the last 256 characters or so of the one before.
    assert 2 * 256 <= sum(map(len, pieces)) - len(text) <= 2 * 2 * 256  # two cuts
    solid = "x" * 25_000  # no place to cut: at the limit, 256 characters back
    assert [len(p) for p in split_text(solid, 10_000)] == [10_000, 10_000, 5_512]


@pytest.mark.parametrize("gap", [" ", ""])
def test_a_phrase_across_a_cut_is_whole_in_the_next_piece(gap: str) -> None:
    # Padded so that the first piece ends inside the phrase (after its space, or at the
    # limit where there is no space to cut after).
    phrase = "project nightingale"
    for pad in range(9_985, 10_000):
        text = "x" * pad + gap + phrase + gap + "y" * 5_000
        pieces = split_text(text, 10_000)
        assert len(pieces) == 2
        assert any(phrase in piece for piece in pieces), pad


# -- what blocks and what the client is told ----------------------------------------------------


def _policy(**fields: Any) -> ProductContentSafetyConfig:
    return ProductContentSafetyConfig(service="cs", **fields)


def test_a_category_blocks_from_its_threshold() -> None:
    policy = _policy(categories={"Hate": 4, "Violence": 2})
    findings = Findings()
    findings.add_analysis(
        {
            "categoriesAnalysis": [
                {"category": "Hate", "severity": 3},
                {"category": "Sexual", "severity": 6},
            ]
        }
    )
    assert blocking_reasons(findings, policy) == []  # Hate 3 < 4; Sexual has no threshold
    findings.add_analysis({"categoriesAnalysis": [{"category": "Hate", "severity": 4}]})
    findings.add_analysis({"categoriesAnalysis": [{"category": "Violence", "severity": 2}]})
    assert blocking_reasons(findings, policy) == ["Hate", "Violence"]
    assert findings.severities["Hate"] == 4  # the highest over every piece


def test_blocklists_and_attacks_block_first() -> None:
    policy = _policy(categories={"Hate": 2}, blocklists=["terms"], shield_prompt=True)
    findings = Findings()
    findings.add_analysis(
        {
            "blocklistsMatch": [
                {"blocklistName": "terms", "blocklistItemId": "1", "blocklistItemText": "secret x"}
            ],
            "categoriesAnalysis": [{"category": "Hate", "severity": 2}],
        }
    )
    findings.add_shield({"userPromptAnalysis": {"attackDetected": True}, "documentsAnalysis": []})
    reasons = blocking_reasons(findings, policy)
    assert reasons == ["PromptAttack", "Blocklist", "Hate"]
    error = refusal("p", reasons, findings, policy)
    assert (error.status, error.code) == (403, "content_filter")
    body = orjson.loads(error.body())["error"]
    assert body["message"].startswith(
        "The prompt was refused by the gateway's content safety policy (product 'p'): Prompt "
        "Shields detected a prompt attack; it matches blocklist 'terms'; category Hate has "
        "severity 2 (threshold 2)."
    )
    assert "secret x" not in error.body().decode()  # the matched term is not told
    assert body["innererror"] == {
        "code": "ResponsibleAIPolicyViolation",
        "content_filter_result": {
            "hate": {"filtered": True, "severity": "low"},
            "jailbreak": {"filtered": True, "detected": True},
            "custom_blocklists": {"filtered": True, "details": [{"filtered": True, "id": "terms"}]},
        },
    }


def test_an_attack_counts_only_with_shield_prompt() -> None:
    findings = Findings(attack=True)
    assert blocking_reasons(findings, _policy(categories={"Hate": 4})) == []


# -- the check's work off the event loop -----------------------------------------------------------


async def test_a_large_body_is_read_off_the_event_loop() -> None:
    # ~2.6 MB of small Responses items: their walk takes a second or so, which the event
    # loop (every other request) must not wait out. Too long for the policy: refused (413)
    # before any call to the service, which is never opened.
    policy = ProductContentSafetyConfig(service="cs", categories={"Hate": 4}, max_text_chars=10)
    config = parse_config(_config({"service": "cs", "categories": {"Hate": 4}}))
    service = ContentSafetyService(config.content_safety[0], {"CS_KEY": "k"})
    guard = ContentSafetyGuard("p", policy, service)
    body = {"input": [{"type": "x_call", "a": [{"b": "c"}] * 5} for _ in range(35_000)]}
    ctx = RequestContext("r", 0.0, 0.0, match_route("POST", "/openai/v1/responses"), Deadlines())
    ctx.body, ctx.json = orjson.dumps(body), body
    loop = asyncio.get_running_loop()
    longest = 0.0

    async def ticks() -> None:
        nonlocal longest
        while True:
            before = loop.time()
            await asyncio.sleep(0.005)
            longest = max(longest, loop.time() - before)

    ticking = asyncio.create_task(ticks())
    await asyncio.sleep(0.02)
    started = loop.time()
    with pytest.raises(GatewayError) as caught:
        await guard.check(ctx)
    took = loop.time() - started
    await asyncio.sleep(0.02)  # the ticker's last wait ends (inline, it lasted the walk)
    ticking.cancel()
    assert caught.value.code == "ContentSafetyTextTooLong"
    assert longest < max(0.15, took / 4), (longest, took)
