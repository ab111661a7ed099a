"""What an enrolment costs the broker as the fleet grows, for both credential stores.

Starts one secure Mosquitto per store (``stack.mqtt.Mosquitto(secure=True, auth=...)``) and
enrols devices through the coordinator's own adapters (``BrokerAdmin`` port:
``PasswdBrokerAdmin``, the password file rewritten in batches + SIGHUP, and
``DynsecBrokerAdmin``, the dynamic-security plugin over ``$CONTROL``), ``--concurrency``
enrolments in flight as the REST server would have them, ``--step`` devices at a time.
After each step it prints the time per enrolment at that fleet size, the reloads made
(password file) and the store's file size. The dynsec store is the baseline measured in
the same run, up to ``--dynsec-devices`` (its cost per enrolment grows with the fleet).

    .venv/bin/python bench/enrol_store.py --devices 100000 --step 10000 \\
        --dynsec-devices 3000 --dynsec-step 1000 --json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from coordinator.broker_admin import BrokerAdmin, DynsecBrokerAdmin
from coordinator.broker_passwd import PasswdBrokerAdmin
from schemas import dynsec
from stack.mqtt import Mosquitto


async def _enrol_all(admin: BrokerAdmin, ids: list[str], concurrency: int) -> float:
    slots = asyncio.Semaphore(concurrency)

    async def one(d: str) -> None:
        async with slots:
            await admin.enrol(d, dynsec.new_password())

    t0 = time.perf_counter()
    await asyncio.gather(*(one(d) for d in ids))
    return time.perf_counter() - t0


async def run(store: str, devices: int, step: int, concurrency: int) -> list[dict[str, Any]]:
    workdir = Path(tempfile.mkdtemp(prefix=f"enrol-{store}-"))
    broker = Mosquitto(workdir / "mqtt", secure=True, auth=store)
    broker.start()
    rows: list[dict[str, Any]] = []
    try:
        await asyncio.to_thread(broker.wait_ready)
        assert broker.credentials is not None
        admin: PasswdBrokerAdmin | DynsecBrokerAdmin
        if store == "passwd":
            admin = PasswdBrokerAdmin(
                broker.passwd_file, broker.pid_file, broker.host, broker.port,
                broker.credentials.cafile, timeout=120,
            )  # fmt: skip
        else:
            admin = DynsecBrokerAdmin(broker.host, broker.port, broker.credentials, timeout=600)
        async with admin:
            n = 0
            while n < devices:
                ids = [f"d{i}" for i in range(n, min(n + step, devices))]
                before = admin.batches if isinstance(admin, PasswdBrokerAdmin) else 0
                took = await _enrol_all(admin, ids, concurrency)
                n += len(ids)
                row: dict[str, Any] = {
                    "store": store, "devices": n, "enrol_ms_each": 1000 * took / len(ids),
                    "enrolments_per_s": len(ids) / took,
                    "file_mb": broker.store_file.stat().st_size / 1e6,
                }  # fmt: skip
                if isinstance(admin, PasswdBrokerAdmin):
                    row["reloads"] = admin.batches - before
                rows.append(row)
                print(json.dumps(row), flush=True)
    finally:
        broker.stop()
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--devices", type=int, default=20000, help="password-file store")
    p.add_argument("--step", type=int, default=5000)
    p.add_argument("--dynsec-devices", type=int, default=2000, help="0: skip the baseline")
    p.add_argument("--dynsec-step", type=int, default=500)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--json", action="store_true", help="one JSON document at the end")
    a = p.parse_args()
    rows = asyncio.run(run("passwd", a.devices, a.step, a.concurrency))
    if a.dynsec_devices:
        rows += asyncio.run(run("dynsec", a.dynsec_devices, a.dynsec_step, a.concurrency))
    if a.json:
        print(json.dumps({"bench": "enrol_store", "rows": rows}))


if __name__ == "__main__":
    main()
