"""Upload tokens are derived, never kept (issue 16 item 3): ``derive_token`` (HMAC-SHA256 of
the task id under the deployment's task key), the key file (``load_task_key``), the record
on ``fl.tasks`` without a token, the dispatcher filling it in, and the agent refusing a
task that has none. The integration test reads the raw ``fl.tasks`` records of a short
job with real agents on the real stack."""

from __future__ import annotations

import asyncio
import base64
import os
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from coordinator.dispatcher import dispatch_record, with_token
from coordinator.errors import CoordinatorError
from coordinator.issuing import issue_task
from coordinator.metrics import CoordinatorMetrics, counter_value
from coordinator.service import Coordinator
from coordinator.task_sink import DirectTaskSink, KafkaTaskSink
from coordinator.tasks import derive_token, load_task_key, token_matches, token_sha
from edge_agent.agent import EdgeAgent
from edge_agent.data import Dataset, load_digits_split
from edge_agent.probe import SimulatedProbe
from edge_agent.settings import AgentSettings
from schemas.messages import Task, TaskResponse, decode, encode
from tests.test_agent_memory_link import memory_agent, until
from tests.test_coordinator_integration import AUTH, _read_topic, coordinator_settings, eventually
from tests.test_coordinator_support import FakeProducer, Published

KEY = bytes(range(32))
OTHER = bytes(range(1, 33))


def metrics() -> CoordinatorMetrics:
    return CoordinatorMetrics(registry=CollectorRegistry())


def task(task_id: str = "t-1", token: str = "", ttl: float = 60.0) -> Task:
    now = time.time()
    return Task(task_id=task_id, job_id="j", device_id="d1", model_name="m", upload_token=token,
                issued_ts=min(now, now + ttl), deadline_ts=now + ttl)  # fmt: skip


class FakeTasks:
    """``TaskStore.create``/``get``/``transition`` in memory: what Redis would hold."""

    def __init__(self) -> None:
        self.records: dict[str, dict[str, Any]] = {}

    async def create(self, *, task_id: str, token: str, **kw: Any) -> None:
        self.records[task_id] = {"token_sha": token_sha(token), "state": "offered", **kw}

    async def get(self, task_id: str) -> Any:
        return None

    async def transition(self, *a: Any, **kw: Any) -> tuple[bool, str]:
        return True, "offered"


class FakeFleet:
    async def assign_task(self, *a: Any, **kw: Any) -> None:
        pass

    async def release_task(self, *a: Any, **kw: Any) -> None:
        pass


# ------------------------------------------------------------------------------ derivation


def test_the_token_is_hmac_sha256_of_the_task_id_base64url_unpadded() -> None:
    import hashlib
    import hmac

    tok = derive_token(KEY, "t-abc")
    mac = hmac.new(KEY, b"t-abc", hashlib.sha256).digest()
    assert tok == base64.urlsafe_b64encode(mac).decode().rstrip("=")
    assert len(tok) == 43 and "=" not in tok and "+" not in tok and "/" not in tok
    assert derive_token(KEY, "t-abc") == tok  # deterministic: any coordinator derives it
    assert derive_token(KEY, "t-abd") != tok  # per task
    assert derive_token(OTHER, "t-abc") != tok  # per key (deployment)
    with pytest.raises(ValueError, match="32 bytes"):
        derive_token(b"short", "t-abc")


# ------------------------------------------------------------------------------ the key file


def test_the_key_file_is_created_0600_once_and_read_back(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "task-token.key"
    key = load_task_key(path)
    assert len(key) == 32 and path.read_bytes() == key
    assert path.stat().st_mode & 0o777 == 0o600
    assert load_task_key(path) == key  # restart: the same key
    assert not [p for p in path.parent.iterdir() if p.name != path.name]  # no temp left


def test_coordinators_starting_together_end_up_with_one_key(tmp_path: Path) -> None:
    path = tmp_path / "task.key"
    got: list[bytes] = []
    barrier = threading.Barrier(8)

    def load() -> None:
        barrier.wait()
        got.append(load_task_key(path))

    threads = [threading.Thread(target=load) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 8 and set(got) == {path.read_bytes()}


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660])
def test_a_key_file_group_or_others_can_read_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "task.key"
    path.write_bytes(os.urandom(32))
    path.chmod(mode)
    with pytest.raises(CoordinatorError) as e:
        load_task_key(path)
    assert e.value.code == "task_key" and "chmod 600" in str(e.value)


