"""Request hardening on a real server: header count and size limits, the body read timeout,
X-Forwarded-For only from trusted proxies, per-product IP allow-lists, and TLS with the SDK."""

from __future__ import annotations

import datetime
import http.client
import ipaddress
import json
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from sluicegate.simulator.server import SimulatorThread
from tests.auth.harness import API_VERSION, CHAT, MESSAGES, EntraHarness, entra_gateway

SECURITY = {
    "max_header_count": 40,
    "max_header_bytes": 8192,
    "body_read_timeout_seconds": 0.5,
    "head_read_timeout_seconds": 0.5,
}


@pytest.fixture
def h(tmp_path: Path, simulator: SimulatorThread) -> Iterator[EntraHarness]:
    with entra_gateway(
        tmp_path, simulator, None, subscriptions={"team-a": "starter"}, security=SECURITY
    ) as harness:
        yield harness


_PAYLOAD = b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}'


def _head_start(key: str) -> bytes:
    """A chat request's line and first fields, as raw bytes (the head goes on)."""
    return f"POST {CHAT} HTTP/1.1\r\nhost: x\r\napi-key: {key}\r\n".encode()


def _chat_request(
    key: str, extra: bytes = b"", body: bytes = _PAYLOAD, close: bool = False
) -> bytes:
    """A whole chat request as raw bytes, ``extra`` fields last in its head."""
    return (
        _head_start(key)
        + b"content-type: application/json\r\ncontent-length: %d\r\n" % len(body)
        + (b"connection: close\r\n" if close else b"")
        + extra
        + b"\r\n"
        + body
    )


