"""Uploads over HTTP (``POST /v1/uploads``) on the real stack: the same one-use token,
dedupe and ack-after-Kafka as MQTT, the ack as the response body (nothing on the device's
MQTT ack topic), bad bodies refused with a reason; and the real agent using it."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from starlette.requests import Request

from coordinator.api.uploads import read_bounded
from coordinator.metrics import CoordinatorMetrics, counter_value
from coordinator.service import Coordinator
from edge_agent.agent import EdgeAgent
from edge_agent.data import Dataset
from edge_agent.probe import SimulatedProbe
from edge_agent.settings import AgentSettings
from schemas.messages import Task, Update, UpdateChunk, UploadAck, decode, encode
from tests.test_agent_crash import shard_records_of
from tests.test_coordinator_integration import AUTH, Device, coordinator_settings, eventually
from tests.test_coordinator_support import frame

pytestmark = pytest.mark.integration
MSGPACK = {"Content-Type": "application/msgpack"}


def _update(task: Task, bounds: list[int], token: str, update_id: str = "u1") -> Update:
    chunks = [
        UpdateChunk(shard=i, start=bounds[i], stop=bounds[i + 1], base_version=0,
                    payload=frame(bounds[i + 1] - bounds[i], i))
        for i in range(len(bounds) - 1)
    ]  # fmt: skip
    return Update(update_id=update_id, task_id=task.task_id, job_id=task.job_id,
                  device_id=task.device_id, upload_token=token, num_samples=5, chunks=chunks,
                  sent_ts=time.time())  # fmt: skip


async def test_http_upload_is_the_mqtt_upload_with_its_ack_as_the_answer(
    stack: Any, unique_prefix: str, tmp_path: Path
) -> None:
    s = coordinator_settings(stack, unique_prefix, tmp_path, lease_s=60.0)
    m = CoordinatorMetrics(registry=CollectorRegistry())
    dev = f"{unique_prefix.strip('.')}-h"
    async with (
        Coordinator(s, metrics=m) as coord,
        Device(dev, stack.mqtt_host, stack.mqtt_port) as d,
        httpx.AsyncClient(base_url=coord.rest_url, timeout=30) as http,
    ):
        await d.hello()
        await eventually(lambda: coord.fleet.get(dev))
        body = {"model_name": f"{unique_prefix}m", "shards": 2, "concurrency": 1,
                "spec": {"family": "softmax", "n_features": 4, "n_classes": 3},
                "evaluation": {"devices": 0}}  # fmt: skip
        r = await http.post("/v1/jobs", json=body, headers=AUTH)
        assert r.status_code == 201, r.text
        jid, bounds = r.json()["job_id"], r.json()["shard_bounds"]

        async def tasks() -> list[Task] | None:
            return d.got("task", Task) or None

        (task,) = await eventually(tasks)

        async def post(upd: Update | bytes) -> httpx.Response:
            data = upd if isinstance(upd, bytes) else encode(upd)
            return await http.post("/v1/uploads", content=data, headers=MSGPACK)

        r = await post(_update(task, bounds, "not-the-token"))
        assert r.status_code == 200
        ack = decode(r.content, UploadAck)
        assert (ack.status, ack.reason) == ("rejected", "bad_token")

        good = _update(task, bounds, task.upload_token)
        r = await post(good)
        assert decode(r.content, UploadAck).status == "accepted"
        # answered only after Kafka acked both shard records
        recs = await shard_records_of(stack.kafka_bootstrap, s.updates_topic, s.max_shards)
        assert sorted((u.update_id, u.shard) for u in recs) == [("u1", 0), ("u1", 1)]
        assert decode((await post(good)).content, UploadAck).status == "duplicate"
        other = _update(task, bounds, task.upload_token, update_id="u2")
        ack = decode((await post(other)).content, UploadAck)
        assert (ack.status, ack.reason) == ("rejected", "token_used")

        r = await post(b"\x93not an update")
        assert r.status_code == 422 and "not an update" in r.json()["detail"]
        assert counter_value(m.rejected, source="http_update", reason="type") == 1
        r = await http.post("/v1/uploads", content=b"", headers=MSGPACK)
        assert r.status_code == 422
        await asyncio.sleep(0.5)
        assert d.got("ack", UploadAck) == []  # HTTP answers are not also sent over MQTT
        assert (await http.get(f"/v1/jobs/{jid}")).json()["updates_accepted"] == 1
        assert len(await shard_records_of(stack.kafka_bootstrap, s.updates_topic, 2)) == 2


async def test_an_oversized_body_is_refused_while_it_streams() -> None:
    sent: list[int] = []

    def request(chunks: list[bytes], length: str | None) -> Request:
        async def receive() -> dict[str, Any]:
            body = chunks.pop(0) if chunks else b""
            sent.append(len(body))
            return {"type": "http.request", "body": body, "more_body": bool(chunks)}

        headers = [] if length is None else [(b"content-length", length.encode())]
        return Request({"type": "http", "method": "POST", "headers": headers}, receive)

    assert await read_bounded(request([b"ab", b"cd"], None), 4) == bytearray(b"abcd")
    with pytest.raises(Exception, match="over the limit") as e:
        await read_bounded(request([b"abc", b"def", b"never read"], None), 4)
    assert getattr(e.value, "status_code", None) == 413 and sent[-1] == 3  # stopped early
    with pytest.raises(Exception, match="limit 4"):
        await read_bounded(request([b"x"], "5"), 4)  # refused on the declared length


async def test_the_agent_uploads_over_http_above_its_threshold(
    stack: Any, unique_prefix: str, tmp_path: Path
) -> None:
    s = coordinator_settings(stack, unique_prefix, tmp_path, lease_s=60.0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 4)).astype(np.float32)
    data = Dataset(x, (x[:, 0] > 0).astype(np.int64))
    async with (
        Coordinator(s) as coord,
        httpx.AsyncClient(base_url=coord.rest_url, timeout=30) as http,
    ):
        body = {"model_name": f"{unique_prefix}m", "shards": 2, "concurrency": 1,
                "spec": {"family": "softmax", "n_features": 4, "n_classes": 2},
                "evaluation": {"devices": 0}, "eligibility": {"daily_cap": 1}}  # fmt: skip
        r = await http.post("/v1/jobs", json=body, headers=AUTH)
        assert r.status_code == 201, r.text
        settings = AgentSettings(
            device_id=f"{unique_prefix.strip('.')}-a", mqtt_host=s.mqtt_host,
            mqtt_port=s.mqtt_port, api_url=coord.rest_url, telemetry_interval_s=0.3,
            inference=False, http_upload_min_bytes=0,
        )  # fmt: skip
        async with EdgeAgent(settings, SimulatedProbe(seed=1), data) as agent:
            for _ in range(600):
                if agent.stats.updates_acked:
                    break
                await asyncio.sleep(0.1)
        assert agent.stats.updates_acked == 1
        assert agent.stats.updates_sent_http == agent.stats.updates_sent == 1
        jid = r.json()["job_id"]
        assert (await http.get(f"/v1/jobs/{jid}")).json()["updates_accepted"] == 1


def test_an_update_larger_than_its_job_allows_is_refused() -> None:
    import numpy as np

    from coordinator.errors import UploadRejected
    from coordinator.tasks import TaskRecord, token_sha
    from coordinator.uploads import check_upload, max_update_bytes
    from schemas import codec
    from schemas.messages import CodecConfig

    bounds = [0, 100, 200]
    assert max_update_bytes(bounds) == 5 * 200 + 2 * 4096
    # every codec setting stays inside the bound (dense float32 is the largest)
    for cfg in (CodecConfig(quant="none", zstd_level=-7), CodecConfig(topk=0.99, quant="none")):
        f = codec.encode(np.random.default_rng(0).normal(size=100).astype(np.float32), cfg)
        assert len(f) <= max_update_bytes([0, 100])
    task = Task(task_id="t1", job_id="j", device_id="d", model_name="m", upload_token="tok",
                issued_ts=1.0, deadline_ts=2.0)  # fmt: skip
    rec = TaskRecord(task_id="t1", job_id="j", device_id="d", token_sha=token_sha("tok"),
                     state="accepted", issued_ts=1.0, deadline_ts=2.0)  # fmt: skip
    ok = _update(task, bounds, "tok")
    assert check_upload(rec, ok, "d", bounds) == "accept"
    big = Update(**{**{f: getattr(ok, f) for f in ok.__struct_fields__}, "chunks": [
        UpdateChunk(shard=i, start=bounds[i], stop=bounds[i + 1], base_version=0,
                    payload=b"\0" * 6000) for i in range(2)]})  # fmt: skip
    with pytest.raises(UploadRejected, match="too_large"):
        check_upload(rec, big, "d", bounds)
