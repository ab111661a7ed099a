"""The real ``EdgeAgent`` on an in-memory link (no broker): task → update → ack, last will
on a cut, and the simulator's collaborator wrappers (``SimLink``, ``SimModels``)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from edge_agent.agent import EdgeAgent, agent_link_config
from edge_agent.crash import CRASH_POINTS, CrashPoints
from edge_agent.data import Dataset, load_digits_split
from edge_agent.errors import SettingsError
from edge_agent.link import LinkCallbacks, LinkConfig, Message
from edge_agent.memory_link import MemoryBroker, MemoryLink
from edge_agent.model_cache import ModelCache
from edge_agent.pacing import RealCompute
from edge_agent.probe import SimulatedProbe
from edge_agent.settings import AgentSettings
from edge_agent.testing import FakeModelServer
from schemas.messages import (
    CodecConfig,
    DeviceStatus,
    ModelSpecMsg,
    Task,
    TaskResponse,
    TrainConfig,
    Update,
    UploadAck,
    decode,
    encode,
)
from schemas.modelspec import init_params, num_params
from sim.hetero import SimLink, SimModels

SPEC = ModelSpecMsg(family="softmax", n_features=64, n_classes=10)


async def until(pred: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not pred():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.01)


class Coord:
    """The coordinator's MQTT side on the memory broker: records ``fleet/#``."""

    def __init__(self, broker: MemoryBroker) -> None:
        self.link = MemoryLink(
            LinkConfig(client_id="coord", subscriptions=(("fleet/#", 1),)), broker
        )
        self.msgs: dict[str, list[Message]] = {}
        self.link.bind(LinkCallbacks(on_message=self._on))

    async def _on(self, m: Message) -> None:
        self.msgs.setdefault(m.leaf, []).append(m)

    def got(self, leaf: str) -> list[bytes]:
        return [m.payload for m in self.msgs.get(leaf, [])]

    async def task(self, device: str, task_id: str) -> None:
        now = time.time()
        t = Task(
            task_id=task_id,
            job_id="job-1",
            device_id=device,
            model_name="digits",
            upload_token="tok",
            issued_ts=now,
            deadline_ts=now + 60,
            train=TrainConfig(lr=0.5, local_epochs=1),
            codec=CodecConfig(quant="none"),
        )
        assert await self.link.publish(f"fleet/{device}/task", encode(t), 1)

    async def ack(self, device: str, update_id: str, status: str = "accepted",
                  reason: str = "") -> None:  # fmt: skip
        ack = UploadAck(update_id=update_id, task_id=update_id, status=status,  # type: ignore[arg-type]
                        reason=reason)  # fmt: skip
        assert await self.link.publish(f"fleet/{device}/ack", encode(ack), 1)


@pytest.fixture(scope="module")
def digits() -> tuple[Dataset, Dataset]:
    return load_digits_split()


def _server() -> FakeModelServer:
    srv = FakeModelServer()
    srv.publish("digits", SPEC, init_params(SPEC), shard_bounds=[0, 300, num_params(SPEC)])
    return srv


def _settings(srv: FakeModelServer, device: str) -> AgentSettings:
    return AgentSettings(
        device_id=device,
        api_url=srv.base_url,
        public_key_hex=srv.public_key_hex,
        telemetry_interval_s=0.2,
        inference=False,
        reconnect_min_s=0.05,
        reconnect_max_s=0.1,
    )


def _probe() -> SimulatedProbe:
    return SimulatedProbe(seed=1, battery=90, charging=True, network="wifi", compute_speed=1e6)


@contextlib.asynccontextmanager
async def memory_agent(
    device: str, data: Dataset, **agent_kw: Any
) -> AsyncIterator[tuple[Coord, EdgeAgent]]:
    """A coordinator stand-in and one agent (``device``, on ``data``) on a fresh
    ``MemoryBroker``, both connected; the agent stops (its farewell status) on exit."""
    broker, srv = MemoryBroker(), _server()
    coord = Coord(broker)
    settings = _settings(srv, device)
    link = MemoryLink(agent_link_config(settings), broker)
    async with (
        coord.link,
        EdgeAgent(settings, _probe(), data, http=srv.client(), link=link, **agent_kw) as agent,
    ):
        await coord.link.wait_connected(5)
        await agent.wait_connected(5)
        yield coord, agent


