"""The message log's settings: ``products[].message_log`` (what a product logs) and the
top-level ``message_log`` (where every product's entries go). docs/message-log.md."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

MiB = 1024 * 1024


class MessageLogPolicy(BaseModel):
    """What a product logs: the request's messages (``prompts``), the answer's text
    (``completions``), each cut at ``max_bytes`` (UTF-8) and split into entries of at most
    ``chunk_bytes`` (APIM: 32 KB chunks, 2 MB cap per request and per response)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompts: bool = True
    completions: bool = True
    max_bytes: int = Field(default=2 * MiB, ge=1024, le=64 * MiB)
    chunk_bytes: int = Field(default=32_768, ge=1024, le=16 * MiB)

    @model_validator(mode="after")
    def _something_logged(self) -> MessageLogPolicy:
        if not (self.prompts or self.completions):
            raise ValueError("prompts and completions are both false: remove message_log instead")
        return self


class MessageLogSink(BaseModel):
    """Where entries go: a JSON-lines file rotated at ``max_file_bytes`` with
    ``backup_count`` old files (``path.1`` … as Python's ``RotatingFileHandler`` names them;
    ``max_file_bytes: 0`` never rotates), or standard output (``path: "-"``). Entries wait
    for the writer's thread in memory, at most ``max_pending`` requests holding at most
    ``max_pending_bytes`` of bodies; beyond, a request's entries are dropped and counted,
    never waited for."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str = Field(default="var/messages.jsonl", min_length=1)
    max_file_bytes: int = Field(default=100 * MiB, ge=0)
    backup_count: int = Field(default=5, ge=0, le=1000)
    max_pending: int = Field(default=10_000, ge=1)
    max_pending_bytes: int = Field(default=256 * MiB, ge=MiB)
