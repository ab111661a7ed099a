"""The agent's model client against the real coordinator REST API (FastAPI app in process,
real Redis via the coordinator's test support): verify, cache, ONNX, refuse tampering."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from coordinator.api import AppState, create_app
from coordinator.redis_client import redis_client
from edge_agent.errors import ModelVerifyError
from edge_agent.inference import OnnxModel
from edge_agent.models import ModelClient
from schemas.modelspec import forward, init_params
from tests.test_coordinator_support import make_state, redis_url

pytestmark = pytest.mark.integration
__all__ = ["redis_url"]
JOB = {
    "model_name": "agentdigits",
    "spec": {"family": "mlp", "n_features": 8, "n_classes": 3, "hidden": 5},
    "shards": 2,
    "init_seed": 3,
}


@pytest.fixture
async def coord_api(
    redis_url: str, tmp_path: Path
) -> AsyncIterator[tuple[httpx.AsyncClient, AppState]]:
    redis = redis_client(redis_url)
    state, _ = await make_state(redis, tmp_path, f"a{uuid.uuid4().hex[:8]}:")
    app = create_app(state)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://c") as c:
        r = await c.post("/v1/jobs", json=JOB, headers={"Authorization": "Bearer secret"})
        assert r.status_code == 201, r.text
        yield c, state
    await redis.aclose()


async def test_pull_verify_cache_and_onnx_from_real_coordinator(
    coord_api: tuple[httpx.AsyncClient, AppState], tmp_path: Path
) -> None:
    http, _ = coord_api
    mc = ModelClient(http, "http://c", cache_dir=tmp_path / "cache")  # key fetched once
    model = await mc.pull("agentdigits")
    spec = model.manifest.spec
    np.testing.assert_array_equal(model.params, init_params(spec, 3))
    assert model.manifest.shard_bounds[-1] == model.params.size
    again = ModelClient(http, "http://c", cache_dir=tmp_path / "cache")
    await again.pull("agentdigits")
    assert again.cache_hits == 1 and again.downloads == 0  # ETag → 304 → disk
    art = await mc.onnx("agentdigits", model.manifest.version)
    x = np.random.default_rng(0).random((4, 8)).astype(np.float32)
    np.testing.assert_allclose(
        OnnxModel.load(art.data).run(x), forward(spec, model.params, x), rtol=1e-5, atol=1e-5
    )


async def test_tampered_bytes_from_real_coordinator_are_refused(
    coord_api: tuple[httpx.AsyncClient, AppState],
) -> None:
    http, _ = coord_api

    async def tamper(resp: httpx.Response) -> None:
        if resp.request.url.path.endswith(("/weights", ".onnx")):
            await resp.aread()
            body = bytearray(resp.content)
            body[len(body) // 2] ^= 1
            resp._content = bytes(body)

    evil = httpx.AsyncClient(
        transport=http._transport, base_url="http://c", event_hooks={"response": [tamper]}
    )
    mc = ModelClient(evil, "http://c")
    with pytest.raises(ModelVerifyError) as err:
        await mc.pull("agentdigits")
    assert err.value.reason == "digest"
    with pytest.raises(ModelVerifyError):
        await mc.onnx("agentdigits", 0)
    good: Any = await ModelClient(http, "http://c").pull("agentdigits")
    assert good.manifest.version == 0
