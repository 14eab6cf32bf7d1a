"""The performance targets sluicegate is held to, judged from one run's results.

Every check compares figures measured in the same run (ratios), never against numbers
from elsewhere. A check whose inputs were not measured (target not selected, failed, or
with too many errors) is reported as not judged (``passed: None``), never as passed. A
check that rests on a target whose probe raised a doubt says so beside its figure.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

SG = "sluicegate"
BARE = "bare"
CLUSTER = "sluicegate-cluster"
PER_CORE = "rps_per_core"
MEMORY_MIB = 120.0
#: A run whose errors exceed this share of its requests is not a valid measurement.
MAX_ERROR_SHARE = 0.001


def _check(
    cid: str, text: str, target: str, measured: str | None, passed: bool | None, on: tuple[str, ...]
) -> dict[str, Any]:
    return {
        "id": cid,
        "check": text,
        "target": target,
        "measured": "not measured" if measured is None else measured,
        "passed": passed,
        "targets": list(on),
    }


def compute_checks(data: dict[str, Any]) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = data.get("results", [])
    index = {(r["target"], r["kind"], r["concurrency"]): r for r in results}

    def value(target: str, kind: str, conns: int, field: str) -> float | None:
        entry = index.get((target, kind, conns))
        if entry is None or not entry.get("valid", False) or entry.get(field) is None:
            return None
        return float(entry[field])

    def ratio(cid: str, text: str, a: tuple[str, str], b: tuple[str, str], floor: float) -> None:
        x, y = value(a[0], a[1], 64, PER_CORE), value(b[0], b[1], 64, PER_CORE)
        if x is None or y is None or y == 0:
            checks.append(_check(cid, text, f"≥ {floor}×", None, None, (a[0], b[0])))
            return
        measured = f"{x:,.0f} vs {y:,.0f} req/s per core: ×{x / y:.2f}"
        checks.append(_check(cid, text, f"≥ {floor}×", measured, x / y >= floor, (a[0], b[0])))

    checks: list[dict[str, Any]] = []
    full = "sluicegate full policy"
    ratio("json_vs_bare", f"{full}, JSON, c=64, vs the bare Python proxy (per core)",
          (SG, "json"), (BARE, "json"), 0.5)  # fmt: skip
    ratio("json_vs_litellm", f"{full}, JSON, c=64, vs LiteLLM (per core)",
          (SG, "json"), ("litellm", "json"), 40)  # fmt: skip
    stream_text = f"{full}, streaming vs its own JSON, c=64 (per core)"
    alternated = _alternated_ratios(data, SG)
    if alternated:
        checks.append(_stream_check(stream_text, alternated, value, 0.9))
    else:
        ratio("stream_vs_json", stream_text, (SG, "stream"), (SG, "json"), 0.9)
    ratio("cluster_vs_embedded", "sluicegate cluster vs embedded, full policy, JSON, c=64 "
          "(per core)", (CLUSTER, "json"), (SG, "json"), 0.7)  # fmt: skip
    for kind in ("json", "stream"):
        for pct, limit in (("p50", 0.5), ("p99", 1.5)):
            v = value(SG, kind, 1, f"added_{pct}_ms")
            # The target is in absolute milliseconds, which move with the host's speed: the
            # bare proxy's figure beside it says how fast this host's hops are.
            bare = value(BARE, kind, 1, f"added_{pct}_ms")
            beside = "" if bare is None else f" (the bare proxy adds {bare:.3f})"
            checks.append(
                _check(
                    f"added_{pct}_{kind}",
                    f"{full}, {kind}, c=1: added latency {pct}",
                    f"≤ {limit:.1f} ms",
                    None if v is None else f"{v:.3f} ms{beside}",
                    None if v is None else v <= limit,
                    (SG,),
                )
            )
    for t in data.get("targets", []):
        if t["target"].startswith(SG):
            v = t.get("memory", {}).get("rss_mib_per_worker")
            checks.append(
                _check(
                    f"memory_{t['target']}",
                    f"{t['target']}: resident memory per worker after the runs",
                    f"< {MEMORY_MIB:.0f} MiB",
                    None if v is None else f"{v:.1f} MiB",
                    None if v is None else v < MEMORY_MIB,
                    (t["target"],),
                )
            )
    checks.extend(_soak_checks(data.get("soak")))
    warned = {t["target"] for t in data.get("targets", []) if t.get("probe", {}).get("warnings")}
    for check in checks:
        doubtful = [t for t in dict.fromkeys(check["targets"]) if t in warned]
        if doubtful and check["passed"] is not None:
            check["measured"] += f" (see the warnings about {', '.join(doubtful)})"
    return checks


def _alternated_ratios(data: dict[str, Any], target: str) -> list[float]:
    """Stream/JSON per core of each alternated pair of ``target`` (``Bench.alternate``)
    whose runs both count (no errors above 0.1 %, CPU measured); [] when none was run."""
    ratios: list[float] = []
    for t in data.get("targets", []):
        if t["target"] != target:
            continue
        for pair in t.get("alternated", {}).get("pairs", []):
            runs = [pair.get("json", {}), pair.get("stream", {})]
            if all(
                r.get("rps_per_core")
                and r.get("error_count", 0) <= MAX_ERROR_SHARE * r.get("requests", 0)
                for r in runs
            ):
                ratios.append(runs[1]["rps_per_core"] / runs[0]["rps_per_core"])
    return ratios


def _stream_check(
    text: str, ratios: list[float], value: Callable[[str, str, int, str], float | None],
    floor: float,
) -> dict[str, Any]:  # fmt: skip
    """Judged on the median of the alternated pairs; the best rounds' ratio is shown too."""
    middle = statistics.median(ratios)
    measured = (
        f"median ×{middle:.2f} of {len(ratios)} alternated pairs "
        f"(×{min(ratios):.2f}–×{max(ratios):.2f})"
    )
    x, y = value(SG, "stream", 64, PER_CORE), value(SG, "json", 64, PER_CORE)
    if x is not None and y:
        measured += f"; best rounds {x:,.0f} vs {y:,.0f} req/s per core: ×{x / y:.2f}"
    return _check("stream_vs_json", text, f"≥ {floor}×", measured, middle >= floor, (SG,))