def _exchange(
    port: int,
    parts: list[bytes],
    *,
    pause: float = 0.0,
    wait: float = 5.0,
    done: Callable[[bytes], bool] | None = None,
) -> bytes:
    """Send ``parts`` on one connection with ``pause`` seconds after each (so that each is
    a read of the server's; stopping if the server hangs up), then return what the server
    answers until it closes, ``wait`` seconds pass, or ``done(answer)``."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for part in parts:
            try:
                sock.sendall(part)
            except (BrokenPipeError, ConnectionResetError):
                break  # refused and closed before the rest was sent
            time.sleep(pause)
        chunks: list[bytes] = []
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not chunk:
                break
            chunks.append(chunk)
            if done is not None and done(b"".join(chunks)):
                break
        return b"".join(chunks)


def _closing_answer_in(data: bytes) -> bool:
    """A ``connection: close`` answer whose declared body is all in."""
    if b"\r\n\r\n" not in data or b"connection: close" not in data:
        return False
    head, _, body = data.partition(b"\r\n\r\n")
    length = [ln for ln in head.split(b"\r\n") if ln.startswith(b"content-length")]
    return bool(length) and len(body) >= int(length[0].split(b":")[1])


def _raw(port: int, data: bytes, wait: float = 5.0) -> bytes:
    """Send raw bytes, return everything the server answers until it closes or ``wait``."""
    return _exchange(port, [data], wait=wait, done=_closing_answer_in)


def test_too_many_headers_and_too_large_heads_get_431(h: EntraHarness) -> None:
    key = {"api-key": h.keys["team-a"]}
    ok = h.chat({**key, **{f"x-extra-{i}": "v" for i in range(30)}})
    assert ok.status_code == 200, ok.text

    too_many = h.chat({**key, **{f"x-extra-{i}": "v" for i in range(45)}})
    assert too_many.status_code == 431
    assert too_many.json()["error"]["code"] == "RequestHeaderFieldsTooLarge"

    too_large = h.chat({**key, "x-big": "a" * 9000})
    assert too_large.status_code == 431
    assert "8192 bytes" in too_large.json()["error"]["message"]

    # A head that never ends is cut off at the limit, not buffered.
    endless = b"GET /openai/v1/models HTTP/1.1\r\nhost: x\r\nx-a: " + b"b" * 20000
    answer = _raw(h.served.port, endless)
    assert answer.startswith(b"HTTP/1.1 431 ")

    # A body larger than the head limit is fine: only the head is counted.
    body = {"messages": [{"role": "user", "content": "x " * 20000}], "max_tokens": 2}
    resp = httpx.post(f"{h.url}{CHAT}", json=body, headers=key, timeout=30)
    assert resp.status_code == 200, resp.text
    # The server still serves after all this.
    assert h.chat(key).status_code == 200


def test_head_limits_hold_for_every_request_of_a_kept_alive_connection(h: EntraHarness) -> None:
    key = {"api-key": h.keys["team-a"]}
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    big = {f"x-big-{i}": "a" * 2000 for i in range(6)}  # 12 KB of head, the limit is 8 KB
    with httpx.Client(base_url=h.url, timeout=30) as client:
        assert client.post(CHAT, json=body, headers=key).status_code == 200
        # The same connection's next request, its head past the limit (in fields the backend
        # would take): it arrives in one read, after the first request's head was done with.
        too_large = client.post(CHAT, json=body, headers={**key, **big})
        assert too_large.status_code == 431, too_large.text
        assert too_large.json()["error"]["code"] == "RequestHeaderFieldsTooLarge"
        assert client.post(CHAT, json=body, headers=key).status_code == 200  # a new connection

    # Pipelined behind a request being answered: the second one is refused too (the
    # connection is closed, since an answer now would interleave with the first one's).
    fields = "".join(f"{name}: {value}\r\n" for name, value in big.items()).encode()
    first, second = _chat_request(h.keys["team-a"]), _chat_request(h.keys["team-a"], fields)
    answer = _raw(h.served.port, first + second, wait=5)
    assert answer.count(b"HTTP/1.1 200 ") < 2, answer[:300]


def test_heads_are_counted_across_reads_and_only_up_to_the_blank_line(h: EntraHarness) -> None:
    def request(extra: bytes = b"", body: bytes = _PAYLOAD, close: bool = False) -> bytes:
        return _chat_request(h.keys["team-a"], extra, body, close)

    # A head of 8,100 bytes (the limit is 8,192), its blank line split between two reads,
    # a 30 KB body in the second: the body is not counted as head.
    body = b'{"messages": [{"role": "user", "content": "' + b"y" * 30000 + b'"}]}'
    bare = request(b"x-pad: \r\n", body)
    head_size = bare.index(b"\r\n\r\n") + 4
    near = request(b"x-pad: " + b"p" * (8100 - head_size) + b"\r\n", body)
    blank = near.index(b"\r\n\r\n")
    assert blank + 4 == 8100
    answer = _exchange(h.served.port, [near[: blank + 2], near[blank + 2 :]], pause=0.1, wait=2)
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]

    # A kept-alive connection's second request with a field that never ends: refused once
    # its head passes the limit, without waiting for the end.
    endless = [request(), b"POST /x HTTP/1.1\r\nhost: x\r\nx-a: "] + [b"b" * 3000] * 6
    answer = _exchange(h.served.port, endless, pause=0.1)
    assert answer.startswith(b"HTTP/1.1 200 ") and b"HTTP/1.1 431 " in answer, answer[-300:]

    # A pipelined head of 10 KB, 7 KB of it in the read that ends the request before it and
    # the rest in the next read: counted whole.
    fields = b"".join(b"x-f%d: %s\r\n" % (i, b"f" * 2000) for i in range(5))
    second = request(fields, close=True)
    answer = _exchange(h.served.port, [request() + second[:7000], second[7000:]], pause=0.1)
    assert answer.count(b"HTTP/1.1 200 ") < 2, answer[:300]


def _trickle(port: int, parts: list[bytes], pause: float) -> tuple[bytes, float]:
    """Send ``parts`` with ``pause`` between them; the server's answer and the seconds
    until it closed the connection."""
    started = time.monotonic()
    answer = _exchange(port, parts, pause=pause, wait=10)
    return answer, time.monotonic() - started


def test_a_head_that_trickles_in_gets_408_and_a_silent_connection_is_closed(
    h: EntraHarness,
) -> None:
    port = h.served.port
    # Nothing at all: closed without an answer once the head's time is up.
    answer, took = _trickle(port, [], 0)
    assert answer == b"" and 0.4 < took < 5

    # A byte every 0.1 s: each read would have reset an idle timer; the head's does not.
    head = _head_start(h.keys["team-a"])
    answer, took = _trickle(port, [head[i : i + 1] for i in range(len(head))], 0.1)
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
    assert b'"RequestTimeout"' in answer and b"connection: close" in answer
    assert 0.4 < took < 5

    # A kept-alive connection's second request, trickled: timed from its first byte, not
    # from the connection's opening (the first request came 0.3 s after it opened).
    slow = [b"", _chat_request(h.keys["team-a"]), head] + [b"x-slow: 1\r\n"] * 20
    answer, took = _trickle(port, slow, 0.3)
    assert answer.startswith(b"HTTP/1.1 200 ") and b"HTTP/1.1 408 " in answer, answer[-300:]
    assert 0.6 < took < 5

    # A head that comes whole within its time is served.
    answer, _ = _trickle(port, [b"", _chat_request(h.keys["team-a"], close=True)], 0.3)
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
    assert h.records(expect=2)  # the two answered requests; the refused heads left none
    assert len(h.records()) == 2


def test_a_body_that_trickles_in_gets_408(h: EntraHarness) -> None:
    head = (
        f"POST {CHAT} HTTP/1.1\r\nhost: x\r\napi-key: {h.keys['team-a']}\r\n"
        "content-type: application/json\r\ncontent-length: 100\r\n\r\n"
    ).encode()
    started = time.monotonic()
    answer = _raw(h.served.port, head + b'{"messages": [', wait=10)
    took = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
    assert b'"RequestTimeout"' in answer
    assert 0.4 < took < 5
    records = h.records(expect=1)
    assert [(r.status, r.outcome) for r in records] == [(408, "rejected")]


def _metric(text: str, name: str) -> float:
    """The value of an unlabelled sample in a Prometheus exposition."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"no {name} in the metrics")


