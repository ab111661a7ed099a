"""The signed, monotonic ``latest`` pointer (issue 16 item 4): the signing messages, the
registry's publication counter, the agent's freshness check and its remembered highest
publication, and no trust on first use (``require_pinned_key``, ``model_key_file``).

The agent side runs against the real REST app (ASGI, a private redis-server) and replays
captured answers from an ``httpx.MockTransport``: what an attacker on the path can do.
"""

from __future__ import annotations

import re
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import msgspec
import numpy as np
import pytest

from coordinator import registry
from coordinator.api import AppState, create_app
from coordinator.redis_client import redis_client
from coordinator.registry import ModelRegistry, Pointer, next_publication
from coordinator.signing import Signer, verify
from edge_agent.agent import EdgeAgent, agent_link_config
from edge_agent.data import Dataset
from edge_agent.errors import ModelVerifyError
from edge_agent.memory_link import MemoryBroker, MemoryLink
from edge_agent.model_cache import KEY_FILE, PUBLICATIONS_FILE, ModelCache
from edge_agent.models import ModelClient, Publication, PublicationLog, check_fresh
from edge_agent.probe import SimulatedProbe
from edge_agent.settings import AgentSettings
from schemas.atomic import atomic_write
from schemas.messages import ID_PATTERN
from schemas.signing import (
    PUBLICATION_HEADER,
    PUBLICATION_SIGNATURE_HEADER,
    latest_message,
    latest_onnx_message,
    onnx_message,
    weights_message,
)
from tests.test_coordinator_registry import job, sv
from tests.test_coordinator_support import make_state, redis_url  # noqa: F401

AUTH = {"Authorization": "Bearer secret"}
JOB = {"model_name": "m", "shards": 1, "spec": {"family": "softmax", "n_features": 4,
                                                "n_classes": 3}}  # fmt: skip

# ------------------------------------------------------------------ pure


def test_latest_messages_are_their_own_domain() -> None:
    assert latest_message("m", 7, 3, "ab") == "latest/m:7:3:ab"
    assert latest_onnx_message("m", 7, 3, "ab") == "latest/m:7:3:onnx:ab"
    # a weights/ONNX message starts with a model name, and no name can start "latest/"
    assert re.match(ID_PATTERN, "latest/m") is None
    # the old shape would collide: model "m:latest:7" v3 signs what "m"'s pointer would
    assert weights_message("m:latest:7", 3, "ab") == "m:latest:7:3:ab"
    assert latest_message("m:latest:7", 7, 3, "ab") != weights_message("m:latest:7", 3, "ab")
    assert latest_onnx_message("m", 7, 3, "ab") != onnx_message("m", 3, "ab")


def test_check_fresh_refuses_lower_publications_only() -> None:
    seen = Publication(10, 5)
    check_fresh(None, Publication(1, 0))  # nothing seen yet
    check_fresh(seen, Publication(10, 5))  # the same answer again
    check_fresh(seen, Publication(11, 2))  # an operator's rollback: newer, lower version
    check_fresh(seen, Publication(12, 6))
    for got, reason in [
        (Publication(9, 4), "rollback"),  # a replayed older latest
        (Publication(9, 5), "stale_latest"),
        (Publication(3, 7), "stale_latest"),
        (Publication(10, 4), "publication_conflict"),  # one publication, one version
    ]:
        with pytest.raises(ModelVerifyError) as err:
            check_fresh(seen, got)
        assert err.value.reason == reason and not err.value.retriable


def test_publication_log_keeps_the_highest_across_restarts(tmp_path: Path) -> None:
    path = tmp_path / PUBLICATIONS_FILE
    log = PublicationLog(path)
    log.accept("m", Publication(5, 2))
    log.accept("m", Publication(4, 9))  # lower: not remembered
    log.accept("n", Publication(1, 0))
    again = PublicationLog(path)  # a restarted agent
    assert again.get("m") == Publication(5, 2) and again.get("n") == Publication(1, 0)
    with pytest.raises(ModelVerifyError):
        again.check("m", Publication(4, 1))
    again.check("m", Publication(6, 1))
    path.write_bytes(b"{not json")
    assert PublicationLog(path).get("m") is None  # unreadable: logged, starts empty
    mem = PublicationLog()
    mem.accept("m", Publication(2, 0))
    assert mem.get("m") == Publication(2, 0) and mem.path is None


