"""Crash the agent process at exact points, restart it: end to end against the real stack.

The real coordinator (in process) on the session ``stack`` (Kafka, Mosquitto, Redis) selects
the device, dispatches the task and ingests the upload; the agent is a real subprocess,
crashed by ``python -m tests.crashing_agent <point> <flags>`` (the normal agent CLI with
``CrashPoints(point)`` injected: it SIGKILLs itself there) and restarted as the normal
``python -m edge_agent.cli <flags>``:

* between training and upload (update in the durable outbox, nothing published; with and
  without the residual/task-list writes done): the restarted agent delivers the update and
  Kafka's ``{prefix}updates`` holds its shard records exactly once; re-sending it once more
  (a crash before the ack was recorded) gets ``duplicate`` and adds nothing;
* during training: the restarted agent resumes the task (delivered exactly once) or, when
  the gate now refuses (metered network), reports it aborted and nothing reaches Kafka.

"Exactly once" is checked after every publish the agent made has been answered by the
coordinator (its upload counter equals the agent's ``updates_sent``), by reading the topic
to its end offsets.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from prometheus_client import CollectorRegistry

from coordinator.metrics import CoordinatorMetrics, counter_value
from coordinator.service import Coordinator
from edge_agent.data import load_digits_split
from schemas.messages import UPDATE_MAX_BYTES, ShardUpdate, decode
from tests.test_coordinator_integration import coordinator_settings

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]
AUTH = {"Authorization": "Bearer adm"}
WAIT = 180.0  # generous: 2 shared cores, a JVM and other engineers' jobs


async def until(pred: Any, timeout: float = WAIT) -> Any:
    """Poll a (sync or async) condition; never assert on wall-clock durations."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        v = pred()
        if asyncio.iscoroutine(v):
            v = await v
        if v:
            return v
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.05)


@dataclass
class World:
    coord: Coordinator
    metrics: CoordinatorMetrics
    http: httpx.AsyncClient
    job_id: str
    public_key: str
    prefix: str
    kafka: str


@pytest.fixture
async def world(stack: Any, unique_prefix: str, tmp_path: Path) -> AsyncIterator[World]:
    settings = coordinator_settings(stack, unique_prefix, tmp_path, lease_s=300.0)
    metrics = CoordinatorMetrics(registry=CollectorRegistry())
    async with (
        Coordinator(settings, metrics=metrics) as coord,
        httpx.AsyncClient(base_url=coord.rest_url, timeout=30) as http,
    ):
        job = {
            "model_name": f"{unique_prefix}agent",
            "shards": 2,
            "concurrency": 1,
            "spec": {"family": "softmax", "n_features": 64, "n_classes": 10},
            "train": {"lr": 0.5, "local_epochs": 2, "batch_size": 32},
            "eligibility": {"daily_cap": 1},  # one task per device: nothing else to count
        }
        r = await http.post("/v1/jobs", json=job, headers=AUTH)
        assert r.status_code == 201, r.text
        key = (await http.get("/v1/keys/model-signing")).json()["public_key"]
        yield World(
            coord, metrics, http, r.json()["job_id"], key, unique_prefix, stack.kafka_bootstrap
        )


