"""Stored responses (``simulator/stored.py``): one simulated resource keeps the Responses
answers it served and knows no other's, as an Azure resource does; the real openai SDK."""

from __future__ import annotations

import httpx
import openai
import pytest
from openai import AzureOpenAI, OpenAI

from sluicegate.simulator.server import SimulatorThread
from tests.simulator.conftest import KEY, make_config


def v1(sim: SimulatorThread) -> OpenAI:
    return OpenAI(base_url=f"{sim.url}/openai/v1", api_key=KEY, max_retries=0)


def test_a_stored_response_is_continued_retrieved_listed_and_deleted(
    sim_thread: SimulatorThread,
) -> None:
    with v1(sim_thread) as client:
        first = client.responses.create(model="free", input="hello")
        assert first.background is False
        second = client.responses.create(model="free", input="more", previous_response_id=first.id)
        assert second.previous_response_id == first.id
        assert client.responses.retrieve(first.id).output_text == first.output_text
        items = client.responses.input_items.list(first.id)
        assert [(i.type, getattr(i, "role", None)) for i in items.data] == [("message", "user")]
        client.responses.delete(first.id)
        with pytest.raises(openai.NotFoundError) as gone:
            client.responses.retrieve(first.id)
        assert gone.value.code == "not_found"
    dated = AzureOpenAI(azure_endpoint=sim_thread.url, api_key=KEY, api_version="preview")
    with dated:  # /openai/responses/{id}?api-version=…
        assert dated.responses.retrieve(second.id).id == second.id


def test_another_resources_id_is_unknown(sim_thread: SimulatorThread) -> None:
    with SimulatorThread(make_config()) as other, v1(sim_thread) as here, v1(other) as there:
        answer = here.responses.create(model="free", input="hello")
        with pytest.raises(openai.NotFoundError) as missing:
            there.responses.retrieve(answer.id)
        assert missing.value.body == {
            "code": "not_found",
            "message": f"Response with id '{answer.id}' not found.",
            "type": "invalid_request_error",
            "param": None,
        }
        with pytest.raises(openai.BadRequestError) as refused:
            there.responses.create(model="free", input="more", previous_response_id=answer.id)
        assert refused.value.code == "previous_response_not_found"
        assert refused.value.param == "previous_response_id"
        log = httpx.get(f"{other.url}/_sim/log").json()
    entries = log["entries"] if isinstance(log, dict) else log
    assert [e["status"] for e in entries] == [404, 400]


def test_store_false_background_cancel_and_stream_resume(sim_thread: SimulatorThread) -> None:
    with v1(sim_thread) as client:
        unstored = client.responses.create(model="free", input="hello", store=False)
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(unstored.id)
        plain = client.responses.create(model="free", input="hello")
        with pytest.raises(openai.BadRequestError):
            client.responses.cancel(plain.id)  # only background responses can be cancelled
        background = client.responses.create(model="free", input="hello", background=True)
        assert background.background is True
        assert client.responses.cancel(background.id).status == "cancelled"
        with client.responses.create(model="free", input="s", stream=True) as stream:
            streamed = [e.type for e in stream]
        assert streamed[0] == "response.created" and streamed[-1] == "response.completed"
        resumed = list(client.responses.retrieve(plain.id, stream=True))
        assert [e.type for e in resumed] == ["response.created", "response.completed"]