def test_connections_past_the_limit_get_503_until_one_closes(
    tmp_path: Path, simulator: SimulatorThread
) -> None:
    with entra_gateway(
        tmp_path,
        simulator,
        None,
        subscriptions={"team-a": "starter"},
        security=SECURITY,
        listen={"max_connections": 2},
    ) as h:
        port, key = h.served.port, h.keys["team-a"]
        held = [http.client.HTTPConnection("127.0.0.1", port, timeout=10) for _ in range(2)]
        for conn in held:
            conn.request("POST", CHAT, _PAYLOAD, {"api-key": key, "content-type": "text/json"})
            answered = conn.getresponse()
            assert answered.status == 200
            answered.read()

        # A third connection: its request is answered 503 in Azure's shape, and it closes.
        head, _, body = _raw(port, _chat_request(key)).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503 "), head
        assert b"retry-after: 1\r\n" in head and b"connection: close" in head
        assert json.loads(body)["error"]["code"] == "TooManyConnections"
        # The answer comes before the body is in: the connection is half-closed, and the
        # rest of the request is still read and dropped (closed on unread bytes, it would be
        # reset, which some clients' stacks answer by discarding the answer unread).
        padded = _chat_request(key, body=b'{"pad": "' + b"x" * 300_000 + b'"}')
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(padded[:2000])
            answer = b""
            while not _closing_answer_in(answer):
                answer += sock.recv(65536)
            assert answer.startswith(b"HTTP/1.1 503 ") and answer.endswith(body), answer
            for at in range(2000, len(padded), 100_000):
                sock.sendall(padded[at : at + 100_000])  # a closed socket would reset
                time.sleep(0.05)
            assert sock.recv(100) == b""  # and the gateway's side is shut
        # A connection that sends nothing is closed when the head's time is up.
        answer, took = _trickle(port, [], 0)
        assert answer == b"" and took < 5

        # The SDK sees the code; retrying (after Retry-After), it gets through once a
        # connection is free.
        sdk = openai.AzureOpenAI(
            azure_endpoint=h.url, api_key=key, api_version=API_VERSION, max_retries=0
        )
        with pytest.raises(openai.InternalServerError) as refused:
            sdk.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=3)
        assert refused.value.status_code == 503 and refused.value.code == "TooManyConnections"
        threading.Timer(0.3, held.pop().close).start()
        started = time.monotonic()
        done = sdk.with_options(max_retries=2).chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, max_tokens=3
        )
        assert done.choices and time.monotonic() - started > 0.3
        sdk.close()

        # The metrics, read on the connection still held (a new one could be refused): one
        # open once the others' closes are seen, and the five refused.
        deadline = time.monotonic() + 5
        while True:
            held[0].request("GET", "/metrics")
            metrics = held[0].getresponse().read().decode()
            if _metric(metrics, "sluicegate_client_connections") == 1:
                break
            assert time.monotonic() < deadline, metrics
            time.sleep(0.05)
        assert _metric(metrics, "sluicegate_client_connections_refused_total") == 5
        held[0].close()
        # Refused connections never reached the app: no usage records for them.
        assert len(h.records(expect=3)) == 3