class AgentProc:
    """``python -m edge_agent.cli`` (or ``tests.crashing_agent``) with its stderr log in a
    file."""

    def __init__(self, world: World, tmp: Path, dev: str, extra: tuple[str, ...] = ()) -> None:
        tr = load_digits_split()[0]
        self.data = tmp / "d.npz"
        np.savez(self.data, x=tr.x[:400], y=tr.y[:400])
        self.state = tmp / "state"
        self.tmp = tmp
        self.args = [
            "--device-id", dev, "--mqtt", f"{world.coord.settings.mqtt_host}:"
            f"{world.coord.settings.mqtt_port}", "--api", world.coord.rest_url,
            "--data", str(self.data), "--state-dir", str(self.state),
            "--public-key", world.public_key, "--telemetry-interval", "0.3", "--no-inference",
            *extra,
        ]  # fmt: skip
        self.runs = 0

    async def spawn(
        self, crash_at: str = "", extra: tuple[str, ...] = ()
    ) -> tuple[asyncio.subprocess.Process, Path]:
        self.runs += 1
        log = self.tmp / f"agent{self.runs}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("FEDFLEET_AGENT_")}
        entry = ["tests.crashing_agent", crash_at] if crash_at else ["edge_agent.cli"]
        with log.open("wb") as err:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", *entry, *self.args, *extra,
                stdout=asyncio.subprocess.PIPE, stderr=err, cwd=str(ROOT), env=env,
            )  # fmt: skip
        return proc, log

    async def crash(self, crash_at: str) -> None:
        """Run until the agent SIGKILLs itself at ``crash_at``."""
        proc, log = await self.spawn(crash_at)
        try:
            assert proc.stdout is not None
            out = await asyncio.wait_for(proc.stdout.read(), WAIT)
            await asyncio.wait_for(proc.wait(), 30)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        assert proc.returncode == -signal.SIGKILL, log.read_text()[-3000:]
        assert out.decode().strip() == f"fedfleet-agent: crash point {crash_at}"

    def files(self, sub: str) -> list[str]:
        d = self.state / sub
        return sorted(os.listdir(d)) if d.exists() else []


