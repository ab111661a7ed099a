"""EdgeAgent against a real MQTT broker (Mosquitto) and the in-package fake model server.

Uses the lead's session fixture ``stack`` when ``tests/conftest.py`` provides it, else
starts a private ``mosquitto`` (skips if the binary is missing). The REST side is
``edge_agent.testing.FakeModelServer``; a test against the real coordinator follows.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import numpy as np
import pytest

from edge_agent.agent import EdgeAgent
from edge_agent.data import Dataset, load_digits_split, partition_dirichlet
from edge_agent.pacing import SimulatedCompute
from edge_agent.probe import SimulatedProbe
from edge_agent.settings import AgentSettings
from edge_agent.testing import FakeModelServer
from schemas.codec import decode_update
from schemas.messages import (
    CodecConfig,
    DeviceStatus,
    ModelSpecMsg,
    Task,
    TaskResponse,
    Telemetry,
    TrainConfig,
    Update,
    UploadAck,
    decode,
    encode,
)
from schemas.modelspec import forward, init_params, num_params

pytestmark = pytest.mark.integration
SPEC = ModelSpecMsg(family="softmax", n_features=64, n_classes=10)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def broker(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, int]]:
    if not os.environ.get("FEDFLEET_AGENT_OWN_MOSQUITTO"):  # set it to skip Kafka/Redis
        try:
            stack = request.getfixturevalue("stack")
        except pytest.FixtureLookupError:
            pass
        else:
            yield stack.mqtt_host, int(stack.mqtt_port)
            return
    proc, port = _start_mosquitto(tmp_path_factory.mktemp("mosq"))
    try:
        yield "127.0.0.1", port
    finally:
        proc.terminate()
        proc.wait(10)


def _start_mosquitto(workdir: Path, port: int | None = None) -> tuple[subprocess.Popen[bytes], int]:
    exe = shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None
    )
    if exe is None:
        pytest.skip("no stack fixture and no mosquitto binary")
    port = port or _free_port()
    conf = workdir / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
    proc = subprocess.Popen(
        [exe, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    for _ in range(250):
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.1):
            break
        time.sleep(0.02)
    return proc, port


@pytest.fixture(scope="module")
def digits() -> tuple[Dataset, Dataset]:
    return load_digits_split()


async def until(pred: Callable[[], bool], timeout: float = 15.0) -> None:
    """Wait for a condition (never assert on wall-clock durations)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not pred():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.02)


class Coord:
    """A minimal stand-in for the coordinator's MQTT side: records, sends tasks and acks."""

    def __init__(self, client: aiomqtt.Client) -> None:
        self.client = client
        self.msgs: dict[str, list[bytes]] = {}

    async def pump(self) -> None:
        async for m in self.client.messages:
            if isinstance(m.payload, bytes) and not m.retain:  # skip other tests' leftovers
                leaf = m.topic.value.rsplit("/", 1)[-1]
                self.msgs.setdefault(leaf, []).append(m.payload)

    def got(self, leaf: str) -> list[bytes]:
        return self.msgs.get(leaf, [])

    def responses(self) -> list[TaskResponse]:
        return [decode(b, TaskResponse) for b in self.got("task_status")]

    async def task(self, device: str, task_id: str, **kw: Any) -> Task:
        now = time.time()
        t = Task(
            task_id=task_id,
            job_id="job-1",
            device_id=device,
            model_name="digits",
            upload_token="tok",
            issued_ts=now,
            deadline_ts=now + kw.pop("ttl", 60.0),
            train=kw.pop("train", TrainConfig(lr=0.5, local_epochs=1)),
            codec=kw.pop("codec", CodecConfig(quant="none")),
            **kw,
        )
        await self.client.publish(f"fleet/{device}/task", encode(t), qos=1)
        return t

    async def ack(self, device: str, update_id: str, status: str = "accepted") -> None:
        ack = UploadAck(update_id=update_id, task_id=update_id, status=status)  # type: ignore[arg-type]
        await self.client.publish(f"fleet/{device}/ack", encode(ack), qos=1)


@pytest.fixture
async def coord(broker: tuple[str, int]) -> AsyncIterator[Coord]:
    async with aiomqtt.Client(broker[0], broker[1], identifier=f"coord-{_free_port()}") as c:
        await c.subscribe("fleet/#", qos=1)
        co = Coord(c)
        pump = asyncio.create_task(co.pump())
        yield co
        pump.cancel()
        await asyncio.gather(pump, return_exceptions=True)


def make_agent(
    broker: tuple[str, int],
    srv: FakeModelServer,
    data: Dataset,
    device: str,
    *,
    state_dir: Path | None = None,
    probe: SimulatedProbe | None = None,
    **kw: Any,
) -> EdgeAgent:
    settings = AgentSettings(
        device_id=device,
        mqtt_host=broker[0],
        mqtt_port=broker[1],
        api_url=srv.base_url,
        public_key_hex=srv.public_key_hex,
        state_dir=state_dir,
        telemetry_interval_s=kw.pop("telemetry_interval_s", 0.2),
        resend_interval_s=kw.pop("resend_interval_s", 30.0),
        **kw,
    )
    probe = probe or SimulatedProbe(
        seed=1, battery=90, charging=True, network="wifi", compute_speed=1e6
    )
    # a simulated device: its compute time is waited out as the simulator does
    return EdgeAgent(settings, probe, data, http=srv.client(), pacer=SimulatedCompute(probe))


