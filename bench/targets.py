"""The things the benchmark measures, and how each one is configured and started.

Every target is started the same way: pinned to the proxy CPU, its own process group, its
output in ``bench/out/<name>.log``, its configuration written under ``bench/out/<name>/``
from scratch, pointed at the one fake upstream. A target answers the same request shapes
its real clients send: Azure deployment paths with ``api-key`` for sluicegate, nginx and
the bare proxy; LiteLLM's own OpenAI path with its master key.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from procs import BenchError, Managed, start, wait_for_port

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
AZURE_PATH = "/openai/deployments/gpt-4o-mini/chat/completions?api-version=2024-10-21"
UPSTREAM_KEY = "bench-upstream-key"
LITELLM_MASTER_KEY = "sk-bench-master-key"
#: Fixed so that keys created by one ``keys create`` and checked by the server agree.
#: Far above anything the benchmark sends: the limiter runs on every request, never denies.
LIMIT = 1_000_000_000
#: sluicegate reports the limit it applied (the upstream sends no such header): the probe
#: checks it to prove the limiter ran.
LIMIT_HEADER = ("x-ratelimit-limit-tokens", str(LIMIT))
KEY_SECRET = "bench-key-secret-not-for-production-0123456789"
#: The PostgreSQL server of the cluster targets (trust auth); a database name completes it.
PG_SERVER = "postgresql://postgres@127.0.0.1:5432/"


@dataclass
class Context:
    """What a launcher needs: where to write, which CPU, which ports."""

    out: Path
    pid_file: Path
    proxy_cpu: int | None
    upstream_port: int
    run_id: str
    #: A command the target's own process runs under (``instructions.py``: callgrind).
    wrap: tuple[str, ...] = ()

    @property
    def upstream_url(self) -> str:
        return f"http://127.0.0.1:{self.upstream_port}"

    def workdir(self, name: str) -> Path:
        path = self.out / name
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return path

    def start(self, name: str, argv: list[str], **kw: Any) -> Managed:
        return start(
            name,
            [*self.wrap, *argv],
            log_dir=self.out,
            pid_file=self.pid_file,
            cpu=self.proxy_cpu,
            **kw,
        )


@dataclass
class Launched:
    """A running target: its process, the headers its clients send, and how to clean up."""

    proc: Managed
    headers: dict[str, str]
    cleanup: list[Callable[[], None]] = field(default_factory=list)
    #: Commands that read state after the process stopped (sluicegate's ledger), by name.
    after_stop: dict[str, Callable[[], dict[str, Any]]] = field(default_factory=dict)
    #: Number of worker processes that serve requests (memory is reported per worker).
    workers: int = 1


@dataclass(frozen=True)
class Target:
    name: str
    label: str
    port_offset: int
    path: str
    launch: Callable[[Context, int], Launched] | None
    #: A request without credentials must be refused with this status (None: no auth).
    auth_status: int | None = None
    needs: tuple[str, ...] = ()
    ready_timeout: float = 30.0
    #: A header (name, value) the JSON answer must carry: proof that the limiter ran.
    expect_header: tuple[str, str] | None = None
    #: Where the target serves Prometheus metrics, checked once before the load.
    metrics_path: str | None = None
    #: Also measure JSON and streaming at 64 connections turn about (``Bench.alternate``):
    #: the target whose stream/JSON ratio is a check.
    alternate: bool = False


# ---------------------------------------------------------------- nginx

NGINX_CONF = """\
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir}/tmp-body;
    proxy_temp_path {dir}/tmp-proxy;
    fastcgi_temp_path {dir}/tmp-fastcgi;
    uwsgi_temp_path {dir}/tmp-uwsgi;
    scgi_temp_path {dir}/tmp-scgi;
    keepalive_requests 1000000;
    keepalive_timeout 75s;
    upstream fake_azure {{
        server {upstream};
        keepalive 128;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=1024;
        location / {{
            proxy_pass http://fake_azure;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }}
    }}
}}
"""


def launch_nginx(ctx: Context, port: int) -> Launched:
    work = ctx.workdir("nginx")
    conf = work / "nginx.conf"
    upstream = ctx.upstream_url.removeprefix("http://")
    conf.write_text(NGINX_CONF.format(dir=work, upstream=upstream, port=port))
    argv = [
        "nginx",
        "-p",
        str(work),
        "-c",
        str(conf),
        "-e",
        str(work / "error.log"),
        "-g",
        "daemon off;",
    ]
    return Launched(ctx.start("nginx", argv), {"api-key": "bench"}, workers=1)


# ---------------------------------------------------------------- bare Python proxy


def launch_bare(ctx: Context, port: int) -> Launched:
    argv = [
        str(REPO / ".venv/bin/python"),
        str(BENCH / "bare_proxy.py"),
        "--port",
        str(port),
        "--upstream",
        ctx.upstream_url,
    ]
    return Launched(ctx.start("bare", argv), {"api-key": "bench"})


# ---------------------------------------------------------------- LiteLLM


def launch_litellm(ctx: Context, port: int) -> Launched:
    work = ctx.workdir("litellm")
    config = {
        "model_list": [
            {
                "model_name": "gpt-4o-mini",
                "litellm_params": {
                    "model": "azure/gpt-4o-mini",
                    "api_base": ctx.upstream_url,
                    "api_key": UPSTREAM_KEY,
                    "api_version": "2024-10-21",
                },
            }
        ],
        "general_settings": {"master_key": LITELLM_MASTER_KEY},
        "litellm_settings": {"telemetry": False},
    }
    (work / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    argv = [
        str(BENCH / ".venv-litellm/bin/litellm"),
        "--config",
        str(work / "config.yaml"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--num_workers",
        "1",
    ]
    env = {
        # No access log per request (uvicorn at ERROR), as sluicegate and nginx run here.
        "LITELLM_LOG": "ERROR",
        # The model price map is fetched from GitHub at start unless told to use its copy.
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "DISABLE_SCHEMA_UPDATE": "True",
    }
    proc = ctx.start("litellm", argv, env=env, cwd=work)
    return Launched(proc, {"Authorization": f"Bearer {LITELLM_MASTER_KEY}"})


# ---------------------------------------------------------------- sluicegate

SLUICEGATE = REPO / ".venv/bin/sluicegate"
SG_ENV = {"BENCH_UPSTREAM_KEY": UPSTREAM_KEY, "SLUICEGATE_KEY_SECRET": KEY_SECRET}


def sluicegate_config(
    ctx: Context, port: int, *, mode: str, limits: bool, db: str
) -> dict[str, Any]:
    product: dict[str, Any] = {"name": "bench", "deployments": ["gpt-4o-mini"]}
    if limits:
        product["limits"] = {"tokens_per_minute": LIMIT, "requests_per_minute": LIMIT}
    config: dict[str, Any] = {
        "mode": mode,
        "listen": {"host": "127.0.0.1", "port": port, "graceful_shutdown_seconds": 5},
        "storage": {"url": db, "spill_dir": "spill"},
        "metrics": {"enabled": True},
        "logging": {"level": "warning", "access_log": False},
        "backends": [
            {
                "name": "upstream",
                "url": ctx.upstream_url,
                "auth": {"type": "api-key", "key_env": "BENCH_UPSTREAM_KEY"},
            }
        ],
        "deployments": [{"name": "gpt-4o-mini", "backend": "upstream", "model": "gpt-4o-mini"}],
        "products": [product],
    }
    if mode == "cluster":
        config["redis"] = {"url": "redis://127.0.0.1:6379/0", "prefix": f"sgbench{ctx.run_id}"}
    return config


def _sg(args: list[str], work: Path, timeout: float = 120, src: Path | None = None) -> str:
    """Run the CLI; ``src``: with another checkout's code, as the target it prepares (its
    migrations, not this checkout's, must make the database: a newer schema stops the older
    code's ``serve``)."""
    extra = {} if src is None else {"PYTHONPATH": str(src)}
    done = subprocess.run(
        [str(SLUICEGATE), *args],
        cwd=work,
        env={**os.environ, **SG_ENV, **extra},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if done.returncode != 0:
        raise BenchError(
            f"sluicegate {' '.join(args[:2])} failed ({done.returncode}):\n"
            f"{done.stdout}{done.stderr}"
        )
    return done.stdout


def _launch_sluicegate(
    ctx: Context, port: int, name: str, *, mode: str, limits: bool, src: Path | None = None
) -> Launched:
    """Start sluicegate with the benchmark's configuration; ``src`` runs another checkout's
    code (its ``src`` directory put first on the import path) in this virtualenv."""
    if not SLUICEGATE.exists():
        raise BenchError(f"{SLUICEGATE} not found: run `make install` first")
    work = ctx.workdir(name)
    cleanup: list[Callable[[], None]] = []
    if mode == "cluster":
        # One database per target: tools that start several targets at once (pairs.py,
        # backlog.py) run both cluster targets side by side.
        db_name = cluster_database(ctx, name)
        cleanup.append(lambda: _cluster_cleanup(db_name, f"sgbench{ctx.run_id}"))
        _create_database(db_name)
        db = PG_SERVER + db_name
    else:
        db = "sqlite:///ledger.db"
    config = work / "gateway.yaml"
    config.write_text(
        yaml.safe_dump(
            sluicegate_config(ctx, port, mode=mode, limits=limits, db=db), sort_keys=False
        )
    )
    try:
        created = json.loads(
            _sg(
                [
                    "keys",
                    "create",
                    "--config",
                    str(config),
                    "--product",
                    "bench",
                    "--owner",
                    "bench",
                    "--name",
                    "bench",
                    "--json",
                ],
                work,
                src=src,
            )
        )
        env = SG_ENV if src is None else {**SG_ENV, "PYTHONPATH": str(src)}
        proc = ctx.start(
            name, [str(SLUICEGATE), "serve", "--config", str(config)], env=env, cwd=work
        )
    except BaseException:
        for fn in cleanup:
            fn()
        raise

    def ledger() -> dict[str, Any]:
        out = _sg(
            [
                "usage",
                "report",
                "--config",
                str(config),
                "--by",
                "subscription",
                "--format",
                "json",
            ],
            work,
            src=src,
        )
        return {"usage_report": json.loads(out)}

    headers = {"api-key": str(created["primary_key"])}
    return Launched(proc, headers, cleanup, after_stop={"ledger": ledger})


def cluster_database(ctx: Context, name: str) -> str:
    """The PostgreSQL database of cluster target ``name`` in this run (on ``PG_SERVER``)."""
    return f"sluicegate_bench_{ctx.run_id}_{name}".replace("-", "_").replace("@", "_")


def _create_database(name: str) -> None:
    import psycopg

    try:
        with psycopg.connect(PG_SERVER + "postgres", autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
            conn.execute(f'CREATE DATABASE "{name}"')
    except psycopg.Error as exc:
        raise BenchError(
            f"cluster mode needs PostgreSQL at 127.0.0.1:5432 (user postgres, trust auth): {exc}"
        ) from exc


def _cluster_cleanup(db_name: str, prefix: str) -> None:
    """Drop the throwaway database and delete this run's Redis keys."""
    import psycopg
    import redis

    try:
        with psycopg.connect(PG_SERVER + "postgres", autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)')
    except psycopg.Error as exc:
        print(f"warning: could not drop database {db_name}: {exc}")
    try:
        client = redis.Redis.from_url("redis://127.0.0.1:6379/0")
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()
    except redis.RedisError as exc:
        print(f"warning: could not delete Redis keys {prefix}*: {exc}")


def check_cluster_services() -> None:
    import psycopg
    import redis

    try:
        redis.Redis.from_url("redis://127.0.0.1:6379/0", socket_timeout=3).ping()
    except redis.RedisError as exc:
        raise BenchError(f"cluster mode needs Redis at 127.0.0.1:6379: {exc}") from exc
    try:
        psycopg.connect(PG_SERVER + "postgres", connect_timeout=5).close()
    except psycopg.Error as exc:
        raise BenchError(f"cluster mode needs PostgreSQL at 127.0.0.1:5432: {exc}") from exc


def _sg_target(
    name: str,
    label: str,
    *,
    mode: str,
    limits: bool,
    alternate: bool = False,
    src: Path | None = None,
) -> Target:
    def launch(ctx: Context, port: int) -> Launched:
        return _launch_sluicegate(ctx, port, name, mode=mode, limits=limits, src=src)

    return Target(
        name,
        label,
        4,
        AZURE_PATH,
        launch,
        auth_status=401,
        needs=("redis", "postgresql") if mode == "cluster" else (),
        expect_header=LIMIT_HEADER if limits else None,
        metrics_path="/metrics",
        alternate=alternate,
    )


TARGETS: tuple[Target, ...] = (
    Target("baseline", "fake upstream alone (baseline)", 0, AZURE_PATH, None),
    Target("nginx", "nginx reverse proxy", 1, AZURE_PATH, launch_nginx, needs=("nginx",)),
    Target("bare", "bare Python proxy", 2, AZURE_PATH, launch_bare),
    _sg_target(
        "sluicegate",
        "sluicegate embedded, full policy",
        mode="embedded",
        limits=True,
        alternate=True,
    ),
    _sg_target(
        "sluicegate-nolimits", "sluicegate embedded, limits off", mode="embedded", limits=False
    ),
    _sg_target(
        "sluicegate-cluster",
        "sluicegate cluster (Redis + PostgreSQL), full policy",
        mode="cluster",
        limits=True,
    ),
    _sg_target(
        "sluicegate-cluster-nolimits",
        "sluicegate cluster (Redis + PostgreSQL), limits off",
        mode="cluster",
        limits=False,
    ),
    Target(
        "litellm",
        "LiteLLM proxy 1.110.2, no database",
        3,
        "/v1/chat/completions",
        launch_litellm,
        auth_status=401,
        needs=("litellm",),
        ready_timeout=120.0,
    ),
)
BY_NAME = {t.name: t for t in TARGETS}


def sluicegate_from(src: Path, name: str) -> Target:
    """The full-policy embedded target running the code in ``src`` (another checkout's
    ``src`` directory): ``pairs.py --against`` measures a change against its parent."""
    return _sg_target(name, f"sluicegate from {src}", mode="embedded", limits=True, src=src)


def wait_ready(launched: Launched, port: int, timeout: float) -> None:
    wait_for_port(launched.proc, port, timeout)
