"""A fake Azure Key Vault on loopback, over HTTPS, speaking the protocol the real
``azure-keyvault-secrets`` client uses::

    GET /secrets/{name}[/{version}]?api-version=…          (no Authorization)
    → 401  WWW-Authenticate: Bearer authorization="https://login.microsoftonline.com/{tenant}",
                                    resource="https://vault.azure.net"
    GET /secrets/{name}[/{version}]?api-version=…          Authorization: Bearer {token}
    → 200 {"value": …, "id": "https://{vault}/secrets/{name}/{version}", "attributes": {…}}
    → 404 {"error": {"code": "SecretNotFound", "message": …}}     (unknown name or version)
    → 403 {"error": {"code": "Forbidden", …}}                      (``refuse = True``)

Tokens are checked by ``accept_token`` (give it one that asks the loopback identity endpoint
whether it issued that token for ``https://vault.azure.net``).

The SDK checks that a challenge's resource is the vault URL's domain
(``verify_challenge_resource``): a vault at ``https://127.0.0.1:port`` answering for
``vault.azure.net`` is refused, as it should be. So the vault is reached the way an egress
proxy would reach the real one: its URL is ``https://{name}.vault.azure.net``, and
``environ()`` points the standard ``HTTPS_PROXY`` at a CONNECT proxy on loopback that tunnels
that host — and nothing else — to this server. The server's certificate is self-signed for
that name, ``localhost`` and ``127.0.0.1``; ``environ()`` trusts it through the standard
``REQUESTS_CA_BUNDLE`` (the SDK's transport is ``requests``). No name is ever resolved, nothing
leaves the machine: the proxy refuses every other host.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import selectors
import socket
import socketserver
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from urllib.parse import parse_qs, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

TENANT = "72f988bf-86f1-41af-91ab-2d7cd011db47"
RESOURCE = "https://vault.azure.net"
AUTHORITY = "https://login.microsoftonline.com"


@dataclass
class SecretVersion:
    version: str
    value: str
    created: int


@dataclass(frozen=True)
class VaultHit:
    """One request the vault answered."""

    path: str
    status: int
    token: str | None
    api_version: str | None
    #: The version whose value was sent (200 only).
    version: str | None = None


@dataclass
class _Secret:
    versions: list[SecretVersion] = field(default_factory=list)


def self_signed_certificate(directory: Path, hosts: list[str]) -> tuple[Path, Path]:
    """A self-signed server certificate (its own CA) for ``hosts`` (names or IP addresses):
    the certificate and key files, PEM."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])])
    now = datetime.datetime.now(datetime.UTC)
    alt: list[x509.GeneralName] = []
    for host in hosts:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            alt.append(x509.DNSName(host))
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "vault.crt", directory / "vault.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


