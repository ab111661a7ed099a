"""REST API against a real Redis (private redis-server) with in-memory Kafka/MQTT stand-ins."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import numpy as np
import onnxruntime as ort
import pytest
import zstandard

from coordinator.api import AppState, create_app
from coordinator.errors import JobError
from coordinator.jobs import build_job
from coordinator.redis_client import redis_client
from coordinator.signing import verify
from schemas.messages import ModelManifest, ShardVersion, Telemetry
from schemas.modelspec import forward
from schemas.signing import onnx_message, weights_message
from tests.test_coordinator_support import make_state, redis_url  # noqa: F401

AUTH = {"Authorization": "Bearer secret"}
JOB = {
    "model_name": "digits",
    "spec": {"family": "mlp", "n_features": 8, "n_classes": 3, "hidden": 5},
    "shards": 2,
    "strategy": {"name": "fedasync", "alpha": 0.5, "staleness": "hinge"},
    "train": {"lr": 0.05, "local_epochs": 2},
    "codec": {"topk": 0.1, "quant": "int8"},
    "concurrency": 4,
    "target_accuracy": 0.8,
    "init_seed": 3,
    "publish_every": 2,
    "eligibility": {"min_battery": 30, "allow_metered": False},
}


@pytest.fixture
async def api(
    redis_url: str,  # noqa: F811
    tmp_path: Path,
) -> AsyncIterator[tuple[httpx.AsyncClient, AppState, list[Any]]]:
    redis: Any = redis_client(redis_url)
    state, published = await make_state(redis, tmp_path, f"t{uuid.uuid4().hex[:8]}:")
    app = create_app(state)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        yield c, state, published
    await redis.aclose()


def test_build_job_validation() -> None:
    j = build_job(JOB)
    assert j.spec.shard_bounds[0] == 0 and len(j.spec.shard_bounds) == 3
    assert j.spec.strategy.alpha == 0.5 and j.eligibility.min_battery == 30
    bad: Any
    for bad in (
        [],
        {"spec": JOB["spec"]},
        {**JOB, "shards": 0},
        {**JOB, "shards": "2"},
        {**JOB, "strategy": {"alpha": 2.0}},
        {**JOB, "spec": {"family": "cnn", "n_features": 1, "n_classes": 2}},
        {**JOB, "extra": 1},
        {**JOB, "eligibility": {"min_battery": -1}},
        {**JOB, "concurrency": 0},
        {**JOB, "selection": {"mode": "rounds"}},
        {**JOB, "selection": {"mode": "sync", "over_selection": 0.5}},
        {**JOB, "selection": []},
    ):
        with pytest.raises(JobError):
            build_job(bad)


SYNC_AVG = {**JOB, "strategy": {"name": "fedavg", "buffer_size": 4},
            "selection": {"mode": "sync"}}  # fmt: skip


def test_sync_fedavg_round_size_must_be_one_number() -> None:
    """Sync FedAvg: ``concurrency`` and ``strategy.buffer_size`` both name the round size K."""
    assert build_job(SYNC_AVG).spec.concurrency == 4  # equal: fine
    with pytest.raises(JobError) as e:
        build_job({**SYNC_AVG, "concurrency": 5})
    assert e.value.code == "validation" and "buffer_size" in e.value.detail
    with pytest.raises(JobError):  # defaults differ (50 vs 10): both must be set
        build_job({**SYNC_AVG, "concurrency": 50, "strategy": {"name": "fedavg"}})
    # other strategies (K = concurrency) and async FedAvg are not affected
    build_job({**SYNC_AVG, "strategy": {"name": "fedbuff", "buffer_size": 2}})
    build_job({**SYNC_AVG, "concurrency": 5, "selection": {"mode": "async"}})


async def test_post_job_refuses_sync_fedavg_with_two_round_sizes(
    api: tuple[httpx.AsyncClient, AppState, list[Any]],
) -> None:
    c, state, published = api
    r = await c.post("/v1/jobs", json={**SYNC_AVG, "concurrency": 6}, headers=AUTH)
    assert r.status_code == 422
    assert r.json()["detail"] == (
        "sync fedavg job: concurrency (6) must equal strategy.buffer_size (4), the round size K"
    )
    assert published == [] and await state.jobs.ids() == []  # nothing stored or produced
    r = await c.post("/v1/jobs", json=SYNC_AVG, headers=AUTH)
    assert r.status_code == 201, r.text
    assert r.json()["selection"]["mode"] == "sync" and r.json()["concurrency"] == 4


async def test_jobs_lifecycle_and_auth(api: tuple[httpx.AsyncClient, AppState, list[Any]]) -> None:
    c, _, published = api
    assert (await c.post("/v1/jobs", json=JOB)).status_code == 401
    assert (
        await c.post("/v1/jobs", json=JOB, headers={"Authorization": "Bearer x"})
    ).status_code == 401
    r = await c.post("/v1/jobs", json={**JOB, "shards": 0}, headers=AUTH)
    assert r.status_code == 422 and "shard" in r.json()["detail"]
    r = await c.post("/v1/jobs", json=JOB, headers=AUTH)
    assert r.status_code == 201, r.text
    job = r.json()
    jid = job["job_id"]
    assert job["current_version"] == 0 and job["strategy"]["staleness"] == "hinge"
    assert published and published[0].job_id == jid
    assert (await c.get(f"/v1/jobs/{jid}")).json()["concurrency"] == 4
    assert [j["job_id"] for j in (await c.get("/v1/jobs")).json()["jobs"]] == [jid]
    assert (await c.get("/v1/jobs/nope")).status_code == 404
    r = await c.post(f"/v1/jobs/{jid}/stop", headers=AUTH)
    assert r.json()["status"] == "stopped" and published[-1].status == "stopped"


async def test_model_endpoints_etag_signature_rollback(
    api: tuple[httpx.AsyncClient, AppState, list[Any]],
) -> None:
    c, state, _ = api
    jid = (await c.post("/v1/jobs", json=JOB, headers=AUTH)).json()["job_id"]
    job = await state.jobs.get(jid)
    pub = (await c.get("/v1/keys/model-signing")).json()
    assert pub["alg"] == "ed25519"

    r = await c.get("/v1/models/digits/latest")
    m0 = msgspec.json.decode(r.content, type=ModelManifest)
    assert m0.version == 0 and r.headers["etag"]
    assert (
        await c.get("/v1/models/digits/latest", headers={"If-None-Match": r.headers["etag"]})
    ).status_code == 304

    w = await c.get("/v1/models/digits/versions/0/weights")
    assert w.headers["x-fedfleet-digest"] == f"sha256={m0.digest}"
    assert verify(
        pub["public_key"],
        weights_message("digits", 0, m0.digest),
        w.headers["x-fedfleet-signature"],
    )
    assert (
        await c.get(
            "/v1/models/digits/versions/0/weights", headers={"If-None-Match": w.headers["etag"]}
        )
    ).status_code == 304

    # a new version from a shard, then latest.onnx serves it
    b = job.spec.shard_bounds
    params = zstandard.ZstdCompressor().compress(np.full(b[1], 0.25, "<f4").tobytes())
    state.registry.apply(job.spec, ShardVersion(
        job_id=jid, model_name="digits", shard=0, start=0, stop=b[1], version=1, params=params,
        updates_applied=1, ts=time.time()))  # fmt: skip
    o1 = await c.get("/v1/models/digits/latest.onnx")
    assert o1.status_code == 200 and o1.headers["x-fedfleet-version"] == "1"
    digest = o1.headers["x-fedfleet-digest"].removeprefix("sha256=")
    assert verify(
        pub["public_key"], onnx_message("digits", 1, digest), o1.headers["x-fedfleet-signature"]
    )
    assert (
        await c.get("/v1/models/digits/latest.onnx", headers={"If-None-Match": o1.headers["etag"]})
    ).status_code == 304
    sess = ort.InferenceSession(o1.content, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).normal(size=(4, 8)).astype(np.float32)
    flat = np.frombuffer(
        (await c.get("/v1/models/digits/versions/1/weights")).content, "<f4"
    ).copy()
    np.testing.assert_allclose(
        sess.run(["logits"], {"x": x})[0], forward(job.spec.spec, flat, x), atol=1e-5
    )

    # rollback pins version 0: latest and latest.onnx change back
    assert (await c.post("/v1/models/digits/rollback", json={"version": 0})).status_code == 401
    assert (
        await c.post("/v1/models/digits/rollback", json={"version": 99}, headers=AUTH)
    ).status_code == 404
    assert (
        await c.post("/v1/models/digits/rollback", json={"version": "x"}, headers=AUTH)
    ).status_code == 422
    r = await c.post("/v1/models/digits/rollback", json={"version": 0}, headers=AUTH)
    assert r.status_code == 200
    assert (await c.get("/v1/models/digits/latest")).json()["version"] == 0
    o0 = await c.get("/v1/models/digits/latest.onnx", headers={"If-None-Match": o1.headers["etag"]})
    assert o0.status_code == 200 and o0.headers["x-fedfleet-version"] == "0"
    v = (await c.get("/v1/models/digits/versions")).json()
    assert v["versions"] == [0, 1] and v["pinned"] == 0 and v["latest"] == 0
    assert (await c.delete("/v1/models/digits/pin", headers=AUTH)).json()["latest"] == 1
    assert (await c.get("/v1/models/nope/latest")).status_code == 404
    assert (await c.get("/v1/models/digits/versions/7")).status_code == 404


async def test_fleet_and_devices(api: tuple[httpx.AsyncClient, AppState, list[Any]]) -> None:
    c, state, _ = api
    now = time.time()
    tel = [
        Telemetry(device_id=f"d{i}", ts=now, battery=10.0 * i, charging=False,
                  network="wifi" if i % 2 else "cellular", metered=i % 2 == 0)
        for i in range(6)
    ]  # fmt: skip
    assert await state.fleet.write_telemetry(tel) == 6
    await state.fleet.assign_task("d1", "t-x", now)
    r = (await c.get("/v1/fleet")).json()
    assert r["total"] == 6 and r["online"] == 6 and r["training_now"] == 1
    assert r["network_mix"] == {"wifi": 3, "cellular": 3}
    assert r["eligible_now"] == 2  # d3, d5: wifi, unmetered, battery >= 20, not training
    assert sum(r["battery_histogram"].values()) == 6
    page = (await c.get("/v1/devices", params={"limit": 4})).json()
    assert page["total"] == 6 and len(page["devices"]) == 4
    tr = (await c.get("/v1/devices", params={"state": "training"})).json()
    assert [d["device_id"] for d in tr["devices"]] == ["d1"]
    assert (await c.get("/v1/devices", params={"state": "bogus"})).status_code == 422
    assert (await c.get("/v1/devices/d3")).json()["network"] == "wifi"
    assert (await c.get("/v1/devices/zz")).status_code == 404
    assert (await c.get("/healthz")).status_code == 200
    assert (await c.get("/readyz")).status_code == 200
    assert b"fedfleet_coord" in (await c.get("/metrics")).content
    paths = (await c.get("/openapi.json")).json()["paths"]
    assert "/v1/jobs" in paths and "/v1/models/{name}/latest.onnx" in paths


async def test_job_specs_too_large_for_the_coordinator_are_422_and_store_nothing(
    api: tuple[httpx.AsyncClient, AppState, list[Any]],
) -> None:
    c, state, published = api
    huge = {"family": "mlp", "n_features": 1_000_000, "n_classes": 10, "hidden": 65_536}
    r = await c.post("/v1/jobs", json={"model_name": "huge", "spec": huge}, headers=AUTH)
    assert r.status_code == 422 and "parameters" in r.json()["detail"], r.text
    wide = {"family": "softmax", "n_features": 1_000_000, "n_classes": 20}  # 80 MB, 1 shard
    r = await c.post("/v1/jobs", json={"model_name": "wide", "spec": wide}, headers=AUTH)
    assert r.status_code == 422 and "shards" in r.json()["detail"], r.text
    assert published == [] and await state.jobs.ids() == []


def test_build_job_caps_parameters() -> None:
    body = {"model_name": "m", "spec": {"family": "softmax", "n_features": 100, "n_classes": 10}}
    assert build_job(body, max_params=1010).spec.shard_bounds == [0, 1010]
    with pytest.raises(JobError) as e:
        build_job(body, max_params=1009)
    assert e.value.code == "too_large" and "1,010 parameters" in e.value.detail