def test_passthrough_paths_only_for_products_that_may_use_every_deployment(
    tmp_path: Path, simulator: SimulatorThread
) -> None:
    """Passthrough paths are forwarded unmetered and name their model in the body (images
    on the v1 API) or in a batch's file, past the deployment check: a product limited to
    some deployments may not use them unless it says ``passthrough: true``."""
    products: list[dict[str, Any]] = [
        {"name": "open", "deployments": ["*"]},
        {"name": "narrow", "deployments": ["gpt-4o-mini"]},
        {"name": "narrow-with-files", "deployments": ["gpt-4o-mini"], "passthrough": True},
        {"name": "open-without", "deployments": ["*"], "passthrough": False},
    ]
    subscriptions = {p["name"]: p["name"] for p in products}
    with entra_gateway(
        tmp_path, simulator, None, subscriptions=subscriptions, products=products
    ) as h:
        forwarded = 0
        for name, allowed in (
            ("open", True),
            ("narrow", False),
            ("narrow-with-files", True),
            ("open-without", False),
        ):
            r = httpx.post(
                f"{h.url}/openai/v1/images/generations",
                json={"model": "dall-e-3", "prompt": "a sluice gate"},
                headers={"api-key": h.keys[name]},
                timeout=30,
            )
            if allowed:
                forwarded += 1
                assert r.status_code != 403, (name, r.text)
            else:
                assert r.status_code == 403, (name, r.text)
                assert r.json()["error"]["code"] == "OperationNotAllowed"
            assert len(h.sim_log()) == forwarded, name
        # The product's own deployments are served as before.
        ok = h.chat({"api-key": h.keys["narrow"]})
        assert ok.status_code == 200, ok.text


def _products(allowed: list[str]) -> list[dict[str, Any]]:
    return [
        {"name": "starter", "deployments": ["*"]},
        {"name": "private", "deployments": ["*"], "allowed_ips": allowed},
    ]