def _soak_checks(soak: dict[str, Any] | None) -> list[dict[str, Any]]:
    text = "resident memory flat over the soak and under 120 MiB per worker"
    if not soak:
        hint = "no soak in this results file (bash bench/run.sh --soak 600)"
        return [_check("soak_sluicegate", f"sluicegate: {text}", "growth ≤ 5 MiB", hint, None,
                       (SG,))]  # fmt: skip
    out = []
    for rec in soak.get("targets", []):
        verdict = rec.get("verdict", {})
        growth = verdict.get("growth_mib")
        peak = max((s["rss_mib"] for s in rec.get("samples", [])), default=None)
        measured = (
            f"{verdict.get('rss_mib_minute_2')} → {verdict.get('rss_mib_last_minute')} MiB "
            f"(growth {growth} MiB, slope {verdict.get('slope_mib_per_hour')} MiB/h, "
            f"peak {peak} MiB, {rec['seconds']} s)"
            if growth is not None
            else verdict.get("reason", "not judged")
        )
        workers = max(1, rec.get("memory", {}).get("workers", 1))
        flat = verdict.get("flat")
        under = peak is not None and peak < MEMORY_MIB * workers
        passed = None if flat is None else bool(flat and under)
        out.append(_check(f"soak_{rec['target']}", f"{rec['target']}: {text}", "growth ≤ 5 MiB",
                          measured, passed, (rec["target"],)))  # fmt: skip
    for name, reason in soak.get("failures", {}).items():
        out.append(_check(f"soak_{name}", f"{name}: soak", "runs to the end",
                          f"failed: {reason.splitlines()[0][:200]}", False, (name,)))  # fmt: skip
    return out
