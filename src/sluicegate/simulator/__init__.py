"""A fake Azure OpenAI (per-deployment TPM/RPM, latency, streaming, faults, truth log) for the
demo, the integration tests and capacity what-ifs. See ``app`` for the routes."""

from sluicegate.simulator.app import create_simulator_app
from sluicegate.simulator.config import (
    DEFAULT_SIM_API_KEY,
    SimConfig,
    SimConfigError,
    SimDeployment,
    default_sim_config,
    load_sim_config,
)
from sluicegate.simulator.server import (
    SimulatorHandle,
    SimulatorThread,
    run_simulator,
    start_simulator,
)
from sluicegate.simulator.state import SimulatorState, simulator_state

__all__ = [
    "DEFAULT_SIM_API_KEY",
    "SimConfig",
    "SimConfigError",
    "SimDeployment",
    "SimulatorHandle",
    "SimulatorState",
    "SimulatorThread",
    "create_simulator_app",
    "default_sim_config",
    "load_sim_config",
    "run_simulator",
    "simulator_state",
    "start_simulator",
]