@pytest.mark.parametrize("size", [0, 16, 31, 33, 64])
def test_a_key_file_of_the_wrong_length_is_refused(tmp_path: Path, size: int) -> None:
    path = tmp_path / "task.key"
    path.write_bytes(b"k" * size)
    path.chmod(0o600)
    with pytest.raises(CoordinatorError) as e:
        load_task_key(path)
    assert e.value.code == "task_key" and f"has {size} bytes" in str(e.value)


def test_an_unusable_key_path_is_a_typed_error(tmp_path: Path) -> None:
    (tmp_path / "dir.key").mkdir()
    with pytest.raises(CoordinatorError) as e:
        load_task_key(tmp_path / "dir.key")
    assert e.value.code == "task_key"


# ------------------------------------------------------------------------ issue, sink, dispatch


async def test_the_record_produced_to_fl_tasks_has_no_token() -> None:
    producer, tasks = FakeProducer(), FakeTasks()
    sink = KafkaTaskSink(producer, "fl.tasks")
    sent = await issue_task(task("t-9"), key=KEY, tasks=tasks,  # type: ignore[arg-type]
                            fleet=FakeFleet(), sink=sink)  # type: ignore[arg-type]
    ((topic, value, key, _),) = producer.sent
    assert topic == "fl.tasks" and key == b"d1"
    token = derive_token(KEY, "t-9")
    assert decode(value, Task).upload_token == "" and token.encode() not in value
    assert sent.upload_token == token  # what the device will get
    assert tasks.records["t-9"]["token_sha"] == token_sha(token)  # Redis: its sha only
    # the Kafka sink strips a token whoever hands it one
    await sink.send(task("t-10", token="plaintext"))
    assert b"plaintext" not in producer.sent[-1][1]
    assert decode(producer.sent[-1][1], Task).upload_token == ""


async def test_dispatch_record_publishes_the_token_whose_sha_redis_holds() -> None:
    producer, tasks, pub, m = FakeProducer(), FakeTasks(), Published(), metrics()
    await issue_task(task("t-1"), key=KEY, tasks=tasks,  # type: ignore[arg-type]
                     fleet=FakeFleet(), sink=KafkaTaskSink(producer, "fl.tasks"))  # type: ignore[arg-type]
    record = producer.sent[0][1]
    assert await dispatch_record(record, pub, m, key=KEY)  # another coordinator, same key
    ((topic, payload, qos),) = pub.items
    assert (topic, qos) == ("fleet/d1/task", 1)
    pushed = decode(payload, Task)
    assert token_matches(pushed.upload_token, tasks.records["t-1"]["token_sha"])
    assert pushed == with_token(decode(record, Task), KEY)  # nothing else changed
    # a coordinator of another deployment (other key) derives a token that does not match
    assert await dispatch_record(record, pub, m, key=OTHER)
    assert not token_matches(decode(pub.items[-1][1], Task).upload_token,
                             tasks.records["t-1"]["token_sha"])  # fmt: skip
    assert counter_value(m.tasks_dispatched) == 2


async def test_a_dispatcher_without_a_key_or_with_bad_records_counts_and_goes_on() -> None:
    pub, m = Published(), metrics()
    rec = encode(task())
    assert not await dispatch_record(rec, pub, m, key=None)
    assert not await dispatch_record(rec, pub, m, key=b"too short")
    assert counter_value(m.rejected, source="fl.tasks", reason="no_task_key") == 2
    assert not await dispatch_record(b"\xc1", pub, m, key=KEY)
    assert not await dispatch_record(encode(task(ttl=-1.0)), pub, m, key=KEY)
    assert counter_value(m.rejected, source="fl.tasks", reason="past_deadline") == 1
    assert pub.items == [] and counter_value(m.tasks_dispatched) == 0