def test_forwarded_for_is_believed_only_from_trusted_proxies(
    tmp_path: Path, simulator: SimulatorThread
) -> None:
    products = _products(["203.0.113.0/24"])
    with entra_gateway(
        tmp_path / "untrusted", simulator, None, subscriptions={"p": "private"}, products=products
    ) as h:
        key = {"api-key": h.keys["p"]}
        # The direct peer (127.0.0.1) is no proxy of ours: its X-Forwarded-For is ignored.
        resp = h.chat({**key, "x-forwarded-for": "203.0.113.7"})
        assert resp.status_code == 403, resp.text
        assert resp.json()["error"]["code"] == "IpForbidden"
        assert "127.0.0.1" in resp.json()["error"]["message"]

    security = {"trusted_proxies": ["127.0.0.1", "10.0.0.0/8"]}
    with entra_gateway(
        tmp_path / "trusted",
        simulator,
        None,
        subscriptions={"p": "private"},
        products=products,
        security=security,
    ) as h:
        key = {"api-key": h.keys["p"]}
        assert h.chat({**key, "x-forwarded-for": "203.0.113.7"}).status_code == 200
        # Through two trusted proxies: the client is the first untrusted hop from the right.
        assert h.chat({**key, "x-forwarded-for": "203.0.113.7, 10.1.2.3"}).status_code == 200
        # A client that prepends a fake address does not get past the proxy that appended
        # its real one.
        resp = h.chat({**key, "x-forwarded-for": "203.0.113.7, 198.51.100.9"})
        assert resp.status_code == 403
        assert "198.51.100.9" in resp.json()["error"]["message"]
        # Without the header the client is the proxy itself (not in the allow-list).
        assert h.chat(key).status_code == 403
        records = h.records(expect=2)
    # Refused before the subscription was accepted: like a suspended subscription's requests,
    # they reach the metrics and the access log, not the ledger.
    assert sorted(r.status for r in records) == [200, 200]


def test_allow_list_on_the_direct_peer(tmp_path: Path, simulator: SimulatorThread) -> None:
    with entra_gateway(
        tmp_path,
        simulator,
        None,
        subscriptions={"inside": "private", "starter": "starter"},
        products=_products(["127.0.0.0/8", "::1"]),
    ) as h:
        assert h.chat({"api-key": h.keys["inside"]}).status_code == 200
    with entra_gateway(
        tmp_path / "b",
        simulator,
        None,
        subscriptions={"outside": "private", "starter": "starter"},
        products=_products(["10.0.0.0/8"]),
    ) as h:
        resp = h.chat({"api-key": h.keys["outside"]})
        assert resp.status_code == 403
        assert "'private'" in resp.json()["error"]["message"]
        assert h.chat({"api-key": h.keys["starter"]}).status_code == 200


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sluicegate test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp / "gateway.crt", tmp / "gateway.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_tls_with_the_sdk(tmp_path: Path, simulator: SimulatorThread) -> None:
    cert, key = _self_signed(tmp_path)
    listen = {"host": "127.0.0.1", "port": 0, "tls_cert": str(cert), "tls_key": str(key)}
    with entra_gateway(
        tmp_path, simulator, None, subscriptions={"team-a": "starter"}, listen=listen
    ) as h:
        assert h.url.startswith("https://")
        trust = ssl.create_default_context(cafile=str(cert))
        with httpx.Client(verify=trust) as http:
            # openai annotates http_client as httpx2.Client only, but accepts (and checks at
            # run time, is_legacy_httpx_sync_client) the httpx.Client this test passes.
            client = openai.AzureOpenAI(  # type: ignore[call-overload]
                azure_endpoint=h.url,
                api_key=h.keys["team-a"],
                api_version=API_VERSION,
                max_retries=0,
                http_client=http,
            )
            reply = client.chat.completions.create(
                model="gpt-4o-mini", messages=MESSAGES, max_tokens=3
            )
            assert reply.usage is not None and reply.usage.completion_tokens == 3
        # Without trusting the certificate, the client refuses the connection.
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{h.url}/healthz", timeout=5)
        # Plain HTTP to the TLS port gets no HTTP answer.
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{h.served.port}/healthz", timeout=5)
        assert [r.status for r in h.records(expect=1)] == [200]
