"""Where a request comes from, and how long its body may take: the pipeline's network guards.

- The client address is the direct peer's, unless the peer is one of ``trusted_proxies``:
  then ``X-Forwarded-For`` is walked from the right, skipping trusted proxies, and the first
  address that is not one is the client (a client cannot forge its way past a proxy that
  appends what it saw). An entry that is not an IP address stops the walk at the hop after it.
- A product with ``allowed_ips`` takes requests only from those networks (403 otherwise).
- The body must arrive within ``body_read_timeout_seconds`` of the first read (408).

Immutable after construction; safe to share between requests.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence

from sluicegate.config.model import GatewayConfig
from sluicegate.proxy.asgi import Message, Receive, Scope
from sluicegate.proxy.deadlines import Deadlines
from sluicegate.proxy.errors import GatewayError

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def _networks(values: Iterable[str]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(v, strict=False) for v in values)


def _address(text: str) -> Address | None:
    text = text.strip()
    if text.startswith("[") and "]" in text:  # [v6]:port
        text = text[1 : text.index("]")]
    elif text.count(":") == 1:  # v4:port
        text = text.split(":", 1)[0]
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def _within(addr: Address, networks: Sequence[Network]) -> bool:
    return any(addr.version == n.version and addr in n for n in networks)


class NetworkPolicy:
    """See the module docstring."""

    def __init__(
        self,
        trusted_proxies: Iterable[str] = (),
        allowed_ips: Mapping[str, Iterable[str] | None] | None = None,
        body_timeout: float = 30.0,
    ) -> None:
        self._trusted = _networks(trusted_proxies)
        self._allowed = {
            product: _networks(values)
            for product, values in (allowed_ips or {}).items()
            if values is not None
        }
        self.body_timeout = body_timeout

    @classmethod
    def from_config(cls, config: GatewayConfig) -> NetworkPolicy:
        return cls(
            config.security.trusted_proxies,
            {p.name: p.allowed_ips for p in config.products},
            config.security.body_read_timeout_seconds,
        )

    def client_ip(self, scope: Scope) -> str | None:
        """The client's address as text (see the module docstring)."""
        peer_text: str | None = (scope.get("client") or (None,))[0]
        if peer_text is None or not self._trusted:
            return peer_text
        peer = _address(peer_text)
        if peer is None or not _within(peer, self._trusted):
            return peer_text
        hops: list[str] = []
        for name, value in scope["headers"]:
            if name == b"x-forwarded-for":
                hops.extend(value.decode("latin-1").split(","))
        client: Address = peer
        for hop in reversed(hops):
            addr = _address(hop)
            if addr is None:
                break
            client = addr
            if not _within(addr, self._trusted):
                break
        return str(client)

    def check_product(self, product: str, client_ip: str | None) -> None:
        """Raise 403 when ``product`` has an allow-list and the client is outside it."""
        networks = self._allowed.get(product)
        if networks is None:
            return
        addr = _address(client_ip) if client_ip else None
        if addr is None or not _within(addr, networks):
            raise GatewayError(
                403,
                "IpForbidden",
                f"Product {product!r} accepts requests only from its allowed networks, and "
                f"your address {client_ip or 'unknown'} is not in them. Call from an allowed "
                "network or ask the gateway's operators to add yours.",
            )

    def body_deadline(self, receive: Receive, deadlines: Deadlines) -> Receive:
        """``receive`` with a deadline on the request body: the body must be complete within
        ``body_timeout`` seconds of the first read, or the read fails with 408. Messages after
        the body (a disconnect while streaming) pass through without a deadline."""
        timeout = self.body_timeout
        deadline: float | None = None
        done = False

        async def guarded() -> Message:
            nonlocal deadline, done
            if done:
                return await receive()
            if deadline is None:
                deadline = deadlines.now() + timeout
            try:
                with deadlines.at(deadline):
                    message = await receive()
            except TimeoutError:
                raise GatewayError(
                    408,
                    "RequestTimeout",
                    f"The request body did not arrive within {timeout:g} seconds. Send the "
                    "whole body promptly.",
                    headers=[("connection", "close")],  # the rest of the body is not read
                ) from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                done = True
            return message

        return guarded

    def __repr__(self) -> str:
        return (
            f"NetworkPolicy(trusted_proxies={len(self._trusted)}, "
            f"allow_lists={sorted(self._allowed)}, body_timeout={self.body_timeout})"
        )