async def test_the_direct_sink_pushes_the_derived_token() -> None:
    pub, m = Published(), metrics()
    await DirectTaskSink(pub, m, KEY).send(task("t-2"))
    assert decode(pub.items[0][1], Task).upload_token == derive_token(KEY, "t-2")
    await DirectTaskSink(pub, m, None).send(task("t-3"))
    assert len(pub.items) == 1
    assert counter_value(m.rejected, source="fl.tasks", reason="no_task_key") == 1


# ------------------------------------------------------------------------------ the agent


@pytest.fixture(scope="module")
def digits() -> tuple[Dataset, Dataset]:
    return load_digits_split()


async def test_the_agent_declines_a_task_without_a_token(digits: tuple[Dataset, Dataset]) -> None:
    async with memory_agent("nt1", digits[0]) as (coord, agent):
        t = Task(task_id="t-nt", job_id="job-1", device_id="nt1", model_name="digits",
                 upload_token="", issued_ts=time.time(), deadline_ts=time.time() + 60)  # fmt: skip
        assert await coord.link.publish("fleet/nt1/task", encode(t), 1)
        await until(lambda: bool(coord.got("task_status")))
        (resp,) = [decode(b, TaskResponse) for b in coord.got("task_status")]
        assert (resp.task_id, resp.status, resp.reason) == ("t-nt", "declined", "no_token")
        assert agent.stats.tasks_declined == 1 and not coord.got("update")


# ------------------------------------------------------------------------------ real stack


@pytest.mark.integration
async def test_no_token_is_ever_on_fl_tasks_during_a_job(
    stack: Any, unique_prefix: str, tmp_path: Path
) -> None:
    """Two coordinators sharing the task key (one directory, as the signing key), three real
    agents, a short job: every agent's update is accepted (the token it got matches the
    sha in Redis, whichever coordinator issued or dispatched its task), and no raw record
    on ``fl.tasks`` holds a token, empty ``upload_token`` or not."""
    s = coordinator_settings(stack, unique_prefix, tmp_path, lease_s=30.0)
    m1, m2 = metrics(), metrics()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 4)).astype(np.float32)
    data = Dataset(x, (x[:, 0] > 0).astype(np.int64))
    async with (
        Coordinator(s, metrics=m1) as c1,
        Coordinator(s, metrics=m2) as c2,
        httpx.AsyncClient(base_url=c1.rest_url, timeout=30) as http,
    ):
        body = {"model_name": f"{unique_prefix}m", "shards": 2, "concurrency": 3,
                "spec": {"family": "softmax", "n_features": 4, "n_classes": 2},
                "evaluation": {"devices": 0}, "eligibility": {"daily_cap": 1}}  # fmt: skip
        r = await http.post("/v1/jobs", json=body, headers=AUTH)
        assert r.status_code == 201, r.text
        jid = r.json()["job_id"]
        agents = [
            EdgeAgent(AgentSettings(
                device_id=f"{unique_prefix.strip('.')}-a{i}", mqtt_host=s.mqtt_host,
                mqtt_port=s.mqtt_port, api_url=c2.rest_url, telemetry_interval_s=0.3,
                inference=False,
            ), SimulatedProbe(seed=i, battery=90, charging=True, network="wifi"), data)
            for i in range(3)
        ]  # fmt: skip
        for a in agents:
            await a.start()
        try:

            async def all_acked() -> bool:
                return all(a.stats.updates_acked >= 1 for a in agents)

            await eventually(all_acked, timeout=30)
        finally:
            await asyncio.gather(*(a.stop() for a in agents))
        assert all(a.stats.updates_rejected == 0 for a in agents)
        issued = int((await c1.stats.stats(jid))["tasks_issued"])
        assert issued >= 3
        records = await _read_topic(stack.kafka_bootstrap, s.tasks_topic, issued)
    assert len(records) >= issued
    key = load_task_key(s.task_key_path)
    for value, _ in records:
        t = decode(value, Task)
        assert t.upload_token == ""
        assert derive_token(key, t.task_id).encode() not in value
    dispatched = counter_value(m1.tasks_dispatched) + counter_value(m2.tasks_dispatched)
    assert dispatched >= 3
    for m in (m1, m2):
        assert counter_value(m.rejected, source="fl.tasks", reason="no_task_key") == 0
