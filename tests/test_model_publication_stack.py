"""The signed ``latest`` pointer on the real stack (Kafka, Mosquitto, Redis): a new version
from ``fl.models`` and a REST rollback each raise the publication; an agent that pinned the
key at enrolment (``model-signing.pub`` in its state dir, ``require_pinned_key``) follows
both and refuses older captured ``latest`` answers, also after a restart."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import zstandard
from aiokafka import AIOKafkaProducer

from coordinator.service import Coordinator
from edge_agent.errors import ModelVerifyError
from edge_agent.model_cache import KEY_FILE, ModelCache
from edge_agent.settings import AgentSettings
from schemas.messages import ShardVersion, encode
from schemas.signing import PUBLICATION_HEADER
from tests.test_coordinator_integration import coord, eventually  # noqa: F401
from tests.test_model_publication import replay

pytestmark = pytest.mark.integration
AUTH = {"Authorization": "Bearer adm"}


def _cache(url: str, state_dir: Path, http: httpx.AsyncClient) -> ModelCache:
    mc = ModelCache(AgentSettings(device_id="d1", api_url=url, state_dir=state_dir,
                                  require_pinned_key=True))  # fmt: skip
    mc.open(http)
    return mc


async def test_rollback_raises_the_publication_and_replays_are_refused(
    coord: Coordinator,  # noqa: F811
    stack: Any,
    tmp_path: Path,
) -> None:
    s = coord.settings
    name = f"{s.topic_prefix}m"
    job = {"model_name": name, "shards": 1, "concurrency": 1,
           "spec": {"family": "softmax", "n_features": 4, "n_classes": 3}}  # fmt: skip
    agent_dir = tmp_path / "agent"
    async with httpx.AsyncClient(base_url=coord.rest_url, timeout=10) as http:
        r = await http.post("/v1/jobs", json=job, headers=AUTH)
        assert r.status_code == 201, r.text
        jid, bounds = r.json()["job_id"], r.json()["shard_bounds"]
        # enrolment: the key reaches the device out of band, into its state dir
        key = (await http.get("/v1/keys/model-signing")).json()["public_key"]
        agent_dir.mkdir()
        (agent_dir / KEY_FILE).write_text(key)
        mc = _cache(coord.rest_url, agent_dir, http)

        l0 = await http.get(f"/v1/models/{name}/latest")
        assert (await mc.pull(name)).manifest.version == 0

        prod = AIOKafkaProducer(bootstrap_servers=stack.kafka_bootstrap)
        await prod.start()
        try:
            raw = np.full(bounds[1], 0.5, "<f4").tobytes()
            sv = ShardVersion(job_id=jid, model_name=name, shard=0, start=0, stop=bounds[1],
                              version=1, params=zstandard.ZstdCompressor().compress(raw),
                              updates_applied=1, ts=time.time())  # fmt: skip
            await prod.send_and_wait(s.models_topic, encode(sv), key=f"{jid}:0".encode())
        finally:
            await prod.stop()

        async def v1() -> httpx.Response | None:
            r = await http.get(f"/v1/models/{name}/latest")
            return r if r.json()["version"] == 1 else None

        l1 = await eventually(v1)
        p0, p1 = int(l0.headers[PUBLICATION_HEADER]), int(l1.headers[PUBLICATION_HEADER])
        assert p1 > p0
        assert (await mc.pull(name)).manifest.version == 1
        assert await mc.refresh_onnx(name, 1) == 1

        r = await http.post(f"/v1/models/{name}/rollback", json={"version": 0}, headers=AUTH)
        assert r.status_code == 200 and r.json()["publication"] > p1
        assert (await mc.pull(name)).manifest.version == 0  # the rollback: accepted
        assert await mc.refresh_onnx(name, 0) == 0

    # a restarted agent, and a man in the middle replaying the v1 answer (validly signed)
    for captured, reason in ((l1, "stale_latest"), (l0, "stale_latest")):
        async with replay(captured) as mitm:
            with pytest.raises(ModelVerifyError) as err:
                await _cache("http://t", agent_dir, mitm).pull(name)
        assert err.value.reason == reason