def test_next_publication_grows_and_starts_at_the_clock() -> None:
    assert next_publication(None, 1000) == 1000
    assert next_publication(999, 1000) == 1000
    assert next_publication(1000, 1000) == 1001
    assert next_publication(5000, 1000) == 5001  # the clock went back: still grows


# ------------------------------------------------------------------ registry (files)


def test_registry_publication_grows_at_every_change_of_latest(tmp_path: Path) -> None:
    signer = Signer.load_or_create(tmp_path / "key")
    reg = ModelRegistry(tmp_path / "store", signer)
    j = job(shards=1)
    reg.create_initial(j)
    p0 = reg.publication("m")
    assert p0.version == 0
    reg.apply(j, sv(j, 0, 1, 0.5))  # a new version
    p1 = reg.publication("m")
    assert (p1.version, p1.publication > p0.publication) == (1, True)
    reg.rollback("m", 0)
    p2 = reg.publication("m")
    assert (p2.version, p2.publication > p1.publication) == (0, True)
    reg.rollback("m", 0)  # latest does not change: the same publication
    assert reg.publication("m") == p2
    reg.apply(j, sv(j, 0, 2, 0.7))  # v2 while pinned: latest is still v0
    assert reg.publication("m") == p2
    other = ModelRegistry(tmp_path / "store", signer)  # a second coordinator / a restart
    assert other.publication("m") == p2
    other.unpin("m")
    p3 = reg.publication("m")
    assert (p3.version, p3.publication > p2.publication) == (2, True)

    lt = reg.latest_signed("m")
    assert (lt.publication, lt.manifest.version) == (p3.publication, 2)
    msg = latest_message("m", p3.publication, 2, lt.manifest.digest)
    assert verify(signer.public_hex, msg, lt.signature)
    # a store from before publications (or a lost pointer) gets one, above the old ones
    (tmp_path / "store" / "models" / "m" / "publication").unlink()
    p4 = ModelRegistry(tmp_path / "store", signer).publication("m")
    assert p4.version == 2 and p4.publication >= p3.publication


def test_two_coordinators_changing_latest_at_once_never_share_a_publication(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(time, "time_ns", lambda: 0)  # every new publication is prev + 1
    written: list[tuple[int, int]] = []  # every pointer written, by either coordinator

    def spy(path: Path, data: bytes, **kw: Any) -> None:
        if path.name == "publication":
            ptr = msgspec.json.decode(data, type=Pointer)
            written.append((ptr.publication, ptr.version))
            time.sleep(0.001)  # widen the window a missing lock would lose
        atomic_write(path, data, **kw)

    monkeypatch.setattr(registry, "atomic_write", spy)
    signer = Signer.load_or_create(tmp_path / "key")
    regs = [ModelRegistry(tmp_path / "store", signer) for _ in range(3)]
    j = job(shards=1)
    regs[0].create_initial(j)
    regs[0].apply(j, sv(j, 0, 1, 0.5))

    def flip(reg: ModelRegistry) -> None:
        for _ in range(10):
            reg.rollback("m", 0)
            reg.unpin("m")

    threads = [threading.Thread(target=flip, args=(r,)) for r in regs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    pubs = [p for p, _ in written]
    assert pubs == sorted(set(pubs)) and len(pubs) > 2  # strictly increasing, never reused
    assert regs[1].publication("m") == Pointer(pubs[-1], 1)


# ------------------------------------------------------------------ agent vs the real API


@dataclass
class Rig:
    http: httpx.AsyncClient
    state: AppState
    jid: str
    requests: list[str]
    shard_version: int = 0

    async def new_version(self, value: float) -> None:
        j = await self.state.jobs.get(self.jid)
        assert j is not None
        self.shard_version += 1
        self.state.registry.apply(j.spec, sv(j.spec, 0, self.shard_version, value))

    def settings(self, state_dir: Path, **kw: Any) -> AgentSettings:
        return AgentSettings(device_id="d1", api_url="http://t", state_dir=state_dir, **kw)

    def cache(self, state_dir: Path, http: httpx.AsyncClient | None = None,
              **kw: Any) -> ModelCache:  # fmt: skip
        mc = ModelCache(self.settings(state_dir, **kw))
        mc.open(http or self.http)
        return mc


@pytest.fixture
async def rig(redis_url: str, tmp_path: Path) -> AsyncIterator[Rig]:  # noqa: F811
    redis: Any = redis_client(redis_url)
    state, _ = await make_state(redis, tmp_path, f"t{uuid.uuid4().hex[:8]}:")
    requests: list[str] = []

    async def record(req: httpx.Request) -> None:
        requests.append(req.url.path)

    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=create_app(state)),
        base_url="http://t",
        event_hooks={"request": [record]},
    ) as c:
        r = await c.post("/v1/jobs", json=JOB, headers=AUTH)
        assert r.status_code == 201, r.text
        yield Rig(c, state, r.json()["job_id"], requests)
    await redis.aclose()


