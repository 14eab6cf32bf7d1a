"""Backend api-keys from Azure Key Vault, with the real ``azure-keyvault-secrets`` and
``azure-identity`` against loopback fakes: a Key Vault over HTTPS that speaks the challenge
protocol (tests/support/keyvault.py) and an App Service managed-identity token endpoint
(tests/support/identity_endpoint.py) that issues the vault's tokens.

The vault is reached as ``https://<name>.vault.azure.net`` through a loopback CONNECT proxy
(``HTTPS_PROXY``) and its self-signed certificate is trusted through ``REQUESTS_CA_BUNDLE``:
the standard variables the SDK's transport honours, so the gateway runs unchanged and the
SDK's check that the challenge's resource is the vault's domain stays on (and is shown to
refuse a vault at a loopback address). Nothing leaves the machine: the proxy tunnels only
that host, and every test checks it refused nothing."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from sluicegate.simulator.server import SimulatorThread
from tests.routing.harness import Routed, body, pool_config, start_sim
from tests.support.gateway import GatewayProcess, gateway_config, gateway_environ
from tests.support.identity_endpoint import IdentityEndpoint
from tests.support.keyvault import RESOURCE, FakeKeyVault

SECRET = "aoai-key"
KEY_A = "vault-key-a-" + "0123456789abcdef" * 2
KEY_B = "vault-key-b-" + "fedcba9876543210" * 2

# Variables that would make azure-identity or requests go elsewhere than the fakes.
_CLEARED = (
    "MSI_ENDPOINT", "MSI_SECRET", "IDENTITY_SERVER_THUMBPRINT", "IMDS_ENDPOINT",
    "AZURE_FEDERATED_TOKEN_FILE", "AZURE_CLIENT_ID", "AZURE_TENANT_ID", "AZURE_CLIENT_SECRET",
    "http_proxy", "https_proxy", "all_proxy", "no_proxy", "HTTP_PROXY", "ALL_PROXY",
    "CURL_CA_BUNDLE",
)  # fmt: skip


@dataclass
class Azure:
    endpoint: IdentityEndpoint
    vault: FakeKeyVault


@pytest.fixture
def azure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Azure]:
    """The fakes, and this process's environment pointing at them (a gateway in a thread
    reads it; ``gateway_environ()`` passes it on to a gateway process)."""
    for name in _CLEARED:
        monkeypatch.delenv(name, raising=False)
    with IdentityEndpoint() as endpoint:

        def issued_for_the_vault(token: str) -> bool:
            return any(
                h.token == token and h.params.get("resource") == RESOURCE for h in endpoint.issued()
            )

        with FakeKeyVault(tmp_path, issued_for_the_vault) as vault:
            for name, value in {**endpoint.environ(), **vault.environ()}.items():
                monkeypatch.setenv(name, value)
            yield Azure(endpoint, vault)
            assert vault.refused == [], "something tried to leave the machine"


@pytest.fixture
def stop_all(azure: Azure) -> Iterator[list[Routed]]:
    """Gateways stopped before the fakes are (their refresh tasks use them)."""
    started: list[Routed] = []
    yield started
    for routed in started:
        routed.stop()
        for sim in routed.sims.values():
            sim.stop()


def _key_vault(vault_url: str, **options: Any) -> dict[str, Any]:
    return {"type": "api-key", "key_vault": {"vault_url": vault_url, "secret": SECRET, **options}}


def _routed(tmp: Path, azure: Azure, api_keys: list[str], **options: Any) -> Routed:
    sims = {"aoai": start_sim(api_keys=api_keys)}
    config = pool_config(tmp, sims, [{"backend": "aoai"}])
    config["backends"][0]["auth"] = _key_vault(azure.vault.url, **options)
    return Routed(config, sims)


def _poster(client: httpx.Client, routed: Routed) -> Callable[[], int]:
    def post() -> int:
        r = client.post(routed.chat_url(), json=body(5), headers={"api-key": routed.key})
        return r.status_code

    return post


def _until(check: Callable[[], bool], within: float, what: str) -> float:
    start = time.monotonic()
    while not check():
        assert time.monotonic() - start < within, what
        time.sleep(0.05)
    return time.monotonic() - start


def test_requests_carry_the_key_read_from_the_vault_at_start(
    tmp_path: Path, azure: Azure, stop_all: list[Routed]
) -> None:
    azure.vault.set_secret(SECRET, KEY_A)
    routed = _routed(tmp_path, azure, [KEY_A])
    stop_all.append(routed)
    with httpx.Client(timeout=30) as client, ThreadPoolExecutor(8) as pool:
        post = _poster(client, routed)
        statuses = list(pool.map(lambda _: post(), range(24)))
    assert statuses == [200] * 24
    log = routed.sim_log("aoai")
    assert len(log) == 24
    assert all(e["api_key_present"] and not e["authorization_present"] for e in log)
    # The challenge protocol: a request without a token, 401 with the challenge, then the
    # same request with a token the identity endpoint issued for the vault's resource.
    challenge, read = azure.vault.hits[:2]
    assert (challenge.status, challenge.token) == (401, None)
    assert read.status == 200 and read.token is not None and read.api_version
    assert read.path.rstrip("/") == f"/secrets/{SECRET}"
    (token,) = azure.endpoint.issued()
    assert token.params["resource"] == RESOURCE
    # One read, at start: none on the request path.
    assert len(azure.vault.reads()) == 1
    backend = routed.gw.gateway.runtime.backends["aoai"]
    assert backend.secrets() == [KEY_A]
    assert KEY_A not in repr(backend) + repr(backend.vault_key)


def test_a_rotated_secret_is_used_after_the_next_refresh_without_a_restart(
    tmp_path: Path, azure: Azure, stop_all: list[Routed]
) -> None:
    azure.vault.set_secret(SECRET, KEY_A)
    # The backend accepts only the new key, as Azure OpenAI does once the old one was
    # regenerated: its answers show which key the gateway sent.
    routed = _routed(tmp_path, azure, [KEY_B], refresh_seconds=0.5)
    stop_all.append(routed)
    gateway = routed.gw.gateway
    with httpx.Client(timeout=30) as client:
        post = _poster(client, routed)
        assert post() == 401  # the vault's key A was sent; the backend's 401 is relayed
        version_b = azure.vault.set_secret(SECRET, KEY_B)
        waited = _until(lambda: post() == 200, 10, "the rotated key was not picked up")
        assert [post() for _ in range(10)] == [200] * 10
    assert waited < 3, f"picked up after {waited:.1f} s with refresh_seconds 0.5"
    assert routed.gw.gateway is gateway and routed.gw.server.started  # no restart
    backend = gateway.runtime.backends["aoai"]
    assert backend.vault_key is not None and backend.vault_key.version == version_b
    # Both keys are secrets the gateway held: leak checks must look for the old one too.
    assert backend.secrets() == [KEY_A, KEY_B]
    served = [h.version for h in azure.vault.reads()]
    assert served[0] != version_b and served[-1] == version_b


def test_a_failed_refresh_keeps_the_key_held_and_warns(
    tmp_path: Path, azure: Azure, stop_all: list[Routed], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="sluicegate.upstream")
    azure.vault.set_secret(SECRET, KEY_A)
    routed = _routed(tmp_path, azure, [KEY_A, KEY_B], refresh_seconds=0.3)
    stop_all.append(routed)
    azure.vault.refuse = True  # e.g. the gateway's access to the vault was revoked
    _until(lambda: len(azure.vault.reads(403)) >= 2, 10, "no refresh was tried")
    with httpx.Client(timeout=30) as client:
        post = _poster(client, routed)
        assert [post() for _ in range(5)] == [200] * 5
        warnings = [
            r.getMessage()
            for r in caplog.records
            if r.name == "sluicegate.upstream" and r.levelno == logging.WARNING
        ]
        assert warnings, "a failed refresh is logged"
        assert warnings[0].startswith(
            f"backend aoai: re-reading Key Vault secret {SECRET} in {azure.vault.url} failed "
            "(HttpResponseError: (Forbidden) The user, group or application does not have "
            "secrets get permission"
        )
        assert "keeping the key held" in warnings[0]
        assert not any(KEY_A in w for w in warnings)
        # Once the vault answers again, the next read brings the current value.
        azure.vault.refuse = False
        azure.vault.set_secret(SECRET, KEY_B)
        backend = routed.gw.gateway.runtime.backends["aoai"]
        assert backend.vault_key is not None
        vault_key = backend.vault_key
        _until(lambda: vault_key.value == KEY_B, 10, "the vault's answer was not used")
        assert post() == 200


def test_a_malformed_new_value_is_refused_and_the_key_held_stays_in_use(
    tmp_path: Path, azure: Azure, stop_all: list[Routed], caplog: pytest.LogCaptureFixture
) -> None:
    """A new version whose value has a line break inside (e.g. two keys pasted together)
    cannot be sent as a header: it is refused like a failed read, the key held stays in use,
    and the warning says why without the value."""
    caplog.set_level(logging.WARNING, logger="sluicegate.upstream")
    azure.vault.set_secret(SECRET, KEY_A)
    routed = _routed(tmp_path, azure, [KEY_A, KEY_B], refresh_seconds=0.3)
    stop_all.append(routed)
    backend = routed.gw.gateway.runtime.backends["aoai"]
    assert backend.vault_key is not None
    vault_key = backend.vault_key
    malformed = azure.vault.set_secret(SECRET, f"{KEY_B}\r\n{KEY_A}")
    _until(
        lambda: (
            any(h.version == malformed for h in azure.vault.reads())
            and (vault_key.failures > 0 or vault_key.value != KEY_A)
        ),
        10,
        "the malformed version was not read",
    )
    with httpx.Client(timeout=30) as client:
        post = _poster(client, routed)
        assert [post() for _ in range(5)] == [200] * 5
        assert all(e["api_key_present"] for e in routed.sim_log("aoai"))
        assert vault_key.value == KEY_A and vault_key.seen() == [KEY_A]
        warnings = [
            r.getMessage()
            for r in caplog.records
            if r.name == "sluicegate.upstream" and r.levelno == logging.WARNING
        ]
        assert warnings[0] == (
            f"backend aoai: re-reading Key Vault secret {SECRET} in {azure.vault.url} failed "
            "(VaultKeyError: the secret's value cannot be sent as a header: it has a line "
            "break in it); keeping the key held, trying again in 0.3 s"
        )
        assert not any(KEY_A in w or KEY_B in w for w in warnings)
        # A corrected version is used after the next read.
        azure.vault.set_secret(SECRET, KEY_B)
        _until(lambda: vault_key.value == KEY_B, 10, "the corrected value was not used")
        assert post() == 200 and vault_key.last_error is None


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        (
            "unknown-secret",
            "(ResourceNotFoundError: (SecretNotFound) A secret with (name/id) no-such-key was not "
            "found in this key vault.",
        ),
        (
            "forbidden",
            "(HttpResponseError: (Forbidden) The user, group or application does not have "
            "secrets get permission",
        ),
        (
            # The SDK refuses a challenge for vault.azure.net from a server at another domain.
            "wrong-domain",
            "(ValueError: The challenge resource 'vault.azure.net' does not match the "
            "requested domain.",
        ),
        (
            # Two keys pasted into the secret: not a value a header can carry.
            "malformed",
            "(VaultKeyError: the secret's value cannot be sent as a header: it has a line "
            "break in it)",
        ),
    ],
    ids=["unknown-secret", "forbidden", "wrong-domain", "malformed"],
)
def test_serve_refuses_to_start_without_the_key(
    tmp_path: Path, azure: Azure, case: str, reason: str
) -> None:
    azure.vault.set_secret(SECRET, f"{KEY_A}\n{KEY_B}" if case == "malformed" else KEY_A)
    azure.vault.refuse = case == "forbidden"
    vault_url = azure.vault.direct_url if case == "wrong-domain" else azure.vault.url
    secret = "no-such-key" if case == "unknown-secret" else SECRET
    sim = start_sim(api_keys=[KEY_A])
    config = gateway_config(tmp_path, {"aoai": sim.url})
    config["backends"][0]["auth"] = {
        "type": "api-key",
        "key_vault": {"vault_url": vault_url, "secret": secret},
    }
    gw = GatewayProcess(tmp_path, config, env=gateway_environ())
    try:
        with pytest.raises(RuntimeError, match="gateway exited"):
            gw.start(timeout=60)
        assert gw.proc is not None and gw.proc.returncode != 0
    finally:
        gw.kill()
        sim.stop()
    logs = gw.log_path.read_text()
    said = (
        f"backend aoai: cannot read its api-key from Key Vault secret '{secret}' in "
        f"{vault_url} {reason}"
    )
    assert said in logs, logs[-3000:]
    for value in azure.vault.values():
        assert value not in logs


def _requests(client: httpx.Client, url: str, key: str) -> list[str]:
    """Every kind of answer (success, backend faults, bad client keys, streams): their texts
    and headers."""
    chat = f"{url}/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"
    seen: list[str] = []
    for headers in (
        {"api-key": key},
        {"api-key": key, "x-sim-fault": "500"},
        {"api-key": key, "x-sim-fault": "cut"},
        {"api-key": "sg-wrong"},
        {"authorization": f"Bearer {key}"},
    ):
        for stream in (False, True):
            r = client.post(chat, json=body(3, stream=stream), headers=headers)
            seen += [r.text, str(r.headers)]
    r = client.get(f"{url}/openai/v1/models", headers={"api-key": key})
    seen += [r.text, str(r.headers), client.get(f"{url}/metrics").text]
    return seen


def test_the_vault_keys_never_leak(tmp_path: Path, azure: Azure) -> None:
    azure.vault.set_secret(SECRET, KEY_A)
    sim: SimulatorThread = start_sim(api_keys=[KEY_A, KEY_B])
    config = gateway_config(
        tmp_path,
        {"aoai": sim.url},
        deployments=[{"name": "gpt-4o", "backend": "aoai", "model": "gpt-4o"}],
        logging={"level": "debug"},
    )
    config["backends"][0]["auth"] = _key_vault(azure.vault.url, refresh_seconds=0.3)
    gw = GatewayProcess(tmp_path, config, env=gateway_environ())
    try:
        gw.start(timeout=60)
        key = gw.create_key("starter", "o", "n")["primary_key"]
        gw.wait_visible(key)
        with httpx.Client(timeout=30) as client:
            seen = _requests(client, gw.url, key)
            version_b = azure.vault.set_secret(SECRET, KEY_B)
            _until(
                lambda: any(h.version == version_b for h in azure.vault.reads()),
                10,
                "the gateway did not read the new version",
            )
            seen += _requests(client, gw.url, key)
        assert gw.terminate() == 0
    finally:
        gw.kill()
        sim.stop()
    logs = gw.log_path.read_text()
    assert '"request"' in logs  # the access log was written: there was something to search
    assert f"api-key rotated (Key Vault secret {SECRET}, version {version_b})" in logs
    for text in [*seen, logs]:
        assert KEY_A not in text and KEY_B not in text
    for db_file in tmp_path.glob("ledger.db*"):
        data = db_file.read_bytes()
        assert KEY_A.encode() not in data and KEY_B.encode() not in data