class FakeKeyVault:
    """See the module docstring. ``start()``/``stop()`` or use as a context manager."""

    def __init__(
        self,
        directory: Path,
        accept_token: Callable[[str], bool],
        *,
        name: str | None = None,
        tenant: str = TENANT,
    ) -> None:
        self.name = name or f"sg-test-{os.urandom(4).hex()}"
        self.host = f"{self.name}.vault.azure.net"
        self.tenant = tenant
        self.accept_token = accept_token
        #: Answer every authorized request 403 Forbidden (the caller lacks permission).
        self.refuse = False
        self.hits: list[VaultHit] = []
        self._secrets: dict[str, _Secret] = {}
        self._lock = threading.Lock()
        self.ca_file, key_file = self_signed_certificate(
            directory, [self.host, "localhost", "127.0.0.1"]
        )
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.ca_file, key_file)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        # The handshake happens in the handler's thread (on its first read), not in accept().
        self._server.socket = context.wrap_socket(
            self._server.socket, server_side=True, do_handshake_on_connect=False
        )
        self._proxy = _ConnectProxy({f"{self.host}:443": self.port})
        self._threads = [
            threading.Thread(target=self._server.serve_forever, daemon=True),
            threading.Thread(target=self._proxy.serve_forever, daemon=True),
        ]

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        """The vault URL clients use (reached through the proxy ``environ()`` names)."""
        return f"https://{self.host}"

    @property
    def direct_url(self) -> str:
        """The server's own loopback address (the SDK refuses its challenge: wrong domain)."""
        return f"https://127.0.0.1:{self.port}"

    def environ(self) -> dict[str, str]:
        """What a client process needs to reach ``url``: the proxy and the certificate."""
        proxy = f"http://127.0.0.1:{self._proxy.server_address[1]}"
        return {
            "HTTPS_PROXY": proxy,
            "NO_PROXY": "127.0.0.1,localhost",
            "REQUESTS_CA_BUNDLE": str(self.ca_file),
        }

    @property
    def refused(self) -> list[str]:
        """Requests the proxy refused: anything but a tunnel to this vault."""
        return list(self._proxy.refused)

    def set_secret(self, name: str, value: str) -> str:
        """Add a new version of secret ``name`` (which becomes its current value); returns
        the version id."""
        version = os.urandom(16).hex()
        with self._lock:
            secret = self._secrets.setdefault(name, _Secret())
            secret.versions.append(SecretVersion(version, value, int(time.time())))
        return version

    def values(self) -> list[str]:
        """Every value of every secret (for tests that prove none leaks)."""
        with self._lock:
            return [v.value for s in self._secrets.values() for v in s.versions]

    def reads(self, status: int = 200) -> list[VaultHit]:
        with self._lock:
            return [h for h in self.hits if h.status == status]

    def _lookup(self, name: str, version: str | None) -> SecretVersion | None:
        with self._lock:
            secret = self._secrets.get(name)
            if secret is None or not secret.versions:
                return None
            if not version:
                return secret.versions[-1]
            return next((v for v in secret.versions if v.version == version), None)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        vault = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                parts = urlsplit(self.path)
                query = {k: v[0] for k, v in parse_qs(parts.query).items()}
                scheme, _, token = self.headers.get("Authorization", "").partition(" ")
                bearer = token.strip() if scheme.lower() == "bearer" and token else None
                status, body = self._answer(parts.path, query.get("api-version"), bearer)
                served = str(body["id"]).rsplit("/", 1)[-1] if body and status == 200 else None
                with vault._lock:
                    vault.hits.append(
                        VaultHit(parts.path, status, bearer, query.get("api-version"), served)
                    )
                data = json.dumps(body).encode() if body is not None else b""
                self.send_response(status)
                if status == 401:
                    authority = f"{AUTHORITY}/{vault.tenant}"
                    challenge = f'Bearer authorization="{authority}", resource="{RESOURCE}"'
                    self.send_header("WWW-Authenticate", challenge)
                self.send_header("Content-Type", "application/json; charset=utf-8")
                self.send_header("Content-Length", str(len(data)))
                self.send_header("x-ms-keyvault-service-version", "1.9.0.0")
                self.end_headers()
                self.wfile.write(data)

            def _answer(
                self, path: str, api_version: str | None, bearer: str | None
            ) -> tuple[int, dict[str, object] | None]:
                if bearer is None:
                    return 401, _error("Unauthorized", "AKV10000: Request is missing a Bearer "
                                       "or PoP token.")  # fmt: skip
                if not vault.accept_token(bearer):
                    return 401, _error("Unauthorized", "AKV10032: Invalid issuer.")
                if not api_version:
                    return 400, _error("BadParameter", "api-version is missing")
                segments = [s for s in path.split("/") if s]
                if len(segments) not in (2, 3) or segments[0] != "secrets":
                    return 404, _error("NotFound", "The requested resource was not found.")
                if vault.refuse:
                    return 403, _error(
                        "Forbidden",
                        "The user, group or application does not have secrets get permission "
                        f"on key vault '{vault.name};location=westeurope'.",
                        inner="AccessDenied",
                    )
                name = segments[1]
                version = segments[2] if len(segments) == 3 else None
                found = vault._lookup(name, version)
                if found is None:
                    ident = f"{name}/{version}" if version else name
                    return 404, _error(
                        "SecretNotFound",
                        f"A secret with (name/id) {ident} was not found in this key vault. If "
                        "you recently deleted this secret you may be able to recover it using "
                        "the correct recovery command.",
                    )
                return 200, {
                    "value": found.value,
                    "id": f"https://{vault.host}/secrets/{name}/{found.version}",
                    "attributes": {
                        "enabled": True,
                        "created": found.created,
                        "updated": found.created,
                        "recoveryLevel": "Recoverable+Purgeable",
                        "recoverableDays": 90,
                    },
                    "tags": {},
                }

            def log_message(self, format: str, *args: object) -> None:
                return None

        return Handler

    def start(self) -> FakeKeyVault:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        for server in (self._server, self._proxy):
            server.shutdown()
            server.server_close()
        for thread in self._threads:
            thread.join(timeout=5)

    def __enter__(self) -> FakeKeyVault:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _error(code: str, message: str, inner: str | None = None) -> dict[str, object]:
    """Key Vault's error body."""
    error: dict[str, object] = {"code": code, "message": message}
    if inner:
        error["innererror"] = {"code": inner}
    return {"error": error}


class _ConnectProxy(socketserver.ThreadingTCPServer):
    """An HTTP CONNECT proxy on loopback that tunnels only ``routes`` (``host:port`` → a
    local port) and refuses everything else with 403."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, routes: dict[str, int]) -> None:
        self.routes = routes
        #: Every request line refused (a test asserts there was none).
        self.refused: list[str] = []
        super().__init__(("127.0.0.1", 0), _TunnelHandler)


class _TunnelHandler(socketserver.BaseRequestHandler):
    server: _ConnectProxy

    def handle(self) -> None:
        client: socket.socket = self.request
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = client.recv(4096)
            if not chunk or len(head) > 16384:
                return
            head += chunk
        line = head.split(b"\r\n", 1)[0].decode("latin-1")
        method, _, target = line.partition(" ")
        target = target.partition(" ")[0]
        port = self.server.routes.get(target) if method == "CONNECT" else None
        if port is None:
            self.server.refused.append(line)
            client.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
            return
        with socket.create_connection(("127.0.0.1", port)) as upstream:
            client.sendall(b"HTTP/1.1 200 Connection Established\r\n\r\n")
            _pipe(client, upstream)


def _pipe(a: socket.socket, b: socket.socket) -> None:
    """Copy bytes both ways until either side closes."""
    with selectors.DefaultSelector() as sel:
        sel.register(a, selectors.EVENT_READ, b)
        sel.register(b, selectors.EVENT_READ, a)
        while True:
            for key, _ in sel.select(timeout=30):
                src: socket.socket = key.fileobj  # type: ignore[assignment]
                try:
                    data = src.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                key.data.sendall(data)
