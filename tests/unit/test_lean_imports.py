"""A gateway that does not use them does not load the heavy optional libraries: PyJWT and
cryptography (tokens), aiohttp (token issuers' keys; the request path has its own client),
Redis (cluster mode), Alembic (migrations), the Azure SDKs (Entra backends, Key Vault) and
tiktoken (a test-only reference: the gateway counts with its own compact tokenizer)
cost tens of MiB per worker."""

from __future__ import annotations

import subprocess
import sys


def test_the_serving_modules_leave_optional_libraries_unloaded() -> None:
    probe = (
        "import sys; import sluicegate.server, sluicegate.app, sluicegate.gateway, "
        "sluicegate.admin.mount, sluicegate.cli.main; "
        "from sluicegate.tokens.counting import count_tokens; count_tokens('hi', 'gpt-4o'); "
        "heavy = ('jwt', 'cryptography', 'aiohttp', 'redis', 'alembic', 'azure', 'tiktoken'); "
        "print(sorted(m for m in heavy if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.strip() == "[]"
