"""Compute pacers (``edge_agent.pacing``) and where ``train_and_encode`` calls them."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import pytest

from edge_agent.data import Dataset, load_digits_split
from edge_agent.errors import Aborted
from edge_agent.execution import train_and_encode
from edge_agent.models import VerifiedModel
from edge_agent.pacing import ComputePacer, RealCompute, SimulatedCompute
from edge_agent.probe import SimulatedProbe
from edge_agent.settings import AgentSettings
from edge_agent.trainers import NumpyTrainer
from schemas.messages import CodecConfig, ModelManifest, ModelSpecMsg, Task, TrainConfig
from schemas.modelspec import init_params, num_params

SPEC = ModelSpecMsg(family="softmax", n_features=64, n_classes=10)


class Delay(SimulatedProbe):
    """A simulated probe with a fixed compute delay."""

    def __init__(self, delay: float) -> None:
        super().__init__(seed=0, battery=90, charging=True, network="wifi")
        self.delay = delay

    def compute_delay(self, samples: int) -> float:
        return self.delay


def counter(fail_at: int = 0) -> tuple[list[int], Callable[[], None]]:
    calls: list[int] = []

    def recheck() -> None:
        calls.append(len(calls) + 1)
        if fail_at and len(calls) == fail_at:
            raise Aborted("unplugged")

    return calls, recheck


async def test_real_compute_returns_at_once() -> None:
    calls, recheck = counter()
    await RealCompute().after_training(10_000, recheck)
    assert calls == []


async def test_simulated_compute_waits_the_delay_in_gate_check_steps() -> None:
    calls, recheck = counter()
    await SimulatedCompute(Delay(0.05), gate_check_s=0.02).after_training(100, recheck)
    assert calls == [1, 2, 3]  # 0.02 + 0.02 + 0.01, the gate re-checked after each


async def test_simulated_compute_stops_when_the_gate_fails() -> None:
    calls, recheck = counter(fail_at=2)
    with pytest.raises(Aborted) as err:
        await SimulatedCompute(Delay(30.0), gate_check_s=0.01).after_training(100, recheck)
    assert err.value.reason == "unplugged" and calls == [1, 2]


async def test_simulated_compute_of_a_fast_device_never_rechecks() -> None:
    calls, recheck = counter()
    await SimulatedCompute(Delay(0.0)).after_training(100, recheck)
    assert calls == []


def test_simulated_compute_refuses_a_bad_period() -> None:
    with pytest.raises(ValueError):
        SimulatedCompute(Delay(1.0), gate_check_s=0)


class Recording:
    def __init__(self, probe: SimulatedProbe) -> None:
        self.probe = probe
        self.seen: list[tuple[int, bool]] = []

    async def after_training(self, samples: int, recheck: Callable[[], None]) -> None:
        recheck()
        self.seen.append((samples, self.probe.read().idle))


def _task(ttl: float = 600.0) -> Task:
    now = time.time()
    return Task(
        task_id="t", job_id="j", device_id="d", model_name="m", upload_token="x",
        issued_ts=now, deadline_ts=now + ttl, train=TrainConfig(lr=0.5, local_epochs=1),
        codec=CodecConfig(quant="none"),
    )  # fmt: skip


def _model() -> VerifiedModel:
    manifest = ModelManifest(
        model_name="m", job_id="j", version=0, shard_versions=[0], shard_bounds=[0, 650],
        spec=SPEC, digest="0", created_ts=1.0,
    )  # fmt: skip
    assert num_params(SPEC) == 650
    return VerifiedModel(manifest, init_params(SPEC))


@pytest.fixture(scope="module")
def data() -> Dataset:
    tr, _ = load_digits_split()
    return tr.subset(np.arange(96))


@pytest.mark.parametrize("with_pacer", [True, False])
async def test_train_and_encode_paces_after_training_while_busy(
    data: Dataset, with_pacer: bool
) -> None:
    probe = SimulatedProbe(seed=0, battery=90, charging=True, network="wifi")
    pacer = Recording(probe)
    enc = await train_and_encode(
        _task(), _model(), probe.read(), trainer=NumpyTrainer(), dataset=data, probe=probe,
        settings=AgentSettings(device_id="d"), residual=None,
        pacer=pacer if with_pacer else None,
    )  # fmt: skip
    assert enc.update.num_samples == len(data)
    # called once, with the samples trained, while the device still counts as training
    assert pacer.seen == ([(len(data), False)] if with_pacer else [])
    assert probe.read().idle  # training over


class UnplugWhilePacing(Delay):
    """Unplugged (battery 10 %) as soon as the simulated compute wait begins."""

    def compute_delay(self, samples: int) -> float:
        self.set(charging=False, battery=10.0)
        return self.delay


async def test_the_gate_fails_during_simulated_compute_and_aborts(data: Dataset) -> None:
    probe = UnplugWhilePacing(30.0)
    pacer: ComputePacer = SimulatedCompute(probe, gate_check_s=0.01)
    with pytest.raises(Aborted) as err:
        await train_and_encode(
            _task(), _model(), probe.read(), trainer=NumpyTrainer(), dataset=data, probe=probe,
            settings=AgentSettings(device_id="d"), residual=None, pacer=pacer,
        )  # fmt: skip
    assert err.value.reason == "unplugged"
    assert probe.read().idle  # training over