def _server() -> FakeModelServer:
    srv = FakeModelServer()
    srv.publish("digits", SPEC, init_params(SPEC), shard_bounds=[0, 300, num_params(SPEC)])
    return srv


def _uid() -> str:
    return f"d{_free_port()}"


async def test_task_to_acked_update_and_predict(broker, coord, digits) -> None:  # type: ignore[no-untyped-def]
    tr, te = digits
    srv, dev = _server(), _uid()
    async with make_agent(broker, srv, tr, dev) as agent:
        await agent.wait_connected(10)
        await until(lambda: len(coord.got("telemetry")) >= 2 and coord.got("status"))
        assert decode(coord.got("status")[0], DeviceStatus).state == "online"
        assert decode(coord.got("telemetry")[-1], Telemetry).device_id == dev
        await coord.task(dev, "task-1")
        await until(lambda: bool(coord.got("update")))
        assert [r.status for r in coord.responses()] == ["accepted"]
        upd = decode(coord.got("update")[0], Update, max_bytes=64 << 20)
        assert upd.update_id == "task-1" and [c.shard for c in upd.chunks] == [0, 1]
        assert all(c.base_version == 0 for c in upd.chunks)
        frames = [(c.shard, c.start, c.stop, c.payload) for c in upd.chunks]
        delta = decode_update(frames, [0, 300, num_params(SPEC)], num_params(SPEC))
        assert np.linalg.norm(delta) > 0
        trained = init_params(SPEC) + delta
        assert (forward(SPEC, trained, te.x).argmax(1) == te.y).mean() > 0.5
        assert "task-1" in agent.outbox
        await coord.ack(dev, "task-1")
        await until(lambda: agent.stats.updates_acked == 1)
        assert "task-1" not in agent.outbox
        # on-device inference from the verified ONNX artifact of the pulled version
        await until(lambda: agent.stats.onnx_swaps == 1)
        np.testing.assert_allclose(
            agent.predict(te.x[:5]), forward(SPEC, init_params(SPEC), te.x[:5]), atol=1e-5
        )
        # hot swap to a new version
        srv.publish("digits", SPEC, trained, shard_bounds=[0, 300, num_params(SPEC)])
        assert await agent.refresh_model("digits") == 1
        np.testing.assert_allclose(
            agent.predict(te.x[:5]), forward(SPEC, trained, te.x[:5]), atol=1e-4
        )
        # redelivered task is not trained twice
        await coord.task(dev, "task-1")
        await until(lambda: agent.stats.tasks_duplicate == 1)
        assert agent.stats.tasks_completed == 1
    await until(lambda: decode(coord.got("status")[-1], DeviceStatus).state == "offline")


async def test_bad_tasks_are_counted_not_fatal(broker, coord, digits) -> None:  # type: ignore[no-untyped-def]
    srv, dev = _server(), _uid()
    async with make_agent(broker, srv, digits[0], dev) as agent:
        await agent.wait_connected(10)
        topic = f"fleet/{dev}/task"
        await coord.client.publish(topic, b"\xc1garbage", qos=1)
        good = await coord.task(dev, "x1", ttl=60)
        await coord.client.publish(topic, encode(good).replace(b"\xa1v\x01", b"\xa1v\x07"), qos=1)
        await coord.task("someone-else", "x2")  # not our topic
        await coord.client.publish(topic, encode(good.__replace__(device_id="other")), qos=1)
        await coord.client.publish(f"fleet/{dev}/ack", b"\x00", qos=1)
        await until(lambda: agent.stats.tasks_invalid == 3 and bool(coord.got("update")))
        assert agent.stats.tasks_completed == 1 and agent.stats.errors.get("ack_type") == 1
        assert agent.stats.errors.get("task_version") == 1


async def test_gate_declines_and_unplug_aborts(broker, coord, digits) -> None:  # type: ignore[no-untyped-def]
    srv, dev = _server(), _uid()
    probe = SimulatedProbe(
        seed=3,
        battery=15,
        charging=False,
        network="cellular",
        metered=True,
        compute_speed=1e-3,
        time_scale=1.0,
        plug_rate_per_h=0,
        unplug_rate_per_h=0,
        network_change_per_h=0,
    )
    async with make_agent(broker, srv, digits[0], dev, probe=probe) as agent:
        await agent.wait_connected(10)
        await coord.task(dev, "m1", allow_metered=True)  # battery 15 < 20, not charging
        await coord.task(dev, "m2", min_battery=10)  # metered forbidden
        await until(lambda: len(coord.responses()) == 2)
        assert [(r.status, r.reason) for r in coord.responses()] == [
            ("declined", "low_battery"),
            ("declined", "metered"),
        ]
        probe.set(charging=True)
        await coord.task(dev, "m3", allow_metered=True)  # slow device: long simulated compute
        await until(lambda: agent.busy)
        probe.set(charging=False)
        await until(lambda: len(coord.responses()) == 4)
        assert [(r.status, r.reason) for r in coord.responses()[2:]] == [
            ("accepted", ""),
            ("aborted", "unplugged"),
        ]
        assert agent.stats.tasks_aborted == 1 and not coord.got("update")
        assert len(agent.outbox.pending()) == 0


