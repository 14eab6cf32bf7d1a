"""Over a run of mixed requests, the ledger holds exactly the usage the backend reported."""

from __future__ import annotations

import asyncio
import random

import httpx
import openai

from tests.integration.conftest import Harness


async def _one(client: openai.AsyncAzureOpenAI, rng: random.Random, i: int) -> None:
    kind = rng.choice(["chat", "stream", "stream_usage", "embed", "v1"])
    words = " ".join(["word"] * rng.randint(1, 40))
    max_tokens = rng.randint(1, 30)
    if kind == "embed":
        await client.embeddings.create(model="text-embedding-3-small", input=[words, "x y"])
    elif kind == "chat":
        await client.chat.completions.create(
            model=rng.choice(["gpt-4o-mini", "gpt-4o"]),
            messages=[{"role": "user", "content": words}],
            max_tokens=max_tokens,
        )
    else:
        stream = await client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": words}],
            max_tokens=max_tokens,
            stream=True,
            # omit: the SDK's default, the field is not sent at all
            stream_options={"include_usage": True} if kind == "stream_usage" else openai.omit,
        )
        async for _ in stream:
            pass


async def _v1(client: openai.AsyncOpenAI, rng: random.Random) -> None:
    await client.chat.completions.create(
        model="gpt-4o",
        messages=[{"role": "user", "content": "a b c " * rng.randint(1, 9)}],
        max_tokens=rng.randint(1, 20),
    )


def test_ledger_equals_backend_usage_over_240_mixed_requests(harness: Harness) -> None:
    keys = [harness.new_key(owner=f"team-{i}").primary_key for i in range(3)]
    rng = random.Random(7)

    async def run() -> None:
        clients = [
            openai.AsyncAzureOpenAI(
                azure_endpoint=harness.url, api_key=k, api_version="2024-10-21", max_retries=0
            )
            for k in keys
        ]
        v1 = openai.AsyncOpenAI(base_url=f"{harness.url}/openai/v1", api_key=keys[0], max_retries=0)
        sem = asyncio.Semaphore(16)

        async def guarded(i: int) -> None:
            async with sem:
                if i % 6 == 5:
                    await _v1(v1, rng)
                else:
                    await _one(clients[i % 3], rng, i)

        await asyncio.gather(*(guarded(i) for i in range(240)))
        for c in clients:
            await c.close()
        await v1.close()

    asyncio.run(run())
    records = harness.records(expect=240)
    assert len(records) == 240
    truth = {
        e["headers"]["x-ms-client-request-id"]: e
        for e in harness.sim_log()
        if "x-ms-client-request-id" in e["headers"]
    }
    assert len(truth) == 240
    for r in records:
        t = truth[r.request_id]
        assert (r.prompt_tokens, r.completion_tokens) == (
            t["prompt_tokens"],
            t["completion_tokens"] or 0,
        ), r
        assert r.outcome == "ok"
        assert not r.usage_estimated
    per_sub: dict[str, int] = {}
    for r in records:
        per_sub[r.subscription_id or ""] = per_sub.get(r.subscription_id or "", 0) + r.total_tokens
    assert len(per_sub) == 3
    assert sum(per_sub.values()) == sum(
        t["prompt_tokens"] + (t["completion_tokens"] or 0) for t in truth.values()
    )
    # The report agrees with the rows.
    resp = httpx.get(f"{harness.url}/healthz")
    assert resp.status_code == 200
