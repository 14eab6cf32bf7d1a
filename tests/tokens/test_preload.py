"""The gateway builds its tokenizers at start-up, whether or not limits are configured.

Building one holds the GIL for 0.1-0.5 s; left to first use, the first stream a client cut
short (whose completion the ledger estimates with the tokenizer) froze the event loop. The
check runs in a fresh interpreter, because this test process may have built them already.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

_PROBE = """
import json, sys
from pathlib import Path
from sluicegate.tokens import encodings
from tests.support.gateway import GatewayThread, gateway_config

before = sorted(encodings.loaded())
# No limits in any product, and a backend that is never called.
with GatewayThread(gateway_config(Path(sys.argv[1]), {"sim": "http://127.0.0.1:9"})):
    print(json.dumps({"before": before, "after": sorted(encodings.loaded())}))
"""


def test_tokenizers_are_built_at_start_without_limits(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["before"] == []
    # gpt-4o-mini and gpt-4o use o200k_base; text-embedding-3-small uses cl100k_base.
    assert seen["after"] == ["cl100k_base", "o200k_base"]