async def test_tampered_model_aborts_without_update(broker, coord, digits) -> None:  # type: ignore[no-untyped-def]
    srv, dev = _server(), _uid()
    srv.tamper_weights = True
    async with make_agent(broker, srv, digits[0], dev) as agent:
        await agent.wait_connected(10)
        await coord.task(dev, "t1")
        await until(lambda: len(coord.responses()) == 2)
        assert [(r.status, r.reason) for r in coord.responses()] == [
            ("accepted", ""),
            ("aborted", "model_digest"),
        ]
        assert not coord.got("update") and agent.stats.model_errors == 1


async def test_outbox_resends_after_restart_until_acked(broker, coord, digits, tmp_path) -> None:  # type: ignore[no-untyped-def]
    tr = digits[0]
    part = partition_dirichlet(tr.y, 4, 0.5, seed=0)[0]
    srv, dev = _server(), _uid()
    async with make_agent(broker, srv, tr.subset(part), dev, state_dir=tmp_path) as a1:
        await a1.wait_connected(10)
        await coord.task(dev, "r1", codec=CodecConfig(topk=0.1, quant="int8"))
        await until(lambda: bool(coord.got("update")))
        residual = a1.outbox.load_residual("job-1")
        assert residual is not None and np.linalg.norm(residual) > 0
    # the first agent is gone without an ack; a fresh process on the same state dir
    async with make_agent(broker, srv, tr.subset(part), dev, state_dir=tmp_path) as a2:
        await until(lambda: len(coord.got("update")) >= 2)
        assert coord.got("update")[1] == coord.got("update")[0]  # same bytes, same update_id
        await coord.ack(dev, "r1", "duplicate")
        await until(lambda: a2.stats.updates_acked == 1)
        assert a2.outbox.pending() == []
        assert srv.not_modified == 0  # no model pull on restart
    assert not list((tmp_path / "outbox").iterdir())


def test_backoff_grows_with_jitter_and_is_capped() -> None:
    import random

    from edge_agent.execution import backoff_delay

    rng = random.Random(0)
    d = [backoff_delay(a, 0.5, 8.0, rng) for a in range(10)]
    assert 0.25 <= d[0] <= 0.5 and all(4.0 <= x <= 8.0 for x in d[5:])
    assert len({round(backoff_delay(3, 0.5, 8.0, rng), 6) for _ in range(20)}) > 1


async def test_reconnects_after_broker_restart(digits, tmp_path) -> None:  # type: ignore[no-untyped-def]
    proc, port = _start_mosquitto(tmp_path)
    srv, dev = _server(), _uid()
    try:
        agent = make_agent(
            ("127.0.0.1", port), srv, digits[0], dev, reconnect_min_s=0.05, reconnect_max_s=0.2
        )
        async with agent:
            await agent.wait_connected(10)
            proc.terminate()
            proc.wait(10)
            await until(lambda: not agent.connected)
            proc, _ = _start_mosquitto(tmp_path, port)
            await until(lambda: agent.stats.connects == 2, timeout=30)
            sent = agent.stats.telemetry_sent
            await until(lambda: agent.stats.telemetry_sent > sent)
            assert agent.stats.disconnects >= 1
    finally:
        proc.terminate()
        proc.wait(10)


async def test_task_accepted_before_a_crash_is_resumed(broker, coord, digits, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from edge_agent.outbox import FileOutbox

    srv, dev = _server(), _uid()
    now = time.time()
    accepted = Task(
        task_id="c1",
        job_id="job-1",
        device_id=dev,
        model_name="digits",
        upload_token="t",
        issued_ts=now,
        deadline_ts=now + 60,
        codec=CodecConfig(quant="none"),
    )
    expired = accepted.__replace__(task_id="c2", issued_ts=now - 100, deadline_ts=now - 50)
    FileOutbox(tmp_path).put_task("c1", encode(accepted))  # as left by a crash mid-training
    FileOutbox(tmp_path).put_task("c2", encode(expired))
    async with make_agent(broker, srv, digits[0], dev, state_dir=tmp_path) as agent:
        await until(lambda: bool(coord.got("update")) and len(coord.responses()) == 1)
        assert decode(coord.got("update")[0], Update, max_bytes=1 << 26).update_id == "c1"
        assert [(r.task_id, r.status, r.reason) for r in coord.responses()] == [
            ("c2", "aborted", "resume:expired")
        ]
        assert agent.stats.tasks_resumed == 1 and agent.outbox.pending_tasks() == []
        await coord.task(dev, "c1")  # a late redelivery of the same task: not trained again
        await until(lambda: agent.stats.tasks_duplicate == 1)
