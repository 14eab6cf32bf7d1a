"""``sluicegate demo``: the simulator and a gateway in front of it, a demo key, the dashboard,
and examples that work as printed. Ctrl-C stops both. A later run in the same directory reuses
the demo subscription with a new key (``demo_key``) rather than adding another.

Before it writes anything the demo checks that both ports are free: a port in use (most often
by a demo still running) ends it at once with a message naming the port and another to use.
It then trusts a health answer only from the child it started (see ``_wait_healthy``), and a
child that exits ends the demo with a non-zero status and the last lines of the child's log.
"""

from __future__ import annotations

import errno
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from sluicegate.admin.auth import MIN_TOKEN_LENGTH
from sluicegate.admin.service import AdminService
from sluicegate.auth.subscriptions import SubscriptionState
from sluicegate.cli.context import CommandFailed, open_admin
from sluicegate.config.loader import parse_config

_DEPLOYMENTS = ("gpt-4o-mini", "gpt-4o", "text-embedding-3-small")

#: Where both children listen (the gateway's ``listen.host``, the simulator's ``--host``).
_HOST = "127.0.0.1"

#: Environment variables handing the children their secrets (never written to a file the
#: gateway reads, never printed except the admin token, which is the demo's sign-in).
_BACKEND_KEY_ENV = "SLUICEGATE_DEMO_BACKEND_KEY"
_ADMIN_TOKEN_ENV = "SLUICEGATE_DEMO_ADMIN_TOKEN"

#: The file (in the demo's directory, mode 0600) that keeps the admin token between runs, so
#: that a re-run signs in with the same token and dashboard sessions survive it.
ADMIN_TOKEN_FILE = "admin-token"

#: Per million tokens, matched by the deployments' configured model.
_PRICES: list[dict[str, Any]] = [
    {"model": "gpt-4o", "input": 2.50, "cached_input": 1.25, "output": 10.00, "currency": "USD"},
    {
        "model": "gpt-4o-mini",
        "input": 0.15,
        "cached_input": 0.075,
        "output": 0.60,
        "currency": "USD",
    },
    {"model": "text-embedding-3-small", "input": 0.02, "output": 0.0, "currency": "USD"},
]
_PRICES_COMMENT = """\
# Example prices, so that reports and the dashboard show cost: Azure OpenAI's published
# pay-as-you-go list prices (USD per million tokens, Global deployments) of these models.
# A real gateway.yaml takes your own agreement's prices (docs/chargeback.md).
"""

#: Lines of a failed child's log printed with the failure.
_LOG_LINES = 20
_LOG_TAIL_BYTES = 64 * 1024


class _StopRequested(Exception):
    """Ctrl-C or SIGTERM arrived while the demo was starting."""


@dataclass(slots=True)
class _Child:
    """A process the demo started, with the log its stderr goes to (appended to across runs:
    ``start`` is where this run's lines begin)."""

    what: str
    proc: subprocess.Popen[bytes]
    log: Path
    start: int

    def ended(self) -> str:
        """How it ended, for a message (it has ended)."""
        return _ended(self.what, self.proc.returncode)

    def tail(self, hide: Iterable[str] = ()) -> str:
        """The last lines this run wrote to the log, indented, with each of ``hide`` (secrets
        that must never be printed) replaced by ``<hidden>``; empty when there are none."""
        try:
            with self.log.open("rb") as f:
                size = f.seek(0, os.SEEK_END)
                begin = self.start if self.start <= size else 0  # 0: emptied meanwhile
                # The gateway logs every request: read only the log's end.
                cut = size - _LOG_TAIL_BYTES > begin
                f.seek(size - _LOG_TAIL_BYTES if cut else begin)
                text = f.read().decode("utf-8", "replace")
        except OSError:
            return ""
        for secret in hide:
            text = text.replace(secret, "<hidden>")
        lines = text.splitlines()[1 if cut else 0 :]  # a cut's first line is partial
        lines = [line for line in lines if line.strip()][-_LOG_LINES:]
        if not lines:
            return ""
        body = "\n".join(f"  {line}" for line in lines)
        return f"The last lines of {self.log}:\n{body}"


def _ended(what: str, code: int) -> str:
    if code < 0:
        try:
            return f"{what} was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"{what} was killed by signal {-code}"
    return f"{what} exited with code {code}"


def _start(what: str, args: list[str], env: dict[str, str], log: Path) -> _Child:
    start = log.stat().st_size if log.exists() else 0
    with log.open("ab") as err:  # the child has its own copy of the descriptor
        proc = subprocess.Popen(args, env=env, stderr=err)
    return _Child(what, proc, log, start)