async def stop_and_stats(proc: asyncio.subprocess.Process, log: Path) -> dict[str, Any]:
    """SIGTERM (clean stop), then the stats the agent logs on the way out."""
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(proc.wait(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, log.read_text()[-3000:]
    line = next(x for x in log.read_text().splitlines() if "agent stopped: " in x)
    stats: dict[str, Any] = json.loads(line.split("agent stopped: ", 1)[1])
    return stats


async def shard_records(world: World) -> list[ShardUpdate]:
    """Every record on ``{prefix}updates``, read up to the end offsets."""
    # the coordinator creates the topic with one partition per possible shard
    return await shard_records_of(
        world.kafka, f"{world.prefix}updates", world.coord.settings.max_shards
    )


async def shard_records_of(kafka: str, topic: str, partitions: int) -> list[ShardUpdate]:
    """Every record on ``topic`` (partitions 0..n-1), read up to the end offsets."""
    c = AIOKafkaConsumer(bootstrap_servers=kafka, group_id=None, enable_auto_commit=False)
    await c.start()
    try:
        parts = [TopicPartition(topic, p) for p in range(partitions)]
        c.assign(parts)
        await c.seek_to_beginning(*parts)
        end = await c.end_offsets(parts)
        out: list[ShardUpdate] = []

        async def drained() -> bool:
            for tp in parts:
                if await c.position(tp) < end[tp]:
                    return False
            return True

        while not await drained():
            for recs in (await c.getmany(*parts, timeout_ms=500)).values():
                out += [decode(r.value, ShardUpdate, max_bytes=UPDATE_MAX_BYTES) for r in recs]
        return out
    finally:
        await c.stop()


def uploads_answered(world: World) -> int:
    return int(
        sum(
            counter_value(world.metrics.uploads, status=s)
            for s in ("accepted", "duplicate", "rejected")
        )
    )


async def task_state(world: World, task_id: str) -> str:
    rec = await world.coord.tasks.get(task_id)
    return "" if rec is None else rec.state


def only_task(agent: AgentProc) -> str:
    """The id of the one task the coordinator issued to the device (from the agent's disk)."""
    names = agent.files("outbox") or agent.files("tasks")
    assert len(names) == 1, names
    return names[0].rsplit(".", 1)[0]


# the same guarantees over both upload paths: MQTT, and HTTP (POST /v1/uploads)
TRANSPORT = {"mqtt": ("--no-http-uploads",), "http": ("--http-upload-min-bytes", "0")}


@pytest.mark.parametrize("transport", sorted(TRANSPORT))
@pytest.mark.parametrize("crash_at", ["after_outbox", "before_publish"])
async def test_kill_between_training_and_upload_delivers_exactly_once(
    world: World, tmp_path: Path, crash_at: str, transport: str
) -> None:
    agent = AgentProc(world, tmp_path, f"{world.prefix.strip('.')}-{crash_at[:5]}",
                      TRANSPORT[transport])  # fmt: skip
    await agent.crash(crash_at)
    task_id = only_task(agent)
    assert agent.files("outbox") == [f"{task_id}.upd"]  # the update survived the kill
    saved = (agent.state / "outbox" / f"{task_id}.upd").read_bytes()
    # after_outbox: killed before the task file was removed; before_publish: after
    assert agent.files("tasks") == ([f"{task_id}.task"] if crash_at == "after_outbox" else [])
    await until(lambda: _is(world, task_id, "accepted"))  # accepted, never uploaded
    assert uploads_answered(world) == 0
    assert not await shard_records(world)

    proc, log = await agent.spawn()
    try:
        await until(lambda: not agent.files("outbox") and not agent.files("tasks"))
        assert await task_state(world, task_id) == "uploaded"
    finally:
        stats = await stop_and_stats(proc, log)
    assert stats["updates_acked"] == 1 and stats["tasks_completed"] == 0  # re-sent, not re-run
    assert stats["updates_sent"] >= 1
    await until(lambda: uploads_answered(world) == stats["updates_sent"])  # all answered
    recs = await shard_records(world)
    assert sorted((r.update_id, r.shard) for r in recs) == [(task_id, 0), (task_id, 1)]
    assert counter_value(world.metrics.uploads, status="accepted") == 1
    job = (await world.http.get(f"/v1/jobs/{world.job_id}")).json()
    assert job["updates_accepted"] == 1

    # and a crash after the publish but before the ack was recorded: the outbox file is
    # back, the next run re-sends it, the coordinator answers "duplicate", Kafka is unchanged
    (agent.state / "outbox" / f"{task_id}.upd").write_bytes(saved)
    proc, log = await agent.spawn()
    try:
        await until(lambda: not agent.files("outbox"))
    finally:
        again = await stop_and_stats(proc, log)
    assert again["updates_acked"] == 1 and again["tasks_completed"] == 0
    await until(lambda: uploads_answered(world) == stats["updates_sent"] + again["updates_sent"])
    assert counter_value(world.metrics.uploads, status="duplicate") >= 1
    assert counter_value(world.metrics.uploads, status="accepted") == 1
    assert sorted((r.update_id, r.shard) for r in await shard_records(world)) == [
        (task_id, 0),
        (task_id, 1),
    ]


@pytest.mark.parametrize("restart", ["resume", "refused"])
async def test_kill_during_training_resumes_or_aborts_never_duplicates(
    world: World, tmp_path: Path, restart: str
) -> None:
    agent = AgentProc(world, tmp_path, f"{world.prefix.strip('.')}-{restart}")
    await agent.crash("during_training")
    task_id = only_task(agent)
    assert agent.files("outbox") == [] and agent.files("tasks") == [f"{task_id}.task"]
    await until(lambda: _is(world, task_id, "accepted"))

    # "refused": the device is on a metered network now and the job forbids it
    extra = ("--metered",) if restart == "refused" else ()
    proc, log = await agent.spawn(extra=extra)
    try:
        want = "uploaded" if restart == "resume" else "aborted"
        await until(lambda: agent.files("outbox") == [] and agent.files("tasks") == [])
        await until(lambda: _is(world, task_id, want))
    finally:
        stats = await stop_and_stats(proc, log)
    await until(lambda: uploads_answered(world) == stats["updates_sent"])
    recs = await shard_records(world)
    if restart == "resume":
        assert stats["tasks_resumed"] == 1 and stats["updates_acked"] == 1
        assert sorted((r.update_id, r.shard) for r in recs) == [(task_id, 0), (task_id, 1)]
    else:
        assert stats["tasks_aborted"] == 1 and stats["updates_sent"] == 0
        assert recs == []
        rec = await world.coord.tasks.get(task_id)
        assert rec is not None and rec.state == "aborted"


async def _is(world: World, task_id: str, state: str) -> bool:
    return await task_state(world, task_id) == state
