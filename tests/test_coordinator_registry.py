"""Registry assembly, signing, retention, rollback and ONNX equality (pure / file system)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import msgspec
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import zstandard

from coordinator.errors import NotFound, RegistryError
from coordinator.jobs import build_job
from coordinator.registry import ModelRegistry, spec_tag
from coordinator.signing import Signer, verify
from schemas.messages import JobSpec, ModelSpecMsg, ShardVersion
from schemas.modelspec import forward, init_params, num_params
from schemas.onnx_export import export
from schemas.signing import onnx_message, weights_message


def job(family: str = "mlp", shards: int = 3, name: str = "m") -> JobSpec:
    spec = {
        "family": family,
        "n_features": 5,
        "n_classes": 3,
        "hidden": 4 if family == "mlp" else 0,
    }
    return build_job({"model_name": name, "spec": spec, "shards": shards, "job_id": "j1"}).spec


def sv(j: JobSpec, shard: int, version: int, value: float) -> ShardVersion:
    a, b = j.shard_bounds[shard], j.shard_bounds[shard + 1]
    params = zstandard.ZstdCompressor().compress(np.full(b - a, value, "<f4").tobytes())
    return ShardVersion(
        job_id=j.job_id,
        model_name=j.model_name,
        shard=shard,
        start=a,
        stop=b,
        version=version,
        params=params,
        updates_applied=version,
        ts=1.0,
    )


@pytest.fixture
def reg(tmp_path: Path) -> ModelRegistry:
    return ModelRegistry(tmp_path / "store", Signer.load_or_create(tmp_path / "k"), retention=3)


def test_initial_version_is_signed_init_params(reg: ModelRegistry) -> None:
    j = job()
    m = reg.create_initial(j)
    assert m.version == 0 and m.shard_versions == [0, 0, 0]
    w = reg.weights(m)
    assert np.array_equal(np.frombuffer(w, "<f4"), init_params(j.spec, 0))
    assert m.digest == hashlib.sha256(w).hexdigest()
    assert verify(reg.signer.public_hex, weights_message("m", 0, m.digest), m.signature)
    assert not verify(reg.signer.public_hex, weights_message("m", 1, m.digest), m.signature)


def test_newest_slice_per_shard_wins(reg: ModelRegistry) -> None:
    j = job()
    reg.create_initial(j)
    m1 = reg.apply(j, sv(j, 1, 2, 1.5))
    assert m1 is not None and m1.version == 1 and m1.shard_versions == [0, 2, 0]
    assert reg.apply(j, sv(j, 1, 1, 9.0)) is None  # older slice ignored
    m2 = reg.apply(j, sv(j, 0, 1, -1.0))
    assert m2 is not None and m2.shard_versions == [1, 2, 0]
    flat = np.frombuffer(reg.weights(m2), "<f4")
    b = j.shard_bounds
    assert np.all(flat[b[0] : b[1]] == -1.0) and np.all(flat[b[1] : b[2]] == 1.5)
    assert np.array_equal(flat[b[2] :], init_params(j.spec, 0)[b[2] :])


def test_state_recovers_from_disk(tmp_path: Path) -> None:
    signer = Signer.load_or_create(tmp_path / "k")
    j = job()
    r1 = ModelRegistry(tmp_path / "s", signer)
    r1.create_initial(j)
    r1.apply(j, sv(j, 2, 4, 2.0))
    r2 = ModelRegistry(tmp_path / "s", Signer.load_or_create(tmp_path / "k"))
    assert r2.signer.public_hex == signer.public_hex
    m = r2.apply(j, sv(j, 0, 1, 3.0))
    assert m is not None and m.version == 2 and m.shard_versions == [1, 0, 4]


def test_bad_events_are_typed_errors(reg: ModelRegistry) -> None:
    j = job()
    reg.create_initial(j)
    bad_bounds = msgspec.structs.replace(sv(j, 0, 1, 1.0), stop=j.shard_bounds[1] + 1)
    with pytest.raises(RegistryError):
        reg.apply(j, bad_bounds)
    with pytest.raises(RegistryError):
        reg.apply(j, msgspec.structs.replace(sv(j, 0, 1, 1.0), params=b"junk"))
    with pytest.raises(RegistryError):
        reg.apply(j, sv(j, 0, 1, float("nan")))
    with pytest.raises(RegistryError):
        reg.apply(j, msgspec.structs.replace(sv(j, 0, 1, 1.0), shard=7))


def test_retention_rollback_and_pin(reg: ModelRegistry) -> None:
    j = job()
    reg.create_initial(j)
    for v in range(1, 6):
        reg.apply(j, sv(j, 0, v, float(v)))
    assert reg.versions("m") == [3, 4, 5]
    assert reg.latest("m").version == 5
    with pytest.raises(NotFound):
        reg.manifest("m", 1)
    reg.rollback("m", 4)
    assert reg.latest("m").version == 4
    reg.apply(j, sv(j, 0, 6, 6.0))
    reg.apply(j, sv(j, 0, 7, 7.0))
    assert 4 in reg.versions("m")  # the pinned version survives retention
    assert reg.latest("m").version == 4
    reg.unpin("m")
    assert reg.latest("m").version == 7
    blobs = list((reg.dir / "blobs").iterdir())
    assert len(blobs) == len(reg.versions("m"))


@pytest.mark.parametrize("family", ["softmax", "mlp"])
def test_onnx_matches_numpy_forward(family: str, reg: ModelRegistry) -> None:
    hidden = 6 if family == "mlp" else 0
    spec = msgspec.convert(
        {"family": family, "n_features": 7, "n_classes": 4, "hidden": hidden}, ModelSpecMsg
    )
    rng = np.random.default_rng(1)
    flat = rng.normal(size=num_params(spec)).astype(np.float32)
    data = export(spec, flat)
    onnx.checker.check_model(onnx.load_from_string(data))
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    x = rng.normal(size=(11, 7)).astype(np.float32)
    logits, probs = sess.run(["logits", "probabilities"], {"x": x})
    ref = forward(spec, flat, x)
    np.testing.assert_allclose(logits, ref, atol=1e-5)
    e = np.exp(ref - ref.max(axis=1, keepdims=True))
    np.testing.assert_allclose(probs, e / e.sum(axis=1, keepdims=True), atol=1e-5)


def test_registry_onnx_is_cached_and_signed(reg: ModelRegistry) -> None:
    m = reg.create_initial(job("softmax"))
    data, digest, sig = reg.onnx(m)
    assert digest == hashlib.sha256(data).hexdigest()
    assert verify(reg.signer.public_hex, onnx_message("m", 0, digest), sig)
    assert reg.onnx(m)[0] == data
    # cached per weights digest and spec (a standardize job's mean/std are in the graph)
    assert (reg.dir / "onnx" / f"{m.digest}.{spec_tag(m.spec)}.onnx").exists()