async def test_agent_on_a_memory_link_delivers_and_leaves_a_will(
    digits: tuple[Dataset, Dataset],
) -> None:
    async with memory_agent("m1", digits[0]) as (coord, agent):
        await until(lambda: bool(coord.got("status")) and bool(coord.got("telemetry")))
        assert decode(coord.got("status")[0], DeviceStatus).state == "online"

        await coord.task("m1", "t-1")

        await until(lambda: bool(coord.got("update")))
        assert [decode(b, TaskResponse).status for b in coord.got("task_status")] == ["accepted"]
        assert decode(coord.got("update")[0], Update, max_bytes=64 << 20).update_id == "t-1"
        await coord.ack("m1", "t-1")
        await until(lambda: agent.stats.updates_acked == 1)
        assert "t-1" not in agent.outbox

        # a throttled upload is kept and sent again, not dropped
        await coord.task("m1", "t-2")
        await until(lambda: len(coord.got("update")) == 2)
        await coord.ack("m1", "t-2", "rejected", "rate_limited")
        await until(lambda: agent.stats.errors.get("upload_rate_limited") == 1)
        assert "t-2" in agent.outbox and agent.stats.updates_rejected == 0
        await coord.ack("m1", "t-2")
        await until(lambda: agent.stats.updates_acked == 2)
        assert "t-2" not in agent.outbox

        assert agent.link.cut()  # the radio goes: the broker sends the will, the agent returns
        await until(lambda: agent.stats.connects == 2 and agent.connected)
        states = [decode(b, DeviceStatus) for b in coord.got("status")]
        assert [(s.state, s.reason) for s in states[1:3]] == [("offline", "lost"), ("online", "")]
    last = decode(coord.got("status")[-1], DeviceStatus)
    assert (last.state, last.reason) == ("offline", "shutdown")
    assert agent.stats.disconnects == 1


async def test_sim_wrappers_count_update_bytes_and_wait_transfer_time(
    digits: tuple[Dataset, Dataset],
) -> None:
    broker, srv = MemoryBroker(), _server()
    coord = Coord(broker)
    settings = _settings(srv, "m2")
    kbps = lambda: 8.0  # noqa: E731 (1 kB/s)
    link = SimLink(MemoryLink(agent_link_config(settings), broker), kbps, time_scale=1e6)
    models = SimModels(ModelCache(settings), kbps, time_scale=1e6)
    async with (
        coord.link,
        EdgeAgent(
            settings, _probe(), digits[0], http=srv.client(), link=link, models=models
        ) as agent,
    ):
        await coord.link.wait_connected(5)
        await agent.wait_connected(5)
        await coord.task("m2", "t-2")
        await until(lambda: bool(coord.got("update")))

        assert link.update_bytes == len(coord.got("update")[0])
        assert agent.model_version == 0 and agent.stats.model_pulls == 1
        assert link.config.client_id == "fedfleet-agent-m2"


def test_crash_points_validate_and_default_to_never(digits: tuple[Dataset, Dataset]) -> None:
    CrashPoints().hit("after_outbox")  # no-op
    assert [CrashPoints(p).at for p in CRASH_POINTS] == list(CRASH_POINTS)
    with pytest.raises(SettingsError) as err:
        CrashPoints("nowhere")
    assert err.value.code == "crash_point" and "nowhere" in str(err.value)
    agent = EdgeAgent(AgentSettings(device_id="d"), _probe(), digits[0])
    assert agent.crash.at == "" and isinstance(agent.pacer, RealCompute)  # nothing injected


@pytest.mark.parametrize("case", ["features", "labels", "unloadable"])
async def test_data_that_cannot_train_the_job_aborts_with_a_typed_reason(
    digits: tuple[Dataset, Dataset], case: str
) -> None:
    """No trainer traceback: the task is aborted with ``data_<code>: <detail>``."""
    from edge_agent.errors import DataError

    x, y = digits[0].x, digits[0].y
    data, problem = {
        "features": (Dataset(x[:, :10], y), None),  # 10 features, the job's model takes 64
        "labels": (Dataset(x, y + 10), None),  # labels 10..19, the job has 10 classes
        "unloadable": (Dataset.none(), DataError("non_finite", "features contain NaN")),
    }[case]
    async with memory_agent(f"bad-{case}", data, data_problem=problem) as (coord, agent):
        await coord.task(agent.settings.device_id, "t-bad")
        await until(lambda: len(coord.got("task_status")) >= 2)
    responses = [decode(b, TaskResponse) for b in coord.got("task_status")]
    assert responses[-1].status == "aborted"
    want = {"features": "data_features: data has 10 features",
            "labels": "data_labels: label 19 is outside", "unloadable": "data_non_finite"}
    assert responses[-1].reason.startswith(want[case]), responses[-1].reason
    assert agent.stats.tasks_aborted == 1 and not coord.got("update")
