"""Model pull: digest + signature verification, ETag cache, ONNX inference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge_agent.errors import ModelFetchError, ModelVerifyError
from edge_agent.models import ModelClient
from edge_agent.testing import FakeModelServer
from schemas.messages import ModelSpecMsg
from schemas.modelspec import forward, init_params

SPEC = ModelSpecMsg(family="mlp", n_features=6, n_classes=3, hidden=5)


def _server(**kw: object) -> FakeModelServer:
    srv = FakeModelServer(**kw)  # type: ignore[arg-type]
    srv.publish("m", SPEC, init_params(SPEC, seed=1) + np.float32(0.01))
    return srv


async def test_pull_verifies_and_caches_on_disk(tmp_path: Path) -> None:
    srv = _server()
    async with srv.client() as http:
        mc = ModelClient(http, srv.base_url, cache_dir=tmp_path, public_key_hex=srv.public_key_hex)
        m1 = await mc.pull("m")
        assert m1.manifest.version == 0 and mc.downloads == 1
        np.testing.assert_array_equal(m1.params, init_params(SPEC, seed=1) + np.float32(0.01))
        mc2 = ModelClient(http, srv.base_url, cache_dir=tmp_path, public_key_hex=srv.public_key_hex)
        m2 = await mc2.pull("m")  # a restarted agent: If-None-Match → 304 → disk
        assert mc2.cache_hits == 1 and mc2.downloads == 0 and srv.not_modified == 1
        np.testing.assert_array_equal(m1.params, m2.params)


async def test_corrupted_disk_cache_is_refetched(tmp_path: Path) -> None:
    srv = _server()
    async with srv.client() as http:
        mc = ModelClient(http, srv.base_url, cache_dir=tmp_path, public_key_hex=srv.public_key_hex)
        m = await mc.pull("m")
        f = tmp_path / f"{m.manifest.digest}.bin"
        f.write_bytes(b"\0" + f.read_bytes()[1:])
        m2 = await mc.pull("m")
        assert mc.downloads == 2
        np.testing.assert_array_equal(m.params, m2.params)


async def test_key_fetched_once_when_not_pinned() -> None:
    srv = _server()
    async with srv.client() as http:
        mc = ModelClient(http, srv.base_url)
        await mc.pull("m")
        await mc.pull("m")
        assert srv.requests.count("/v1/keys/model-signing") == 1


@pytest.mark.parametrize(
    "kw,reason",
    [({"tamper_weights": True}, "digest"), ({"bad_signature": True}, "signature")],
)
async def test_tampered_model_is_refused(kw: dict[str, bool], reason: str) -> None:
    srv = _server(**kw)
    async with srv.client() as http:
        mc = ModelClient(http, srv.base_url, public_key_hex=srv.public_key_hex)
        with pytest.raises(ModelVerifyError) as err:
            await mc.pull("m")
        assert err.value.reason == reason


async def test_wrong_pinned_key_refuses() -> None:
    srv, other = _server(), FakeModelServer()
    async with srv.client() as http:
        mc = ModelClient(http, srv.base_url, public_key_hex=other.public_key_hex)
        with pytest.raises(ModelVerifyError):
            await mc.pull("m")


async def test_server_errors_are_retriable_fetch_errors() -> None:
    srv = _server(fail_status=503)
    async with srv.client() as http:
        mc = ModelClient(http, srv.base_url, public_key_hex=srv.public_key_hex)
        with pytest.raises(ModelFetchError) as err:
            await mc.pull("m")
        assert err.value.retriable


async def test_onnx_predict_matches_numpy_and_tampered_onnx_refused() -> None:
    from edge_agent.inference import OnnxModel

    srv = _server()
    params = init_params(SPEC, seed=1) + np.float32(0.01)
    async with srv.client() as http:
        mc = ModelClient(http, srv.base_url, public_key_hex=srv.public_key_hex)
        art = await mc.onnx("m", 0)
        x = np.random.default_rng(0).normal(size=(4, 6)).astype(np.float32)
        np.testing.assert_allclose(
            OnnxModel.load(art.data).run(x), forward(SPEC, params, x), rtol=1e-5, atol=1e-6
        )
        assert (await mc.onnx("m", 0)) is art  # 304 → same artifact
        srv.tamper_onnx = True
        mc2 = ModelClient(http, srv.base_url, public_key_hex=srv.public_key_hex)
        with pytest.raises(ModelVerifyError):
            await mc2.onnx("m", 0)


async def test_pull_version_scores_the_version_asked_or_the_latest_when_gone(
    tmp_path: Path,
) -> None:
    srv = _server()  # v0
    srv.publish("m", SPEC, init_params(SPEC, seed=2))  # v1
    srv.publish("m", SPEC, init_params(SPEC, seed=3))  # v2 = latest
    async with srv.client() as http:
        mc = ModelClient(http, srv.base_url, cache_dir=tmp_path, public_key_hex=srv.public_key_hex)
        latest = await mc.pull("m")
        v1 = await mc.pull_version("m", 1)
        assert v1.manifest.version == 1
        np.testing.assert_array_equal(v1.params, init_params(SPEC, seed=2))
        assert "/v1/models/m/versions/1" in srv.requests
        assert [p.stem for p in tmp_path.glob("*.bin")] == [latest.manifest.digest]  # kept
        srv.drop_version("m", 0)
        assert (await mc.pull_version("m", 0)).manifest.version == 2  # gone: the latest
        assert (await mc.pull_version("m", -1)).manifest.version == 2
        assert (await mc.pull_version("m", 99)).manifest.version == 2
        srv.tamper_weights = True
        with pytest.raises(ModelVerifyError):
            await mc.pull_version("m", 1)  # same checks as every pull
