"""schemathesis against the live coordinator's own OpenAPI document, with and without the
admin token: no 5xx, no undocumented status code, content type or body shape.

The write bodies are declared (``coordinator.api.bodies``), so with the token schemathesis
sends valid job specs too and creates real jobs: on this test's own coordinator (its own
topics, Redis keys and model store), with models capped at ``MAX_PARAMS`` parameters so
that each one costs little to build and sign.

``FEDFLEET_SCHEMATHESIS_EXAMPLES`` sets the examples per operation (CI: 10; the documented
long run in BENCHMARKS.md uses far more; the test's time limit grows with it) and
``FEDFLEET_SCHEMATHESIS_WORKERS`` schemathesis' concurrent workers (default 1)."""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from coordinator.service import Coordinator
from tests.test_coordinator_integration import coordinator_settings

CHECKS = ",".join(("not_a_server_error", "status_code_conformance",
                   "content_type_conformance", "response_schema_conformance"))  # fmt: skip
MAX_PARAMS = 1 << 16  # 256 KiB float32 per created model (the default allows 64 Mi)
EXAMPLES = os.environ.get("FEDFLEET_SCHEMATHESIS_EXAMPLES", "10")
WORKERS = os.environ.get("FEDFLEET_SCHEMATHESIS_WORKERS", "1")
# both passes, 2 cores: ~165 s + 4.4 s per example (10: 209 s, 50: 383 s), so a wide margin
TIMEOUT_S = 900 + 20 * int(EXAMPLES)


async def _run(url: str, *extra: str) -> tuple[int, str]:
    exe = shutil.which("schemathesis", path=str(Path(sys.executable).parent)) or "schemathesis"
    proc = await asyncio.create_subprocess_exec(
        exe, "run", f"{url}/openapi.json", "--checks", CHECKS, "--max-examples", EXAMPLES,
        "--seed", "1", "--request-timeout", "20", "--workers", WORKERS, *extra,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await proc.communicate()
    return proc.returncode or 0, out.decode(errors="replace")


@pytest.mark.integration
@pytest.mark.timeout(TIMEOUT_S)
async def test_schemathesis_finds_nothing(stack: Any, unique_prefix: str, tmp_path: Path) -> None:
    settings = coordinator_settings(stack, unique_prefix, tmp_path, lease_s=30.0).replace(
        max_params=MAX_PARAMS
    )
    async with Coordinator(settings) as coord:
        for extra in ((), ("-H", "Authorization: Bearer adm")):
            rc, out = await _run(coord.rest_url, *extra)
            assert rc == 0, out[-6000:]
            print(out[-1500:])
            assert "No issues found" in out or " 0 failures" in out or "passed" in out, out
        async with httpx.AsyncClient(base_url=coord.rest_url) as http:
            created = (await http.get("/v1/jobs")).json()["jobs"]
        assert created, "no job was created: no generated body got through POST /v1/jobs"