# -- ports ---------------------------------------------------------------------------------


def _bind_error(port: int) -> OSError | None:
    """Why ``_HOST:port`` cannot be listened on now, or None when it can."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        if os.name == "posix":
            # As uvicorn and aiohttp bind: a port whose closed connections linger in
            # TIME_WAIT is free to them, so it is free here too.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((_HOST, port))
        except OSError as exc:
            return exc
    return None


def _free_port_near(port: int, avoid: set[int]) -> int | None:
    """A free port to suggest instead of ``port`` (from ``port + 10`` up), or None."""
    for candidate in range(port + 10, min(port + 210, 65536)):
        if candidate not in avoid and _bind_error(candidate) is None:
            return candidate
    return None


def check_ports(port: int, sim_port: int) -> None:
    """Raise ``CommandFailed`` unless the gateway's and the simulator's ports are two different
    ports free on 127.0.0.1. A port in use gets a message that names it and suggests a free
    one, as ``make demo PORT=… SIM_PORT=…`` and as ``sluicegate demo --port … --sim-port …``."""
    if port == sim_port:
        raise CommandFailed(
            f"the gateway and the simulator need two different ports (both are {port})"
        )
    busy: list[tuple[str, str, str, int]] = []
    for role, var, option, number in (
        ("the gateway", "PORT", "--port", port),
        ("the simulator", "SIM_PORT", "--sim-port", sim_port),
    ):
        exc = _bind_error(number)
        if exc is None:
            continue
        if exc.errno != errno.EADDRINUSE:
            raise CommandFailed(f"cannot listen on {_HOST}:{number} ({role}): {exc.strerror}")
        busy.append((role, var, option, number))
    if not busy:
        return
    avoid = {port, sim_port}
    make_args, cli_args = [], []
    for _, var, option, number in busy:
        other = _free_port_near(number, avoid)
        avoid.add(other or number)
        make_args.append(f"{var}={other or '<another port>'}")
        cli_args.append(f"{option} {other or '<another port>'}")
    ports = " and ".join(f"port {number} ({role}'s)" for role, _, _, number in busy)
    raise CommandFailed(
        f"{ports} {'is' if len(busy) == 1 else 'are'} in use (another demo still running?): "
        f"stop it, or run `make demo {' '.join(make_args)}` "
        f"(`sluicegate demo {' '.join(cli_args)}`)"
    )


def _owns_port(pid: int, port: int) -> bool | None:
    """Whether process ``pid`` holds a TCP socket listening on ``port``; None where this cannot
    be told (no ``/proc/net/tcp``: not Linux).

    Linux's socket tables name each listening socket's inode, and ``/proc/<pid>/fd`` links to
    the inodes of a process's sockets."""
    sockets: set[str] = set()
    readable = False
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        readable = True
        for row in rows:
            # sl local_address rem_address st ... inode: "0A" is LISTEN, the address ends
            # with ":<port in hex>".
            fields = row.split()
            listening = len(fields) > 9 and fields[3] == "0A"
            if listening and int(fields[1].rsplit(":", 1)[1], 16) == port:
                sockets.add(f"socket:[{fields[9]}]")
    if not readable:
        return None
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:  # it has exited
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") in sockets:
                return True
        except OSError:  # closed meanwhile
            continue
    return False


def _wait_healthy(
    url: str,
    proc: subprocess.Popen[bytes],
    what: str,
    timeout: float = 30,
    stop: Callable[[], bool] = lambda: False,
) -> None:
    """Return once ``url`` answers 200 and the answer came from ``proc``: where that can be
    told (Linux), ``proc`` itself must hold the socket listening on the URL's port, so that a
    process that took the port first (an older demo, another program) is never mistaken for
    it. Elsewhere ``check_ports`` has found the port free just before ``proc`` started.

    Raises ``RuntimeError`` when ``proc`` exits first or ``timeout`` seconds pass, and
    ``_StopRequested`` as soon as ``stop()`` is true."""
    port = urlsplit(url).port or 80
    deadline = time.monotonic() + timeout
    answered_by_other = False
    while time.monotonic() < deadline:
        if stop():
            raise _StopRequested
        if proc.poll() is not None:
            raise RuntimeError(_ended(what, proc.returncode))
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:  # noqa: S310 - loopback only
                healthy = resp.status == 200
        except OSError:
            healthy = False
        if healthy:
            if _owns_port(proc.pid, port) is not False:
                return
            # Another process answers there: if it took the port first, ``proc`` fails to
            # listen and exits, which the next turn reports.
            answered_by_other = True
        time.sleep(0.1)
    if answered_by_other:
        raise RuntimeError(
            f"another process answers at {url}, not {what} the demo started "
            "(another demo still running?)"
        )
    raise RuntimeError(f"{what} did not become healthy at {url} within {timeout:g} s")