def replay(*answers: httpx.Response) -> httpx.AsyncClient:
    """A man in the middle that serves captured answers again (their signed headers too)."""
    by_path = {a.request.url.path: a for a in answers}

    def handle(req: httpx.Request) -> httpx.Response:
        a = by_path.get(req.url.path)
        if a is None:
            return httpx.Response(404)
        keep = {k: v for k, v in a.headers.items() if k.lower().startswith(("x-fedfleet", "etag"))}
        return httpx.Response(a.status_code, headers=keep, content=a.content)

    return httpx.AsyncClient(transport=httpx.MockTransport(handle), base_url="http://t")


async def test_rollback_is_accepted_and_replayed_latests_are_refused(
    rig: Rig, tmp_path: Path
) -> None:
    key = rig.state.signer.public_hex
    agent_dir = tmp_path / "agent"
    mc = rig.cache(agent_dir, public_key_hex=key)
    l0 = await rig.http.get("/v1/models/m/latest")
    assert (await mc.pull("m")).manifest.version == 0
    p0 = int(l0.headers[PUBLICATION_HEADER])

    await rig.new_version(0.5)
    l1 = await rig.http.get("/v1/models/m/latest")
    o1 = await rig.http.get("/v1/models/m/latest.onnx")
    p1 = int(l1.headers[PUBLICATION_HEADER])
    assert p1 > p0 and o1.headers[PUBLICATION_HEADER] == str(p1)
    assert (await mc.pull("m")).manifest.version == 1
    assert await mc.refresh_onnx("m", 1) == 1
    seen = PublicationLog(agent_dir / PUBLICATIONS_FILE).get("m")
    assert seen == Publication(p1, 1)  # on disk

    # an attacker replays the older (validly signed) latest: refused, a rollback
    mitm = replay(l0)
    with pytest.raises(ModelVerifyError) as err:
        await rig.cache(agent_dir, mitm, public_key_hex=key).pull("m")
    assert err.value.reason == "rollback"

    # the operator rolls back: a new, higher publication, accepted by the same agent
    r = await rig.http.post("/v1/models/m/rollback", json={"version": 0}, headers=AUTH)
    assert r.status_code == 200 and r.json()["publication"] > p1
    p2 = r.json()["publication"]
    listing = (await rig.http.get("/v1/models/m/versions")).json()
    assert (listing["latest"], listing["publication"]) == (0, p2)
    got = await mc.pull("m")
    assert got.manifest.version == 0
    assert await mc.refresh_onnx("m", 0) == 0  # latest.onnx follows the rollback
    assert PublicationLog(agent_dir / PUBLICATIONS_FILE).get("m") == Publication(p2, 0)

    # after a restart of the cache object, the captured v1 answers are stale
    for answer in (l1, o1):
        restarted = rig.cache(agent_dir, replay(answer), public_key_hex=key)
        with pytest.raises(ModelVerifyError) as err:
            if answer is l1:
                await restarted.pull("m")
            else:
                await restarted.refresh_onnx("m", 1)
        assert err.value.reason == "stale_latest"
    # the equal publication is the same answer: accepted (a retry, another coordinator)
    l2 = await rig.http.get("/v1/models/m/latest")
    again = rig.cache(agent_dir, public_key_hex=key)
    assert (await again.manifest("m")).version == 0 and l2.headers[PUBLICATION_HEADER] == str(p2)
    await mitm.aclose()


