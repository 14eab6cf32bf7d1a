"""The configurations the harness writes are ones the real programs accept."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

import targets
from sluicegate.config.loader import parse_config
from sluicegate.limits.policy import LimitPolicy


def _ctx(tmp_path: Path) -> targets.Context:
    return targets.Context(tmp_path, tmp_path / "pids", None, 9001, "t")


@pytest.mark.parametrize(
    ("mode", "limits", "db"),
    [
        ("embedded", True, "sqlite:///ledger.db"),
        ("embedded", False, "sqlite:///ledger.db"),
        ("cluster", True, "postgresql://postgres@127.0.0.1:5432/x"),
    ],
)
def test_sluicegate_config_is_valid(tmp_path: Path, mode: str, limits: bool, db: str) -> None:
    raw = targets.sluicegate_config(_ctx(tmp_path), 9005, mode=mode, limits=limits, db=db)
    config = parse_config(raw)
    assert config.mode == mode
    assert config.metrics.enabled
    assert not config.logging.access_log
    product = config.products[0]
    if limits:
        policies = product.limits if isinstance(product.limits, list) else [product.limits]
        assert len(policies) == 1
        assert isinstance(policies[0], LimitPolicy)
        assert policies[0].tokens_per_minute == policies[0].requests_per_minute == targets.LIMIT
    else:
        assert product.limits is None
    assert (config.redis is not None) == (mode == "cluster")


def test_nginx_config_is_accepted_by_nginx(tmp_path: Path) -> None:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(nginx).exists():
        pytest.fail("nginx is not installed: apt-get install nginx (bench/run.sh does it)")
    work = tmp_path / "nginx"
    work.mkdir()
    conf = work / "nginx.conf"
    conf.write_text(targets.NGINX_CONF.format(dir=work, upstream="127.0.0.1:9001", port=9002))
    done = subprocess.run(
        [nginx, "-t", "-p", str(work), "-c", str(conf), "-e", str(work / "error.log")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr


def test_every_target_has_a_distinct_port_except_sluicegate_variants() -> None:
    offsets = {t.name: t.port_offset for t in targets.TARGETS}
    assert len({o for n, o in offsets.items() if not n.startswith("sluicegate")}) == 4
    assert {o for n, o in offsets.items() if n.startswith("sluicegate")} == {4}