# -- files -----------------------------------------------------------------------------------


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path``, readable by its owner only (it holds a secret)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), 0o600)  # a file from an older demo may have wider modes
        f.write(text)


def admin_token(workdir: Path) -> str:
    """The demo's admin token: kept in ``workdir/admin-token`` (mode 0600), made the first
    time. Raises ``CommandFailed`` when the file holds a token too short to enable the admin
    API (someone edited it)."""
    path = workdir / ADMIN_TOKEN_FILE
    try:
        token = path.read_text().strip()
    except FileNotFoundError:
        workdir.mkdir(parents=True, exist_ok=True)
        token = secrets.token_urlsafe(32)
        # O_EXCL: a token already there is never replaced.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
        return token
    if len(token) < MIN_TOKEN_LENGTH:
        raise CommandFailed(
            f"{path} holds fewer than {MIN_TOKEN_LENGTH} characters, too short for an admin "
            "token: delete it, and the demo makes a new one"
        )
    return token


def demo_files(workdir: Path, port: int, sim_port: int, backend_key: str) -> Path:
    """Write the simulator's and the gateway's configuration; return the gateway's path."""
    workdir.mkdir(parents=True, exist_ok=True)
    sim = {
        "api_keys": [backend_key],
        "deployments": [
            {
                "name": "gpt-4o-mini",
                "model": "gpt-4o-mini-2024-07-18",
                "kind": "chat",
                "tpm": 1_000_000,
                "rpm": 6_000,
                "ttft_ms": 50,
                "tokens_per_second": 200,
            },
            {
                "name": "gpt-4o",
                "model": "gpt-4o-2024-08-06",
                "kind": "chat",
                "tpm": 1_000_000,
                "rpm": 6_000,
                "ttft_ms": 80,
                "tokens_per_second": 100,
            },
            {
                "name": "text-embedding-3-small",
                "model": "text-embedding-3-small",
                "kind": "embeddings",
                "tpm": 1_000_000,
                "rpm": 6_000,
            },
        ],
    }
    _write_private(workdir / "simulator.yaml", yaml.safe_dump(sim, sort_keys=False))
    gateway = {
        "mode": "embedded",
        "listen": {"host": _HOST, "port": port},
        "storage": {
            "url": f"sqlite:///{workdir / 'ledger.db'}",
            "spill_dir": str(workdir / "spill"),
        },
        "backends": [
            {
                "name": "simulator",
                "url": f"http://{_HOST}:{sim_port}",
                "auth": {"type": "api-key", "key_env": _BACKEND_KEY_ENV},
            }
        ],
        "deployments": [{"name": d, "backend": "simulator", "model": d} for d in _DEPLOYMENTS],
        "products": [
            {
                "name": "starter",
                "description": "Demo product: every deployment",
                "deployments": ["*"],
            }
        ],
        "admin": {"token_env": _ADMIN_TOKEN_ENV},
    }
    path = workdir / "gateway.yaml"
    path.write_text(
        yaml.safe_dump(gateway, sort_keys=False)
        + _PRICES_COMMENT
        + yaml.safe_dump({"prices": _PRICES}, sort_keys=False)
    )
    return path


#: The demo's subscription: found again by these on a later run in the same directory.
DEMO_PRODUCT, DEMO_OWNER, DEMO_NAME = "starter", "demo-team", "demo key"


def demo_key(admin: AdminService) -> tuple[str, bool]:
    """A working key of the demo subscription, and whether that subscription was made now.

    The first run makes it (its primary key is the one printed). A later run in the same
    directory reuses it instead of adding another each time: keys are stored hashed, so the
    key printed before cannot be shown again, and its primary key is rotated instead (the
    key printed before stops working; the secondary, never shown, is untouched). A suspended
    demo subscription is resumed (a submitted one approved); a cancelled or rejected one never
    works again, so a new one is made."""
    found, _ = admin.list(search=DEMO_NAME, product=DEMO_PRODUCT, limit=1000)
    reusable = sorted(
        (
            sub
            for sub in found
            if (sub.owner, sub.name) == (DEMO_OWNER, DEMO_NAME)
            and sub.state not in (SubscriptionState.CANCELLED, SubscriptionState.REJECTED)
            and sub.expires_at is None
        ),
        key=lambda sub: sub.created_at,
    )
    if not reusable:
        issued = admin.create_subscription(product=DEMO_PRODUCT, owner=DEMO_OWNER, name=DEMO_NAME)
        assert issued.primary_key is not None
        return issued.primary_key, True
    sub = reusable[0]
    if sub.state is SubscriptionState.SUSPENDED:
        admin.resume(sub.id)
    elif sub.state is SubscriptionState.SUBMITTED:
        admin.approve(sub.id)
    rotated = admin.rotate(sub.id, "primary")
    assert rotated.primary_key is not None
    return rotated.primary_key, False


