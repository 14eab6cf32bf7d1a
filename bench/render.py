"""``BENCHMARKS.md`` from the results JSON: the tables, the checks, the method and caveats."""

from __future__ import annotations

from pathlib import Path
from typing import Any

ORDER = (
    "baseline",
    "nginx",
    "bare",
    "sluicegate",
    "sluicegate-nolimits",
    "sluicegate-cluster",
    "sluicegate-cluster-nolimits",
    "litellm",
)


def _n(v: float | None, fmt: str = "{:,.0f}") -> str:
    return "–" if v is None else fmt.format(v)


def _x(v: float | None) -> str:
    if v is None:
        return "–"
    return f"×{v:.4f}" if v < 0.01 else f"×{v:.2f}" if v < 10 else f"×{v:,.0f}"


def _verdict(passed: bool | None) -> str:
    return {True: "**pass**", False: "**FAIL**", None: "not judged"}[passed]


def _sorted(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    def key(r: dict[str, Any]) -> tuple[int, str]:
        return (ORDER.index(r["target"]) if r["target"] in ORDER else 99, r["target"])

    return sorted(results, key=key)


def _targets(results: list[dict[str, Any]]) -> list[tuple[str, str]]:
    seen: dict[str, str] = {}
    for r in _sorted(results):
        seen.setdefault(r["target"], r["label"])
    return list(seen.items())


#: Slowest over fastest speed probe beyond which a run is called indicative: the alternated
#: pairs absorb a drift this size, the rounds (~20 s apart per kind) do not.
UNSTEADY = 1.3

#: Highest over lowest rate of one kind over the alternated pairs beyond which a run is
#: called indicative. The steadiest runs on record spread by ×1.07–×1.19 (2026-12-06 14:15
#: and 16:34); most others by ×1.3–×1.8, with the probe steady in some of them.
PAIRS_UNSTEADY = 1.2


def speed_probes(data: dict[str, Any]) -> list[tuple[str, float]]:
    """(where, milliseconds) of every speed probe of the run, in the order taken: at the
    start, before each target, at the end (``machine.speed_probe``)."""
    meta = data.get("meta", {}).get("speed_probe_ms") or {}
    found: list[tuple[str, float | None]] = [("start", meta.get("start"))]
    found += [(t["target"], t.get("speed_probe_ms")) for t in data.get("targets", [])]
    found.append(("end", meta.get("end")))
    return [(where, ms) for where, ms in found if isinstance(ms, (int, float)) and ms > 0]


def steal_shares(data: dict[str, Any]) -> list[tuple[str, float]]:
    """(target, share) of the CPU time the hypervisor stole during each target's
    measurement (``machine.steal_share``), for the targets that have it."""
    found = [(t["target"], t.get("steal_share")) for t in data.get("targets", [])]
    return [(name, share) for name, share in found if isinstance(share, (int, float))]


def _steal_line(stolen: list[tuple[str, float]]) -> str:
    shown = ", ".join(f"{name} {100 * share:.1f} %" for name, share in stolen)
    return (
        "CPU time stolen by the hypervisor while each target was measured (`/proc/stat`, "
        f"share of all CPU time; other guests running on this VM's cores): {shown}."
    )


def pair_spreads(data: dict[str, Any]) -> list[tuple[str, str, float, float]]:
    """(target, kind, lowest, highest) requests per second per core over the alternated
    pairs (``Bench.alternate``) of each target that ran them: the same load, 3 s at a time,
    over about a minute, so the spread is the host's unsteadiness while the streams check
    was measured (or the target's background work: for sluicegate the ledger writer and the
    rollup job, which a 3 s run catches or not). The speed probe sees the host only
    between targets, and the hypervisor's stolen time (``steal_shares``) stayed under
    0.5 % in runs whose pairs moved by ×1.4 (bench/analysis.md), so neither stands in for
    this."""
    found: list[tuple[str, str, float, float]] = []
    for t in data.get("targets", []):
        pairs = t.get("alternated", {}).get("pairs", [])
        for kind in ("json", "stream"):
            rates = [p.get(kind, {}).get("rps_per_core") for p in pairs]
            counted = [r for r in rates if isinstance(r, (int, float)) and r > 0]
            if len(counted) >= 2:
                found.append((t["target"], kind, min(counted), max(counted)))
    return found


def _spread_line(spreads: list[tuple[str, str, float, float]]) -> str:
    shown = "; ".join(
        f"{target} {kind} {low:,.0f}–{high:,.0f} (×{high / low:.2f})"
        for target, kind, low, high in spreads
    )
    return (
        "Requests per second per core over the alternated pairs (the same load each time, so "
        "what moves between them is the host, or the target's own background work; above "
        f"×{PAIRS_UNSTEADY} the run is indicative): {shown}."
    )


def _unsteady(
    probes: list[tuple[str, float]], spreads: list[tuple[str, str, float, float]]
) -> bool:
    """The probe moved by more than ``UNSTEADY``, or one kind's rate between its own pairs
    by more than ``PAIRS_UNSTEADY``."""
    times = [ms for _, ms in probes]
    if len(times) >= 2 and max(times) / min(times) > UNSTEADY:
        return True
    return any(high / low > PAIRS_UNSTEADY for _, _, low, high in spreads)


def _speed_line(probes: list[tuple[str, float]]) -> str:
    times = [ms for _, ms in probes]
    shown = ", ".join(f"{where} {ms:g}" for where, ms in probes)
    return (
        "Host speed (`machine.speed_probe`: a fixed piece of pure-Python work on the proxy's "
        f"CPU while idle, best of 5, in ms; lower is faster): {shown}. Slowest ×"
        f"{max(times) / min(times):.2f} of fastest."
    )


def render_markdown(data: dict[str, Any]) -> str:
    meta = data.get("meta", {})
    results: list[dict[str, Any]] = data.get("results", [])
    index = {(r["target"], r["kind"], r["concurrency"]): r for r in results}
    out: list[str] = [
        "# Benchmarks",
        "",
        "_Generated by `bench/run.sh` from `bench/results.json`; do not edit by hand "
        "(`.venv/bin/python bench/report.py` redraws it)._",
        "",
    ]
    if meta:
        mode = "quick" if meta.get("quick") else "full"
        load1 = meta.get("loadavg_at_start", ["?"])[0]
        out += [
            f"Run {meta.get('started', '?')} ({mode}: {meta.get('duration_s')} s per run, "
            f"{meta.get('warmup_s')} s warm-up per kind, best of {meta.get('rounds')} rounds), "
            f"load average at start {load1}. Reproduce with `{meta.get('command')}` "
            "(or `make bench`).",
            "",
        ]
        if meta.get("stream_writes", "event") != "event":
            out += [
                "> **Diagnostic run**: the fake upstream wrote each stream in one write "
                "(`--stream-writes once`), not one write per event as Azure does.",
                "",
            ]
        probes = speed_probes(data)
        if probes:
            out += [_speed_line(probes), ""]
        stolen = steal_shares(data)
        if stolen:
            out += [_steal_line(stolen), ""]
        spreads = pair_spreads(data)
        if spreads:
            out += [_spread_line(spreads), ""]
        unsteady = _unsteady(probes, spreads)
        if mode == "quick" or (isinstance(load1, (int, float)) and load1 > 0.5) or unsteady:
            why = (
                "a `--quick` one"
                if mode == "quick"
                else "on a host whose speed moved during it"
                if unsteady
                else "on a busy machine"
            )
            out += [
                f"> **Indicative only**: this run was {why}; figures from a full run on a "
                "quiet, steady machine are the ones to quote.",
                "",
            ]

    checks: list[dict[str, Any]] = data.get("checks", [])
    if checks:
        out += ["## Targets", "", "| check | target | measured | verdict |", "|---|---|---|---|"]
        out += [
            f"| {c['check']} | {c['target']} | {c['measured']} | {_verdict(c['passed'])} |"
            for c in checks
        ]
        out.append("")

    if results:
        out += [
            "## Throughput at 64 connections",
            "",
            "Requests per second (raw and per core of the proxy's own CPU use), latency of the "
            "whole response, and ratios against the fake upstream alone and against the bare "
            "Python proxy measured in the same run (× per core for the bare-proxy ratio).",
            "",
            "| target | kind | req/s | req/s per core | proxy cores | p50 ms | p99 ms "
            "| × baseline | × bare (per core) |",
            "|---|---|--:|--:|--:|--:|--:|--:|--:|",
        ]
        for name, label in _targets(results):
            for kind in ("json", "stream"):
                r = index.get((name, kind, 64))
                if r is None:
                    continue
                mark = "" if r["valid"] else f" ⚠ {r['errors']} errors"
                mark += "" if r["rps"] else " ⚠ no request completed"
                mark += " †" if r["load_side_saturated"] else ""
                out.append(
                    f"| {label} | {kind} | {_n(r['rps'])}{mark} | {_n(r['rps_per_core'])} "
                    f"| {_n(r['proxy_cores'], '{:.2f}')} | {_n(r['p50_ms'], '{:.2f}')} "
                    f"| {_n(r['p99_ms'], '{:.2f}')} | {_x(r['ratio_vs_baseline'])} "
                    f"| {_x(None if name == 'baseline' else r['ratio_vs_bare_per_core'])} |"
                )
        out += [
            "",
            "† the load side (wrk and the upstream, sharing CPU 0) used ≥ 0.9 of its core: raw "
            "req/s may be capped by the load side; the per-core figure still holds.",
            "",
            "## Added latency at 1 connection",
            "",
            "Median and 99th percentile of the whole response (a stream: until `data: [DONE]`), "
            "and what the proxy adds over the fake upstream alone in the same run.",
            "",
            "| target | kind | p50 ms | p99 ms | added p50 ms | added p99 ms | req/s |",
            "|---|---|--:|--:|--:|--:|--:|",
        ]
        for name, label in _targets(results):
            for kind in ("json", "stream"):
                r = index.get((name, kind, 1))
                if r is None:
                    continue
                mark = "" if r["valid"] else f" ⚠ {r['errors']} errors"
                out.append(
                    f"| {label} | {kind} | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} "
                    f"| {_n(r['added_p50_ms'], '{:+.3f}')} | {_n(r['added_p99_ms'], '{:+.3f}')} "
                    f"| {_n(r['rps'])}{mark} |"
                )
        out.append("")

    warnings = [
        (t["label"], w)
        for t in data.get("targets", [])
        for w in t.get("probe", {}).get("warnings", [])
    ]
    if warnings:
        out += ["## Warnings", ""]
        out += [f"- **{label}**: {w}" for label, w in warnings]
        out.append("")
    out += _probes(data)
    out += _memory(data)
    out += _soak(data.get("soak"))
    out += _analysis()
    failures: dict[str, str] = data.get("failures", {})
    if failures:
        out += ["## Targets that could not be measured", ""]
        out += [f"- **{name}**: {reason.splitlines()[0]}" for name, reason in failures.items()]
        out.append("")
    out += _machine(meta)
    out.append(METHOD)
    return "\n".join(out) + "\n"


#: Hand-written analysis of the latest full run (profiles, where the time goes, what would
#: close the gaps); included as it is, since no measurement can write it.
ANALYSIS = Path(__file__).resolve().parent / "analysis.md"


def _analysis() -> list[str]:
    if not ANALYSIS.exists():
        return []
    return [ANALYSIS.read_text(encoding="utf-8").rstrip(), ""]


PATH_SHAPES = {
    "azure": "`/openai/deployments/{d}/chat/completions?api-version=…`",
    "azure-v1": "`/openai/v1/chat/completions`",
    "openai-v1": "`/v1/chat/completions`",
    "openai": "`/chat/completions`",
}


def _probes(data: dict[str, Any]) -> list[str]:
    targets = [t for t in data.get("targets", []) if t.get("probe")]
    if not targets:
        return []
    out = [
        "## What each target did before the load",
        "",
        "| target | path it called upstream | stream events relayed | without credentials "
        "| x-ratelimit-limit-tokens |",
        "|---|---|--:|--:|---|",
    ]
    for t in targets:
        p = t["probe"]
        paths = ", ".join(PATH_SHAPES.get(k, k) for k in p.get("upstream_paths", {})) or "–"
        out.append(
            f"| {t['label']} | {paths} | {p.get('stream_events', '–')} "
            f"| {p.get('unauthenticated_status', '–')} | {p.get('limiter_header') or '–'} |"
        )
    return [*out, ""]


def _memory(data: dict[str, Any]) -> list[str]:
    targets = [t for t in data.get("targets", []) if t.get("memory")]
    if not targets:
        return []
    out = [
        "## Memory",
        "",
        "Resident memory (VmRSS summed over the target's processes) after all its runs, its "
        "peak (VmHWM), and at start.",
        "",
        "| target | RSS after runs MiB | per worker MiB | peak MiB | at start MiB | processes |",
        "|---|--:|--:|--:|--:|--:|",
    ]
    for t in sorted(
        targets, key=lambda t: ORDER.index(t["target"]) if t["target"] in ORDER else 99
    ):
        m = t["memory"]
        out.append(
            f"| {t['label']} | {m['rss_mib']:.1f} | {m['rss_mib_per_worker']:.1f} "
            f"| {m['hwm_mib']:.1f} | {_n(t.get('rss_mib_start'), '{:.1f}')} | {m['processes']} |"
        )
    ledgers = [t for t in targets if "ledger" in t]
    if ledgers:
        out += [
            "",
            "Ledger completeness (sluicegate): requests recorded in the ledger after a "
            "graceful stop, against requests that reached the upstream through it.",
            "",
        ]
        for t in ledgers:
            out.append(f"- {t['label']}: {_ledger_line(t)}")
    out.append("")
    return out


def _ledger_line(t: dict[str, Any]) -> str:
    ledger = t["ledger"]
    if "error" in ledger:
        return f"could not read the ledger: {ledger['error'].splitlines()[0]}"
    rows = ledger.get("usage_report", {}).get("rows", [])
    # The report ends with a "(total)" row: count the groups only.
    recorded = sum(int(r.get("requests", 0)) for r in rows if r.get("key") != "(total)")
    forwarded = t.get("upstream_total")
    verdict = "complete" if recorded == forwarded else "**MISMATCH**"
    return f"{recorded:,} recorded, {_n(forwarded)} forwarded: {verdict}"


def _soak(soak: dict[str, Any] | None) -> list[str]:
    if not soak:
        return ["## Soak", "", "No soak in these results. Run `bash bench/run.sh --soak 600`.", ""]
    started = soak.get("meta", {}).get("started", "?")
    out = [
        "## Soak",
        "",
        f"Run {started}: 64 connections, every fourth request a stream, "
        "resident memory sampled every 10 s.",
        "",
    ]
    for rec in soak.get("targets", []):
        v = rec.get("verdict", {})
        head = (
            f"**{rec['label']}**, {rec['seconds']} s: {_n(rec.get('rps'))} req/s, "
            f"{rec.get('error_count', '?')} errors; "
        )
        if v.get("flat") is None:
            head += f"memory not judged: {v.get('reason', 'no verdict')}."
        else:
            head += (
                f"RSS minute 2 {v['rss_mib_minute_2']} MiB → last minute "
                f"{v['rss_mib_last_minute']} MiB (growth {v['growth_mib']} MiB, slope "
                f"{v['slope_mib_per_hour']} MiB/h): " + ("flat." if v["flat"] else "**grows**.")
            )
        if "ledger" in rec:
            head += f" Ledger: {_ledger_line(rec)}."
        out.append(head)
        samples = rec.get("samples", [])
        if samples:
            step = max(1, len(samples) // 12)
            shown = samples[::step] + ([samples[-1]] if (len(samples) - 1) % step else [])
            out += [
                "",
                "| t (s) | " + " | ".join(f"{s['t']:.0f}" for s in shown) + " |",
                "|---|" + "--:|" * len(shown),
                "| RSS MiB | " + " | ".join(f"{s['rss_mib']:.1f}" for s in shown) + " |",
            ]
        out.append("")
    for name, reason in soak.get("failures", {}).items():
        out += [f"- **{name}** failed: {reason.splitlines()[0]}", ""]
    return out


def _machine(meta: dict[str, Any]) -> list[str]:
    if not meta:
        return []
    m, v = meta.get("machine", {}), meta.get("versions", {})
    sg = v.get("sluicegate", {})
    lines = [
        "## Machine and versions",
        "",
        f"- CPU: {m.get('cpu')}, {meta.get('cpus')} cores; memory {m.get('memory_gib')} GiB; "
        f"{m.get('os')}, kernel {m.get('kernel')}",
        f"- pinning: load generator and upstream on CPU {meta.get('load_cpu')}, proxy on CPU "
        f"{meta.get('proxy_cpu')}",
        f"- sluicegate {sg.get('sluicegate', '?')} (git {v.get('sluicegate_git', '?')}), Python "
        f"{sg.get('python', '?')}, uvicorn {sg.get('uvicorn', '?')}, uvloop {sg.get('uvloop', '?')}"
        f", httptools {sg.get('httptools', '?')}, aiohttp {sg.get('aiohttp', '?')}",
        f"- {v.get('wrk', 'wrk ?')}; nginx {v.get('nginx', '?')}",
    ]
    if "litellm" in v:
        lt = v["litellm"]
        lines.append(f"- LiteLLM {lt.get('litellm', '?')} (Python {lt.get('python', '?')})")
    if "redis" in v:
        lines.append(f"- Redis {v['redis']}; {v.get('postgresql', 'PostgreSQL ?')}")
    return [*lines, ""]


METHOD = """\
## Method

- **One entry point**: `bash bench/run.sh` (what `make bench` runs) installs wrk and nginx
  from Debian when missing and LiteLLM into its own virtualenv `bench/.venv-litellm`, then
  runs `bench/harness.py`. Options: `--quick` (3 s runs), `--targets a,b,c`
  (`baseline,nginx,bare,sluicegate,sluicegate-nolimits,sluicegate-cluster,`
  `sluicegate-cluster-nolimits,litellm`; the
  baseline is always measured), `--soak SECONDS`, `--duration`, `--warmup`, `--rounds`,
  `--port-base` (five ports from 9001), `--alternations`, `--alternation-seconds` (below),
  `--stream-writes once` (a diagnostic: the upstream writes each stream whole instead of
  one event at a time).
- **Upstream**: `bench/upstream.py`, a raw asyncio protocol on uvloop with every response
  prepared at start: an Azure-shaped chat completion (~780 bytes with content-filter
  results and `usage`), or for `"stream": true` 33 server-sent events (each written
  separately, as Azure flushes per event) ending with the usage chunk and `data: [DONE]`.
  It answers `/openai/deployments/{d}/chat/completions?api-version=…` (what sluicegate and
  LiteLLM's `azure/` models call), `/openai/v1/chat/completions` and `/v1/chat/completions`.
- **Targets**, one at a time against the same upstream: the upstream alone (baseline);
  nginx (1 worker, keep-alive upstream pool, `proxy_buffering off`); a bare Python proxy
  (`bench/bare_proxy.py`: uvicorn + uvloop + httptools, one pooled aiohttp session, streams
  relayed chunk by chunk); sluicegate embedded with the full policy (subscription key, TPM
  and RPM limits set far above the load, SQLite ledger on, metrics on, access log off),
  the same with limits off, and cluster mode (Redis counters, PostgreSQL ledger in a
  throwaway database); LiteLLM proxy without a database (`azure/` model, master key,
  `LITELLM_LOG=ERROR` so it writes no access log either). Each runs one worker process.
- **Checks before load**: one JSON and one streaming request through each target, bodies
  verified (usage present, stream complete to `data: [DONE]`), both seen by the upstream
  (which also records the path each target calls), and a request without credentials
  refused where the target has authentication. For sluicegate, `/metrics` must answer,
  and with limits on the answer must carry the limit it applied in
  `x-ratelimit-limit-tokens` (a warning, not a failure, when it does not). After a
  graceful stop, the ledger's request count is compared with the requests that reached
  the upstream through sluicegate.
- **Load**: wrk (one thread, keep-alive) with `bench/wrk/chat.lua` POSTing the body and
  reporting percentiles as JSON from `done()`. Per target: warm-up at 64 connections for
  each kind, then each round runs JSON and streaming at 1 and at 64 connections, each run
  once the target is idle again (under 0.05 cores for 0.5 s, at most 20 s: a run right after
  64 connections would otherwise measure the target catching up, for sluicegate its ledger
  writer; the wait is `settle_s` in `bench/results.json`). The table shows the best round
  (highest req/s at 64, lowest p50 at 1); every round is in `bench/results.json`. wrk and
  the upstream are pinned to CPU 0, the proxy to CPU 1 (`taskset`).
- **Streaming vs JSON**: after its rounds, sluicegate (full policy) runs JSON and streaming
  at 64 connections turn about, 8 pairs of 3 s runs (the order swapped every other pair,
  each run on an idle target). The check takes the median of the pairs' ratios (per core)
  and shows their range and the best rounds' ratio beside it: this host's speed drifts by
  up to ±20 % within minutes, and the rounds measure the two kinds ~20 s apart, so a ratio
  from them moves by as much as the gap it measures. Every pair is in `bench/results.json`
  (`targets[].alternated`).
- **CPU and memory**: the proxy's CPU is utime+stime from `/proc/PID/stat` of its whole
  process tree over each run, so req/s per core = req/s ÷ cores used. Resident memory is
  VmRSS summed over the tree after the runs.
- **Added latency** is the target's percentile minus the baseline's at one connection. In
  the baseline wrk and the upstream share CPU 0, so any proxy on CPU 1 also pays two
  cross-core wake-ups per request; nginx's row shows that floor.
- **Soak** (`--soak SECONDS`, not part of the default run): 64 connections of mixed load
  (every fourth request a stream) against sluicegate, VmRSS sampled every 10 s; flat means
  the median of the last minute is at most 5 MiB above the median of the second minute.
- **Caveats**: on a 2-core machine the load generator and the upstream share one core, so
  fast proxies (nginx) are capped by the load side in raw req/s (marked †); compare per
  core. In cluster mode Redis and PostgreSQL run unpinned and their CPU is not counted in
  sluicegate's per-core figure. A run with errors above 0.1 % of its requests is marked ⚠
  and not used for a check.
"""
