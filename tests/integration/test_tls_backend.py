"""A backend behind HTTPS, as every Azure OpenAI endpoint is: ``sluicegate serve`` verifies it
against the system's trust store (here a test CA given by ``SSL_CERT_FILE``, the standard
variable) and refuses one it cannot verify, with the official SDK as the client."""

from __future__ import annotations

import asyncio
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from sluicegate.simulator.server import SimulatorThread
from tests.support.gateway import GatewayProcess, gateway_config, gateway_environ
from tests.support.keyvault import self_signed_certificate


class TlsFront:
    """TLS in front of a plain HTTP server on loopback (what the gateway sees of Azure)."""

    def __init__(self, target_port: int, cert: Path, key: Path) -> None:
        self.target_port = target_port
        self.tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.tls.load_cert_chain(cert, key)
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(
            asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=self.tls)
        )
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()
        server.close()
        tasks = asyncio.all_tasks(self._loop)
        for task in tasks:
            task.cancel()
        self._loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        self._loop.run_until_complete(server.wait_closed())
        self._loop.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, ssl.SSLError):
                pass
            finally:
                dst.close()

        try:
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        finally:
            up_writer.close()
            writer.close()

    def __enter__(self) -> TlsFront:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


@pytest.fixture
def front(tmp_path: Path, simulator: SimulatorThread) -> Iterator[tuple[TlsFront, Path]]:
    cert, key = self_signed_certificate(tmp_path, ["127.0.0.1"])
    port = int(simulator.url.rsplit(":", 1)[1])
    with TlsFront(port, cert, key) as tls:
        yield tls, cert


def _client(gw: GatewayProcess, key: str) -> openai.AzureOpenAI:
    return openai.AzureOpenAI(
        azure_endpoint=gw.url, api_key=key, api_version="2024-10-21", max_retries=0
    )


def test_an_https_backend_is_verified_against_the_trust_store(
    tmp_path: Path, front: tuple[TlsFront, Path], request: pytest.FixtureRequest
) -> None:
    tls, cert = front
    closing: list[openai.AzureOpenAI] = []

    def close_all() -> None:
        for client in closing:
            client.close()

    request.addfinalizer(close_all)
    config = gateway_config(tmp_path, {"sim": f"https://127.0.0.1:{tls.port}"})
    trusting = GatewayProcess(
        tmp_path, config, env=dict(gateway_environ(), SSL_CERT_FILE=str(cert))
    )
    trusting.start()
    try:
        key = trusting.create_key()["primary_key"]
        trusting.wait_visible(key)  # made by another process: the gateway learns of it
        client = _client(trusting, key)
        closing.append(client)
        messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Hello over TLS"}]
        answer = client.chat.completions.create(model="gpt-4o-mini", messages=messages)
        assert answer.usage is not None and answer.usage.total_tokens > 0
        stream = client.chat.completions.create(
            model="gpt-4o-mini",
            messages=messages,
            stream=True,
        )
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert text
    finally:
        assert trusting.terminate() == 0

    env = gateway_environ()
    env.pop("SSL_CERT_FILE", None)
    strict = GatewayProcess(tmp_path, config, env=env)  # the test CA is not trusted here
    strict.start()
    try:
        key = strict.create_key()["primary_key"]
        strict.wait_visible(key)  # made by another process: the gateway learns of it
        client = _client(strict, key)
        closing.append(client)
        with pytest.raises(openai.APIStatusError) as refused:
            client.chat.completions.create(
                model="gpt-4o-mini",
                messages=[{"role": "user", "content": "Hello"}],
            )
        # The same configuration as above but for the trust store: the backend is refused.
        assert refused.value.status_code == 503
        assert isinstance(refused.value.body, dict)
        assert refused.value.body["code"] == "BackendUnavailable"
        # The operator learns why from the log.
        assert "backend sim: a request to https" in strict.log_path.read_text()
        assert "SSLCertVerificationError" in strict.log_path.read_text()
    finally:
        assert strict.terminate() == 0