async def test_a_pinned_key_needs_a_valid_publication_signature(rig: Rig, tmp_path: Path) -> None:
    key = rig.state.signer.public_hex
    l0 = await rig.http.get("/v1/models/m/latest")
    o0 = await rig.http.get("/v1/models/m/latest.onnx")
    assert verify(key, latest_message("m", int(l0.headers[PUBLICATION_HEADER]), 0,
                                      l0.json()["digest"]),
                  l0.headers[PUBLICATION_SIGNATURE_HEADER])  # fmt: skip

    def doctored(a: httpx.Response, **headers: str | None) -> httpx.Response:
        h = {k: v for k, v in a.headers.items() if k.lower() != "content-length"}
        for k, v in headers.items():
            h.pop(k, None)
            if v is not None:
                h[k] = v
        out = httpx.Response(a.status_code, headers=h, content=a.content)
        out.request = a.request
        return out

    bumped = str(int(l0.headers[PUBLICATION_HEADER]) + 10)
    cases = [
        (doctored(l0, **{PUBLICATION_HEADER.lower(): None}), "publication_unsigned"),
        (doctored(l0, **{PUBLICATION_SIGNATURE_HEADER.lower(): None}), "publication_unsigned"),
        (doctored(l0, **{PUBLICATION_HEADER.lower(): bumped}), "publication_signature"),
        (doctored(l0, **{PUBLICATION_HEADER.lower(): "soon"}), "publication"),
    ]
    for answer, reason in cases:
        mc = ModelClient(replay(answer), "http://t", public_key_hex=key)
        with pytest.raises(ModelVerifyError) as err:
            await mc.latest_manifest("m")
        assert err.value.reason == reason
    mc = ModelClient(replay(doctored(o0, **{PUBLICATION_HEADER.lower(): None})), "http://t",
                     public_key_hex=key)  # fmt: skip
    with pytest.raises(ModelVerifyError) as err:
        await mc.onnx("m", 0)
    assert err.value.reason == "publication_unsigned"
    # not pinned (trust on first use, the default for now): an old coordinator's answer
    # without a publication is still accepted; one with a publication is checked
    k = await rig.http.get("/v1/keys/model-signing")
    tofu = ModelClient(replay(doctored(l0, **{PUBLICATION_HEADER.lower(): None}), k), "http://t")
    assert (await tofu.latest_manifest("m")).version == 0
    tofu = ModelClient(replay(cases[2][0], k), "http://t")
    with pytest.raises(ModelVerifyError) as err:
        await tofu.latest_manifest("m")
    assert err.value.reason == "publication_signature"


async def test_require_pinned_key_refuses_trust_on_first_use(rig: Rig, tmp_path: Path) -> None:
    mc = rig.cache(tmp_path / "a", require_pinned_key=True)
    before = len(rig.requests)
    with pytest.raises(ModelVerifyError) as err:
        await mc.pull("m")
    assert err.value.reason == "key_not_pinned" and not err.value.retriable
    assert len(rig.requests) == before  # not even the manifest was asked for

    # the key enrolment wrote into the state dir is the pinned key
    (tmp_path / "a" / KEY_FILE).write_text(rig.state.signer.public_hex + "\n")
    assert (await mc.pull("m")).manifest.version == 0
    assert "/v1/keys/model-signing" not in rig.requests
    # ... and is pinned: an answer without a publication is refused
    bare = await rig.http.get("/v1/models/m/latest")
    strip = {k: v for k, v in bare.headers.items() if "publication" not in k.lower()}
    stripped = httpx.Response(200, headers=strip, content=bare.content)
    stripped.request = bare.request
    with pytest.raises(ModelVerifyError) as err:
        await rig.cache(tmp_path / "a", replay(stripped), require_pinned_key=True).pull("m")
    assert err.value.reason == "publication_unsigned"

    # a key file named in the settings; an attacker's key there refuses the real models
    other = tmp_path / "other.pub"
    other.write_text(Signer.load_or_create(tmp_path / "attacker").public_hex)
    with pytest.raises(ModelVerifyError) as err:
        await rig.cache(tmp_path / "b", model_key_file=other, require_pinned_key=True).pull("m")
    assert err.value.reason == "publication_signature"
    other.write_text("not hex")
    with pytest.raises(ModelVerifyError) as err:
        await rig.cache(tmp_path / "b", model_key_file=other).pull("m")
    assert err.value.reason == "public_key"

    # the default (not required): the key is fetched, as before
    assert (await rig.cache(tmp_path / "c").pull("m")).manifest.version == 0
    assert "/v1/keys/model-signing" in rig.requests


async def test_the_agent_counts_a_refused_model(rig: Rig, tmp_path: Path) -> None:
    settings = rig.settings(tmp_path / "a", require_pinned_key=True, inference=False)
    data = Dataset(np.zeros((4, 4), np.float32), np.zeros(4, np.int64))
    link = MemoryLink(agent_link_config(settings), MemoryBroker())
    async with EdgeAgent(settings, SimulatedProbe(seed=0), data, http=rig.http,
                         link=link) as agent:  # fmt: skip
        with pytest.raises(ModelVerifyError):
            await agent.refresh_model("m")
        assert agent.stats.model_errors == 1
        assert agent.stats.errors["model_key_not_pinned"] == 1
