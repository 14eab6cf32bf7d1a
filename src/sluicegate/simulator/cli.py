"""``sluicegate simulate``: run the simulator in the foreground (the lead wires it to Typer)."""

from __future__ import annotations

import sys
from pathlib import Path

from sluicegate.simulator.config import (
    DEFAULT_SIM_API_KEY,
    SimConfig,
    SimConfigError,
    default_sim_config,
    load_sim_config,
)
from sluicegate.simulator.server import run_simulator


def _describe(config: SimConfig, url: str) -> str:
    lines = [f"Azure OpenAI simulator listening on {url} (region {config.region!r})"]
    for d in config.deployments:
        limits = f"tpm={d.tpm or '∞'} rpm={d.rpm or '∞'}"
        lines.append(f"  {d.kind:<10} {d.name} → {d.model}  {limits}")
    # The built-in development key is public (it is in the code); a configured key is a
    # secret like the real service's, and the banner is a log: counted, never shown.
    shown = [key for key in config.api_keys if key == DEFAULT_SIM_API_KEY]
    hidden = len(config.api_keys) - len(shown)
    if hidden:
        shown.append(f"{hidden} from the configuration (not shown)")
    lines.append(f"  api keys: {', '.join(shown) or '(none)'}")
    lines.append(f"  e.g. AzureOpenAI(azure_endpoint={url!r}, api_key=…, api_version='2024-10-21')")
    lines.append("  Ctrl-C to stop.")
    return "\n".join(lines)


def simulate(config_path: Path | None, host: str, port: int) -> int:
    """Serve the simulator until SIGINT/SIGTERM. Returns the exit code: 0 after a clean stop,
    2 if the config file is invalid, 1 if the address cannot be bound."""
    try:
        config = load_sim_config(config_path) if config_path is not None else default_sim_config()
    except SimConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    def ready(url: str) -> None:
        print(_describe(config, url), flush=True)

    try:
        run_simulator(config, host, port, on_ready=ready)
    except OSError as exc:
        print(f"error: cannot listen on {host}:{port}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0
