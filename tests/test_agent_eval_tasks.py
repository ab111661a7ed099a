"""``eval`` and ``stats`` tasks through the real ``EdgeAgent`` on an in-memory link: the
report on ``fleet/{id}/report``, the version scored, the held-out rows, the gate, typed
data aborts; nothing in the outbox, the residual untouched, training on the other rows."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from edge_agent.agent import EdgeAgent, agent_link_config
from edge_agent.data import Dataset, check_dataset
from edge_agent.errors import DataError
from edge_agent.evaluation import score
from edge_agent.link import LinkCallbacks, LinkConfig, Message
from edge_agent.memory_link import MemoryBroker, MemoryLink
from edge_agent.model_cache import ModelCache, ModelStore
from edge_agent.probe import SimulatedProbe
from edge_agent.settings import AgentSettings
from edge_agent.testing import FakeModelServer
from schemas.messages import (
    CodecConfig,
    EvalReport,
    ModelSpecMsg,
    StatsReport,
    Task,
    TaskResponse,
    Update,
    decode,
    encode,
)
from schemas.modelspec import num_params
from sim.hetero import SimModels
from tests.test_agent_memory_link import until

SPEC = ModelSpecMsg(family="softmax", n_features=4, n_classes=3, labels=("ant", "bee", "cat"))
RNG = np.random.default_rng(0)
X = RNG.normal(size=(40, 4)).astype(np.float32)
NAMES = ("ant", "bee", "cat")
CODES = np.arange(40, dtype=np.int64) % 3
PARAMS = [RNG.normal(size=num_params(SPEC)).astype(np.float32) for _ in range(3)]


@dataclass
class Rig:
    agent: EdgeAgent
    srv: FakeModelServer
    msgs: dict[str, list[bytes]]
    device: str
    coord: MemoryLink

    async def task(self, task_id: str, kind: str = "eval", version: int = -1) -> None:
        now = time.time()
        t = Task(task_id=task_id, job_id="job-1", device_id=self.device, model_name="m",
                 upload_token=f"tok-{task_id}", issued_ts=now, deadline_ts=now + 60,
                 codec=CodecConfig(quant="none"), task_kind=kind,  # type: ignore[arg-type]
                 model_version=version)  # fmt: skip
        await self.coord.publish(f"fleet/{self.device}/task", encode(t), 1)

    def responses(self) -> list[TaskResponse]:
        return [decode(b, TaskResponse) for b in self.msgs.get("task_status", [])]

    def reports(self) -> list[bytes]:
        return self.msgs.get("report", [])


@asynccontextmanager
async def rig(
    data: Dataset,
    *,
    device: str = "e1",
    problem: DataError | None = None,
    battery: float = 90.0,
    charging: bool = True,
    wrap: bool = False,
    sim: bool = False,
    **settings: object,
) -> AsyncIterator[Rig]:
    broker, srv = MemoryBroker(), FakeModelServer()
    for p in PARAMS:
        srv.publish("m", SPEC, p)  # versions 0, 1, 2
    msgs: dict[str, list[bytes]] = {}
    coord = MemoryLink(LinkConfig(client_id="coord", subscriptions=(("fleet/#", 1),)), broker)

    async def on(m: Message) -> None:
        msgs.setdefault(m.leaf, []).append(m.payload)

    coord.bind(LinkCallbacks(on_message=on))
    s = AgentSettings(device_id=device, api_url=srv.base_url, public_key_hex=srv.public_key_hex,
                      telemetry_interval_s=0.2, inference=False, **settings)  # type: ignore[arg-type]  # fmt: skip
    probe = SimulatedProbe(seed=1, battery=battery, charging=charging, network="wifi",
                           compute_speed=1e6)  # fmt: skip
    models: ModelStore | None = None
    if wrap:
        models = LatestOnly(ModelCache(s))
    elif sim:
        models = SimModels(ModelCache(s), lambda: 1e9, 0.0)
    link = MemoryLink(agent_link_config(s), broker)
    async with coord, EdgeAgent(s, probe, data, http=srv.client(), link=link, models=models,
                                data_problem=problem) as agent:  # fmt: skip
        await coord.wait_connected(5)
        await agent.wait_connected(5)
        yield Rig(agent, srv, msgs, device, coord)


def _data() -> Dataset:
    return Dataset(X, CODES, NAMES)


async def test_eval_task_scores_the_version_asked_on_the_held_out_rows() -> None:
    async with rig(_data()) as r:
        await r.task("ev-1", version=1)
        await until(lambda: bool(r.reports()))
        report = decode(r.reports()[0], EvalReport)
        holdout = r.agent.split.holdout
        assert [x.status for x in r.responses()] == ["accepted"]
        assert report.model_version == 1 and report.upload_token == "tok-ev-1"
        assert report.num_examples == len(holdout) == 8  # 20 % of 40 rows
        rows = check_dataset(holdout, n_features=4, n_classes=3, labels=SPEC.labels)
        want = score(SPEC, PARAMS[1], rows.x, rows.y)
        assert (report.loss_sum, report.correct) == (want.loss_sum, want.correct)
        assert report.class_examples == want.class_examples
        # a direct softmax cross-entropy on the held-out rows, independent of score()
        z = rows.x.astype(np.float64) @ PARAMS[1][:12].reshape(4, 3) + PARAMS[1][12:]
        lse = np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1)
        assert report.loss_sum == pytest.approx(float((lse - z[np.arange(8), rows.y]).sum()))
        # never in the outbox, never the residual, not the current model
        assert not r.agent.outbox.pending() and not r.agent.outbox.pending_tasks()
        assert r.agent.outbox.load_residual("job-1") is None
        assert r.agent.stats.reports_sent == 1 and r.agent.model_version is None


async def test_a_version_that_is_gone_is_scored_as_the_latest() -> None:
    async with rig(_data()) as r:
        r.srv.drop_version("m", 0)
        await r.task("ev-gone", version=0)
        await until(lambda: bool(r.reports()))
        report = decode(r.reports()[0], EvalReport)
        assert (report.task_id, report.model_version) == ("ev-gone", 2)


async def test_a_store_without_versions_scores_the_latest() -> None:
    async with rig(_data(), wrap=True) as r:  # a ModelStore with pull() only
        await r.task("ev-w", version=0)
        await until(lambda: bool(r.reports()))
        assert decode(r.reports()[0], EvalReport).model_version == 2


async def test_the_simulators_store_scores_the_version_asked_for() -> None:
    async with rig(_data(), sim=True) as r:  # SimModels forwards versioned pulls
        await r.task("ev-s", version=0)
        await until(lambda: bool(r.reports()))
        assert decode(r.reports()[0], EvalReport).model_version == 0


class LatestOnly:
    """A ``ModelStore`` that can only pull the latest version (no ``ScoringStore``)."""

    def __init__(self, inner: ModelCache) -> None:
        self.inner = inner

    def open(self, http: Any) -> None:
        self.inner.open(http)

    async def pull(self, name: str) -> Any:
        return await self.inner.pull(name)

    async def refresh_onnx(self, name: str, version: int) -> int | None:
        return await self.inner.refresh_onnx(name, version)

    @property
    def version(self) -> int | None:
        return self.inner.version

    def predict(self, x: Any) -> Any:
        return self.inner.predict(x)


async def test_stats_task_summarises_the_training_rows_only() -> None:
    async with rig(_data(), device="s1") as r:
        await r.task("st-1", kind="stats")
        await until(lambda: bool(r.reports()))
        report = decode(r.reports()[0], StatsReport)
        train = r.agent.split.train
        assert report.num_rows == len(train) == 32
        assert report.label_counts == train.label_counts()
        assert sum(report.label_counts.values()) == 32 and set(report.label_counts) <= set(NAMES)
        np.testing.assert_allclose(report.feature_sum, train.x.astype(np.float64).sum(0))
        np.testing.assert_allclose(report.feature_sumsq, (train.x.astype(np.float64) ** 2).sum(0))


async def test_stats_reports_labels_the_job_does_not_know_instead_of_aborting() -> None:
    odd = Dataset(X, CODES, ("ant", "bee", "wasp"))
    async with rig(odd) as r:
        await r.task("st-odd", kind="stats")
        await until(lambda: bool(r.reports()))
        assert "wasp" in decode(r.reports()[0], StatsReport).label_counts
        await r.task("ev-odd")  # eval must map every label: a typed abort
        await until(lambda: len(r.responses()) >= 3)  # accepted, accepted, aborted
        assert r.responses()[-1].status == "aborted"
        assert r.responses()[-1].reason.startswith("data_labels: label 'wasp'")


@pytest.mark.parametrize("kind", ["eval", "stats"])
async def test_data_that_does_not_fit_aborts_with_a_typed_reason(kind: str) -> None:
    async with rig(Dataset(X[:, :3], CODES, NAMES)) as r:
        await r.task("bad", kind=kind)
        await until(lambda: len(r.responses()) >= 2)
        assert r.responses()[-1].reason.startswith("data_features: data has 3 features")
        assert not r.reports()
    problem = DataError("non_finite", "features contain NaN or Inf")
    async with rig(Dataset.none(), problem=problem) as r:
        await r.task("nan", kind=kind)
        await until(lambda: len(r.responses()) >= 2)
        assert r.responses()[-1].reason.startswith("data_non_finite")


async def test_no_held_out_rows_reports_zero_examples() -> None:
    async with rig(_data(), eval_fraction=0.0) as r:
        assert len(r.agent.split.train) == 40
        await r.task("ev-0")
        await until(lambda: bool(r.reports()))
        report = decode(r.reports()[0], EvalReport)
        assert report.num_examples == 0 and report.class_examples == [0, 0, 0]


async def test_eval_is_declined_on_a_dying_battery() -> None:
    async with rig(_data(), battery=10.0, charging=False) as r:  # floor: 20 %
        await r.task("ev-low")
        await until(lambda: bool(r.responses()))
        assert (r.responses()[0].status, r.responses()[0].reason) == ("declined", "low_battery")
        assert not r.reports()


async def test_training_uses_only_the_training_rows_with_string_labels() -> None:
    async with rig(_data()) as r:
        await r.task("tr-1", kind="train")
        await until(lambda: bool(r.msgs.get("update")))
        update = decode(r.msgs["update"][0], Update, max_bytes=64 << 20)
        assert update.num_samples == len(r.agent.split.train) == 32
        assert not r.reports()
