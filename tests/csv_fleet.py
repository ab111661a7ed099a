"""A fleet of real edge agents, each on its own CSV, against the coordinator and two
aggregator processes on the test stack: what a user does with ``fedfleet data example``,
``fedfleet coordinator``, ``fedfleet aggregator``, ``fedfleet job create`` and one
``fedfleet agent --data devNNN.csv`` per device (the agents run in this process so the
test stays light on 2 cores; they are the same ``EdgeAgent``)."""

from __future__ import annotations

import asyncio
import contextlib
import csv
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort

from edge_agent.agent import EdgeAgent
from edge_agent.data import load_dataset
from edge_agent.probe import SimulatedProbe
from edge_agent.settings import AgentSettings
from sim.services import ServiceSet
from stack import StackInfo

ADMIN = "csv-admin"
AUTH = {"Authorization": f"Bearer {ADMIN}"}
ENDED = ("completed", "failed", "stopped", "done")


@dataclass
class Fleet:
    services: ServiceSet
    http: httpx.AsyncClient
    prefix: str


@contextlib.asynccontextmanager
async def fleet_services(info: StackInfo, workdir: Path, prefix: str) -> AsyncIterator[Fleet]:
    services = ServiceSet(info, workdir, aggregators=2, admin_token=ADMIN, topic_prefix=prefix)
    try:
        await services.start()
        async with httpx.AsyncClient(base_url=services.rest_url, timeout=30) as http:
            yield Fleet(services, http, prefix)
    finally:
        services.stop()


def agents_for(fleet: Fleet, data_dir: Path, tag: str, **settings: Any) -> list[EdgeAgent]:
    """One agent per ``devNNN.csv``: plugged in, on wifi, battery full (always eligible)."""
    info = fleet.services.info
    out = []
    for i, path in enumerate(sorted(data_dir.glob("dev*.csv"))):
        s = AgentSettings(
            device_id=f"{fleet.prefix.strip('.')}-{tag}-{i:03d}", mqtt_host=info.mqtt_host,
            mqtt_port=info.mqtt_port, api_url=fleet.services.rest_url,
            telemetry_interval_s=1.0, inference=False, seed=i, data_path=path, **settings,
        )  # fmt: skip
        probe = SimulatedProbe(seed=i, battery=95.0, charging=True, network="wifi",
                               metered=False)  # fmt: skip
        out.append(EdgeAgent(s, probe, load_dataset(path, label_col=s.label_column)))
    return out


async def run_job(
    fleet: Fleet, agents: list[EdgeAgent], body: dict[str, Any], timeout: float = 300.0
) -> dict[str, Any]:
    """Create the job, run the agents until it ends by itself, let every acknowledged upload
    be applied; the job's final JSON."""
    async with AsyncExitStack() as ex:
        for a in agents:
            await ex.enter_async_context(a)
        ids = {a.settings.device_id for a in agents}

        async def all_online() -> bool:
            r = await fleet.http.get("/v1/devices", params={"limit": 1000})
            seen = {d["device_id"] for d in r.json()["devices"] if d["state"] != "offline"}
            return ids <= seen

        await until(all_online, 60.0)  # the fleet is up, then the job comes
        r = await fleet.http.post("/v1/jobs", json=body, headers=AUTH)
        assert r.status_code == 201, r.text
        jid = r.json()["job_id"]
        job = await until(lambda: job_if(fleet, jid, lambda j: j["status"] in ENDED), timeout)
    if job["status"] == "failed":
        return dict(job)
    # agents are gone: what was acknowledged before they stopped is still applied
    done: dict[str, Any] = await until(
        lambda: job_if(fleet, jid, lambda j: j["updates_applied"] >= j["updates_accepted"]),
        120.0,
    )
    return done


async def job_if(fleet: Fleet, jid: str, pred: Any) -> dict[str, Any] | None:
    j: dict[str, Any] = (await fleet.http.get(f"/v1/jobs/{jid}")).json()
    return j if pred(j) else None


async def until(fn: Any, timeout: float) -> Any:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        v = await fn()
        if v:
            return v
        if loop.time() > deadline:
            raise AssertionError(f"not reached within {timeout:.0f}s")
        await asyncio.sleep(0.5)


async def onnx_accuracy(fleet: Fleet, model_name: str, test_csv: Path) -> float:
    """Score the served ``latest.onnx`` on a CSV (raw feature columns, string labels)."""
    r = await fleet.http.get(f"/v1/models/{model_name}/latest")
    labels = r.json()["spec"]["labels"]
    onnx = (await fleet.http.get(f"/v1/models/{model_name}/latest.onnx")).content
    with test_csv.open(newline="") as fh:
        rows = list(csv.reader(fh))[1:]
    x = np.asarray([[float(v) for v in row[:-1]] for row in rows], dtype=np.float32)
    y = np.asarray([labels.index(row[-1]) for row in rows])
    sess = ort.InferenceSession(onnx, providers=["CPUExecutionProvider"])
    logits = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    return float((np.asarray(logits).argmax(axis=1) == y).mean())
