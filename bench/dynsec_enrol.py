"""What one enrolment costs the broker as the fleet grows (Mosquitto's dynamic-security plugin).

Starts Mosquitto in the secure mode (``stack.mqtt.Mosquitto(secure=True)``) and enrols
devices through ``$CONTROL`` exactly as the coordinator does (``schemas.dynsec.enrol_device``:
a role and a client per device), ``--step`` devices at a time in batches of
``--batch`` commands, until ``--devices``. After each step it prints the time per
enrolment, the size of the plugin's JSON file and, as the baseline measured in the same
run, the time of the same number of ``getClient`` commands (a read: no file written).

    .venv/bin/python bench/dynsec_enrol.py --devices 3000 --step 500 --json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from coordinator.broker_admin import DynsecClient
from schemas import dynsec
from stack.mqtt import Mosquitto


async def run(devices: int, step: int, batch: int) -> list[dict[str, Any]]:
    workdir = Path(tempfile.mkdtemp(prefix="dynsec-bench-"))
    broker = Mosquitto(workdir / "mqtt", secure=True, auth="dynsec")
    broker.start()
    rows: list[dict[str, Any]] = []
    try:
        await asyncio.to_thread(broker.wait_ready)
        assert broker.credentials is not None
        async with DynsecClient(broker.host, broker.port, broker.credentials,
                                timeout=600) as admin:  # fmt: skip
            n = 0
            while n < devices:
                ids = [f"d{i}" for i in range(n, min(n + step, devices))]
                cmds = [c for d in ids for c in dynsec.enrol_device(d, dynsec.new_password())]
                t0 = time.perf_counter()
                for j in range(0, len(cmds), batch):
                    await admin.run(*cmds[j : j + batch])
                enrol_s = time.perf_counter() - t0
                reads = [dynsec.get_client(d) for d in ids]
                t0 = time.perf_counter()
                for j in range(0, len(reads), batch):
                    await admin.run(*reads[j : j + batch])
                read_s = time.perf_counter() - t0
                n += len(ids)
                rows.append({
                    "devices": n, "enrol_ms_each": 1000 * enrol_s / len(ids),
                    "read_ms_each": 1000 * read_s / len(ids),
                    "ratio_enrol_to_read": enrol_s / read_s if read_s else None,
                    "file_mb": broker.dynsec_file.stat().st_size / 1e6,
                })  # fmt: skip
                print(json.dumps(rows[-1]), flush=True)
    finally:
        broker.stop()
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--devices", type=int, default=3000)
    p.add_argument("--step", type=int, default=500)
    p.add_argument("--batch", type=int, default=100, help="commands per $CONTROL message")
    p.add_argument("--json", action="store_true", help="one JSON document at the end")
    a = p.parse_args()
    rows = asyncio.run(run(a.devices, a.step, a.batch))
    if a.json:
        print(json.dumps({"bench": "dynsec_enrol", "rows": rows}))


if __name__ == "__main__":
    main()