def examples(
    gateway_url: str, key: str, *, config: Path, token: str, token_file: Path, created: bool = True
) -> str:
    made = (
        f"A demo subscription was created. Its key: {key}"
        if created
        else "The demo subscription of an earlier run got a new key (the one printed then no "
        f"longer works): {key}"
    )
    return f"""
sluicegate is running at {gateway_url} (in front of the built-in simulator).

{made}

curl:

  curl -s "{gateway_url}/openai/deployments/gpt-4o-mini/chat/completions?api-version=2024-10-21" \\
    -H "api-key: {key}" -H "content-type: application/json" \\
    -d '{{"messages": [{{"role": "user", "content": "Say hello"}}]}}'

Python (pip install openai):

  from openai import AzureOpenAI
  client = AzureOpenAI(azure_endpoint="{gateway_url}", api_key="{key}", api_version="2024-10-21")
  reply = client.chat.completions.create(
      model="gpt-4o-mini", messages=[{{"role": "user", "content": "Say hello"}}]
  )
  print(reply.choices[0].message.content, reply.usage)

Dashboard (usage, cost, charge-back, forecast, subscriptions):

  {gateway_url}/dashboard/
  Sign in with the admin token: {token}
  (kept in {token_file}; the admin API at {gateway_url}/admin/api takes it as
  "Authorization: Bearer <token>")

Usage and cost so far:  .venv/bin/sluicegate usage report -c {config}
Press Ctrl-C to stop.
"""


# -- the run ---------------------------------------------------------------------------------


def run_demo(*, port: int, sim_port: int, workdir: Path) -> int:
    """Run the demo until Ctrl-C or SIGTERM (status 0). A child that fails to start or exits
    ends it with status 1, after its log's last lines; a port in use (``check_ports``) or an
    unusable token file raise ``CommandFailed`` before anything is written or started."""
    check_ports(port, sim_port)
    token = admin_token(workdir)
    backend_key = secrets.token_urlsafe(24)
    config_path = demo_files(workdir, port, sim_port, backend_key)
    sim_env = dict(os.environ, PYTHONUNBUFFERED="1")
    gw_env = dict(sim_env, **{_BACKEND_KEY_ENV: backend_key, _ADMIN_TOKEN_ENV: token})
    exe = [sys.executable, "-m", "sluicegate.cli.main"]
    stopping = False

    def _stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    sim = _start(
        "the simulator",
        [*exe, "simulate", "--config", str(workdir / "simulator.yaml"), "--port", str(sim_port)],
        sim_env,
        workdir / "simulator.log",
    )
    children = [sim]
    current = sim  # the child whose failure is being reported
    try:
        _wait_healthy(
            f"http://{_HOST}:{sim_port}/_sim/health", sim.proc, sim.what, stop=lambda: stopping
        )
        config = parse_config(yaml.safe_load(config_path.read_text()), str(config_path))
        admin = open_admin(config)
        try:
            key, created = demo_key(admin)
        finally:
            if admin.engine is not None:
                admin.engine.dispose()  # the gateway opens the database itself
        gw = current = _start(
            "the gateway",
            [*exe, "serve", "--config", str(config_path)],
            gw_env,
            workdir / "gateway.log",
        )
        children.append(gw)
        url = f"http://{_HOST}:{port}"
        _wait_healthy(f"{url}/healthz", gw.proc, gw.what, stop=lambda: stopping)
        print(
            examples(
                url,
                key,
                config=config_path,
                token=token,
                token_file=workdir / ADMIN_TOKEN_FILE,
                created=created,
            ),
            flush=True,
        )
        while not stopping:
            for child in children:
                if child.proc.poll() is not None:
                    current = child
                    raise RuntimeError(child.ended())
            time.sleep(0.2)
    except _StopRequested:
        pass
    except RuntimeError as exc:
        if stopping:  # the children got the terminal's Ctrl-C too
            return 0
        print(f"demo failed: {exc}", file=sys.stderr)
        tail = current.tail(hide=[backend_key])
        if tail:
            print(tail, file=sys.stderr)
        return 1
    finally:
        for child in children:
            if child.proc.poll() is None:
                child.proc.send_signal(signal.SIGTERM)
        for child in children:
            try:
                child.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.proc.kill()
        print("demo stopped", flush=True)
    return 0
