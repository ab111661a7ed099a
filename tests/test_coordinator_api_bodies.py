"""The request bodies the OpenAPI document declares (``coordinator.api.bodies``), held to
the validation the handlers really do (``build_job``, ``RollbackBody``)."""

from __future__ import annotations

import json
from typing import Any

import httpx
import jsonschema_rs  # schemathesis's validator (the test extra)
import pytest

from coordinator.api import AppState
from coordinator.api.bodies import JOB_EXAMPLE, JOB_REQUEST, ROLLBACK_EXAMPLE, ROLLBACK_REQUEST
from coordinator.errors import JobError
from coordinator.jobs import build_job
from tests.test_coordinator_api import AUTH, JOB, SYNC_AVG, api
from tests.test_coordinator_support import redis_url

__all__ = ["api", "redis_url"]  # fixtures
Api = tuple[httpx.AsyncClient, AppState, list[Any]]
MINIMAL = {"model_name": "m", "spec": {"family": "softmax", "n_features": 4, "n_classes": 2}}
ROLLBACK_422 = 'body must be {"version": <int >= 0>}'


async def test_openapi_declares_the_job_and_rollback_bodies(api: Api) -> None:
    c, _, _ = api
    doc = (await c.get("/openapi.json")).json()

    def body(path: str, example: Any) -> dict[str, Any]:
        declared = doc["paths"][path]["post"]["requestBody"]
        assert declared["required"] is True
        media = declared["content"]["application/json"]
        assert media["example"] == example
        schema: dict[str, Any] = media["schema"]
        assert "$ref" not in json.dumps(schema)  # self-contained
        return schema

    job = body("/v1/jobs", JOB_EXAMPLE)
    assert job["type"] == "object" and job["additionalProperties"] is False
    assert job["required"] == ["model_name", "spec"]
    extra = {"job_id", "selection", "stop", "evaluation", "standardize"}
    assert set(job["properties"]) == {*JOB, *extra}
    spec = job["properties"]["spec"]
    assert spec["type"] == "object"
    assert sorted(spec["required"]) == ["family", "n_classes", "n_features"]
    assert job["properties"]["strategy"]["properties"]["name"]["enum"]
    rollback = body("/v1/models/{name}/rollback", ROLLBACK_EXAMPLE)
    for path in ("/v1/jobs", "/v1/models/{name}/rollback"):  # a body that is not UTF-8
        assert {"400", "422"} <= doc["paths"][path]["post"]["responses"].keys()
    assert rollback["type"] == "object" and rollback["required"] == ["version"]
    assert rollback["properties"]["version"] == {
        "type": "integer", "minimum": 0, "exclusiveMaximum": 1 << 31}  # fmt: skip


def _defaults(prop: dict[str, Any]) -> Any:
    """A value for a property: its declared default, or an object of its fields' defaults."""
    if "default" in prop:
        return prop["default"]
    return {k: p["default"] for k, p in prop.get("properties", {}).items() if "default" in p}


def test_the_job_schema_is_what_build_job_accepts() -> None:
    props, required = JOB_REQUEST["properties"], JOB_REQUEST["required"]
    assert sorted(MINIMAL) == sorted(required)
    build_job(MINIMAL)
    for name in required:
        with pytest.raises(JobError, match=f"missing field '{name}'"):
            build_job({k: v for k, v in MINIMAL.items() if k != name})
    assert build_job(MINIMAL, default_shards=3).spec.shard_bounds == [0, 3, 6, 10]
    for name, prop in props.items():  # every declared field is taken, at its declared default
        if name == "shards":  # no declared default: one per live aggregator
            assert "default" not in prop
            build_job({**MINIMAL, name: 2})
        elif name not in required:
            build_job({**MINIMAL, name: "j-1" if name == "job_id" else _defaults(prop)})
    # additionalProperties: false where the validation refuses unknown fields
    assert [n for n, p in props.items() if p.get("additionalProperties") is False] == [
        "eligibility", "selection", "stop"]  # fmt: skip
    for body in ({**MINIMAL, "extra": 1}, {**MINIMAL, "eligibility": {"extra": 1}},
                 {**MINIMAL, "selection": {"extra": 1}},
                 {**MINIMAL, "stop": {"extra": 1}}):  # fmt: skip
        with pytest.raises(JobError, match="unknown"):
            build_job(body)

    valid = jsonschema_rs.validator_for(JOB_REQUEST)
    for body in (MINIMAL, JOB, SYNC_AVG, JOB_EXAMPLE):
        valid.validate(body)
        build_job(body, max_shards=2, max_params=1 << 16)  # as the schemathesis test's
    bad: Any
    for bad in (
        [],
        {"spec": JOB["spec"]},
        {**JOB, "extra": 1},
        {**JOB, "shards": 0},
        {**JOB, "shards": "2"},
        {**JOB, "strategy": {"alpha": 2.0}},
        {**JOB, "spec": {"family": "cnn", "n_features": 1, "n_classes": 2}},
        {**JOB, "concurrency": 0},
        {**JOB, "selection": {"mode": "rounds"}},
        {**JOB, "selection": []},
    ):
        assert not valid.is_valid(bad), bad
        with pytest.raises(JobError):
            build_job(bad)


async def test_rollback_body_is_validated_by_its_declared_type(api: Api) -> None:
    c, _, _ = api
    valid = jsonschema_rs.validator_for(ROLLBACK_REQUEST)
    bad: Any
    for bad in ([], "3", {}, {"version": -1}, {"version": True}, {"version": 1.0},
                {"version": "1"}, {"version": None}, {"version": 1 << 31}):  # fmt: skip
        r = await c.post("/v1/models/m/rollback", json=bad, headers=AUTH)
        assert (r.status_code, r.json()) == (422, {"detail": ROLLBACK_422}), bad
        # JSON Schema counts 1.0 as an integer; the handler (strict msgspec) does not
        assert not valid.is_valid(bad) or bad == {"version": 1.0}, bad
    for good in (ROLLBACK_EXAMPLE, {"version": (1 << 31) - 1, "note": "extra fields ignored"}):
        valid.validate(good)
        r = await c.post("/v1/models/m/rollback", json=good, headers=AUTH)
        assert r.status_code == 404, r.text  # valid: past validation, the model is unknown


async def test_a_body_that_is_not_text_is_400_and_one_line(api: Api) -> None:
    c, state, published = api
    headers = {**AUTH, "Content-Type": "application/json"}
    for path in ("/v1/jobs", "/v1/models/m/rollback"):
        r = await c.post(path, content=b"\xff\xfe{", headers=headers)
        assert (r.status_code, r.json()) == (400, {"detail": "There was an error parsing the body"})
    r = await c.post("/v1/jobs", content=b"{", headers=headers)
    assert r.status_code == 422 and "JSON decode error" in r.json()["detail"], r.text
    assert published == [] and await state.jobs.ids() == []
