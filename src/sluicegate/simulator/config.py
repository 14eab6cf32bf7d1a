"""Simulator settings: which fake deployments exist and how each one behaves.

The models are immutable and validated once. ``load_sim_config`` reads the same shape from YAML::

    region: Sweden Central
    seed: 7
    api_keys: [sim-key]
    bearer_tokens: []
    deployments:
      - name: gpt-4o-mini
        model: gpt-4o-mini-2024-07-18
        kind: chat
        tpm: 200000
        rpm: 1200
        ttft_ms: 120
        tokens_per_second: 80
        error_rate: 0.01
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

DeploymentKind = Literal["chat", "embeddings"]

#: The key ``default_sim_config`` accepts (in ``api-key`` and as ``Authorization: Bearer``).
DEFAULT_SIM_API_KEY = "sim-azure-key-0000"


class SimDeployment(BaseModel):
    """One fake deployment.

    ``tpm``/``rpm`` of ``None`` mean unlimited (and no ``x-ratelimit-*`` headers for that
    dimension). As on Azure, ``tpm`` counts over a minute but ``rpm`` is enforced over short
    windows, RPM/6 per 10 s and RPM/60 per second (see ``window``), so a burst well under
    ``rpm`` can be refused. ``completion_tokens`` is the answer length when the request sets no
    ``max_tokens``; a requested length is honoured up to ``completion_tokens ×
    completion_cap_factor`` tokens. The fault rates are shares of admitted requests, drawn from
    the simulator's seeded RNG, and must add up to at most 1.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1)
    model: str = Field(min_length=1)
    kind: DeploymentKind = "chat"
    tpm: int | None = Field(default=None, ge=1)
    rpm: int | None = Field(default=None, ge=1)
    ttft_ms: float = Field(default=0.0, ge=0)
    tokens_per_second: float = Field(default=0.0, ge=0)
    completion_tokens: int = Field(default=16, ge=1)
    completion_cap_factor: int = Field(default=64, ge=1)
    error_rate: float = Field(default=0.0, ge=0, le=1)
    hang_rate: float = Field(default=0.0, ge=0, le=1)
    cut_rate: float = Field(default=0.0, ge=0, le=1)
    #: Extra delay before the first byte for the ``slow`` fault (header ``x-sim-fault: slow``).
    slow_ms: float = Field(default=2000.0, ge=0)
    #: Upper bound on a ``hang``: after this the connection is closed without an answer.
    hang_max_s: float = Field(default=600.0, gt=0)
    #: Embedding vector length (``dimensions`` in a request may ask for fewer).
    dimensions: int = Field(default=1536, ge=1, le=8192)

    @property
    def completion_cap(self) -> int:
        """The longest answer this deployment writes, whatever ``max_tokens`` asks for."""
        return self.completion_tokens * self.completion_cap_factor

    @model_validator(mode="after")
    def _rates_fit(self) -> SimDeployment:
        if self.error_rate + self.hang_rate + self.cut_rate > 1.0:
            raise ValueError("error_rate + hang_rate + cut_rate must not exceed 1")
        return self


class SimConfig(BaseModel):
    """The whole simulator: deployments, accepted credentials, region and RNG seed.

    Every entry of ``api_keys`` is accepted in the ``api-key`` header and also as
    ``Authorization: Bearer`` (v1 clients can send nothing else); ``bearer_tokens`` are
    accepted only as Bearer tokens (stand-ins for Entra ID tokens).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    deployments: list[SimDeployment] = Field(default_factory=list)
    api_keys: list[str] = Field(default_factory=lambda: [DEFAULT_SIM_API_KEY])
    bearer_tokens: list[str] = Field(default_factory=list)
    region: str = "Sweden Central"
    seed: int = 0

    @model_validator(mode="after")
    def _unique_names(self) -> SimConfig:
        names = [d.name for d in self.deployments]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"duplicate deployment names: {', '.join(duplicates)}")
        return self

    def deployment(self, name: str) -> SimDeployment | None:
        """The deployment called ``name``, or None."""
        for deployment in self.deployments:
            if deployment.name == name:
                return deployment
        return None


class SimConfigError(ValueError):
    """A simulator config file could not be read or is invalid; the message says where."""


def load_sim_config(path: Path | str) -> SimConfig:
    """Read and validate a YAML simulator config.

    Raises ``SimConfigError`` naming the file and the offending fields.
    """
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise SimConfigError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    except yaml.YAMLError as exc:
        raise SimConfigError(f"{path}: not valid YAML: {exc}") from exc
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise SimConfigError(f"{path}: the top level must be a mapping")
    try:
        return SimConfig.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(top)'}: {err['msg']}"
            for err in exc.errors()
        )
        raise SimConfigError(f"{path}: {problems}") from exc


def default_sim_config() -> SimConfig:
    """The demo's simulator: two chat deployments and one embeddings deployment.

    Limits are generous (a laptop demo never hits them unless asked to) and there is no
    latency and no random fault; use ``model_copy(update=…)`` for variants.
    """
    return SimConfig(
        deployments=[
            SimDeployment(
                name="gpt-4o-mini",
                model="gpt-4o-mini-2024-07-18",
                kind="chat",
                tpm=2_000_000,
                rpm=12_000,
            ),
            SimDeployment(
                name="gpt-4o",
                model="gpt-4o-2024-08-06",
                kind="chat",
                tpm=450_000,
                rpm=2_700,
            ),
            SimDeployment(
                name="text-embedding-3-small",
                model="text-embedding-3-small",
                kind="embeddings",
                tpm=1_000_000,
                rpm=6_000,
                dimensions=1536,
            ),
        ],
        api_keys=[DEFAULT_SIM_API_KEY],
        region="Sweden Central",
        seed=0,
    )
