"""``bench/results.json`` → the summary, the pass/fail checks, and ``BENCHMARKS.md``.

``write_results`` turns the raw runs into one result per target and scenario (the best of
the rounds: the highest throughput at 64 connections, the lowest median at 1), with the
ratios against the baseline and the bare Python proxy of the same run, and the checks.
``render`` writes the Markdown from the JSON alone, so ``python bench/report.py`` redraws
the report from a saved run. Run it: ``.venv/bin/python bench/report.py [results] [md]``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from checks import MAX_ERROR_SHARE, compute_checks
from render import render_markdown

#: CPU 0 (load generator + upstream) at or above this many cores means the load side, not
#: the proxy, may have limited throughput.
LOAD_SIDE_SATURATED = 0.9


def _best(runs: list[dict[str, Any]], concurrency: int) -> dict[str, Any]:
    if concurrency == 1:
        return min(runs, key=lambda r: r["latency_ms"]["p50"])
    return max(runs, key=lambda r: r["rps"])


def summarize(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per target, kind and concurrency, with ratios filled in."""
    results: list[dict[str, Any]] = []
    for rec in records:
        groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
        for run in rec["runs"]:
            groups.setdefault((run["kind"], run["concurrency"]), []).append(run)
        memory = rec.get("memory", {})
        for (kind, conns), runs in groups.items():
            best = _best(runs, conns)
            errors = best["error_count"]
            load_side = best["loadgen_cores"] + best["upstream_cores"]
            results.append(
                {
                    "target": rec["target"],
                    "label": rec["label"],
                    "kind": kind,
                    "concurrency": conns,
                    "rps": round(best["rps"], 1),
                    "rps_per_core": _r(best["rps_per_core"], 1),
                    "proxy_cores": round(best["proxy_cores"], 3),
                    "load_side_cores": round(load_side, 3),
                    "load_side_saturated": target_is_proxy(rec)
                    and load_side >= LOAD_SIDE_SATURATED,
                    "p50_ms": round(best["latency_ms"]["p50"], 3),
                    "p99_ms": round(best["latency_ms"]["p99"], 3),
                    "added_p50_ms": None,
                    "added_p99_ms": None,
                    "rss_mib": memory.get("rss_mib"),
                    "rss_mib_per_worker": memory.get("rss_mib_per_worker"),
                    "ratio_vs_baseline": None,
                    "ratio_vs_bare": None,
                    "ratio_vs_bare_per_core": None,
                    "errors": errors,
                    "valid": best["requests"] > 0 and errors <= MAX_ERROR_SHARE * best["requests"],
                    "best_round": best["round"],
                    "rounds": [
                        {
                            k: r[k]
                            for k in (
                                "round",
                                "rps",
                                "rps_per_core",
                                "proxy_cores",
                                "latency_ms",
                                "error_count",
                                "upstream_requests",
                            )
                        }
                        for r in runs
                    ],
                }
            )
    index = {(r["target"], r["kind"], r["concurrency"]): r for r in results}
    for r in results:
        base = index.get(("baseline", r["kind"], r["concurrency"]))
        bare = index.get(("bare", r["kind"], r["concurrency"]))
        if base is not None:
            r["ratio_vs_baseline"] = _ratio(r["rps"], base["rps"])
            r["added_p50_ms"] = round(r["p50_ms"] - base["p50_ms"], 3)
            r["added_p99_ms"] = round(r["p99_ms"] - base["p99_ms"], 3)
        if bare is not None:
            r["ratio_vs_bare"] = _ratio(r["rps"], bare["rps"])
            r["ratio_vs_bare_per_core"] = _ratio(r["rps_per_core"], bare["rps_per_core"])
    return results


def target_is_proxy(rec: dict[str, Any]) -> bool:
    return bool(rec["target"] != "baseline")


def _r(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else round(a / b, 3)


def load(path: Path) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads(path.read_text())
        return data
    except (OSError, ValueError):
        return {}


def _save(path: Path, data: dict[str, Any]) -> None:
    data["checks"] = compute_checks(data)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)


def write_results(
    path: Path, meta: dict[str, Any], records: list[dict[str, Any]], failures: dict[str, str]
) -> None:
    """Replace the benchmark part of ``path``; an earlier soak result is kept."""
    old = load(path)
    targets = [{k: v for k, v in rec.items() if k != "runs"} for rec in records]
    data = {
        "schema": 1,
        "meta": meta,
        "results": summarize(records),
        "targets": targets,
        "failures": failures,
        "raw_runs": {rec["target"]: rec["runs"] for rec in records},
    }
    if "soak" in old:
        data["soak"] = old["soak"]
    _save(path, data)


def merge_soak(path: Path, soak: dict[str, Any]) -> None:
    """Put a soak result into ``path``, keeping the benchmark results already there."""
    data = load(path) or {"schema": 1, "meta": soak["meta"], "results": [], "targets": []}
    data["soak"] = soak
    _save(path, data)


def render(results: Path, markdown: Path) -> None:
    data = load(results)
    data["checks"] = compute_checks(data)
    markdown.write_text(render_markdown(data))


if __name__ == "__main__":
    here = Path(__file__).resolve().parent
    res = Path(sys.argv[1]) if len(sys.argv) > 1 else here / "results.json"
    md = Path(sys.argv[2]) if len(sys.argv) > 2 else here.parent / "BENCHMARKS.md"
    render(res, md)
    print(f"wrote {md}")
