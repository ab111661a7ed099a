"""Bring your own model, on the real stack: models fedfleet does not ship, trained end to
end by real edge agents (PyTorch on the device) through the coordinator and two
aggregator processes, and the served ``latest.onnx`` predicts what the device's torch
model of the same version predicts.

* an ONNX file built in the test with ``onnx.helper`` (Gemm + Tanh + Gemm), uploaded with
  ``POST /v1/artifacts`` and made trainable on the devices by onnx2torch;
* a small ``torch.nn.Module`` exported with ``torch.onnx.export``, whose job names the
  module's factory (``spec.torch_module``) so the devices build the module itself.

Data: scikit-learn's ``breast_cancer`` as per-device CSVs (``fedfleet data example``),
standardised, string class names; scored on the central held-out CSV.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edge_agent.torch_models import build
from fedfleet import job_cli
from fedfleet.example_data import write_example
from fedfleet.job_body import build_body
from fedfleet.job_client import JobClient, Target
from schemas.messages import ModelSpecMsg
from stack import StackInfo
from tests.csv_fleet import ADMIN, AUTH, agents_for, fleet_services, run_job

pytestmark = pytest.mark.integration
torch = pytest.importorskip("torch")
DEVICES = 8


def helper_mlp(n_in: int = 30, hidden: int = 12, n_out: int = 2, seed: int = 0) -> bytes:
    """A graph fedfleet has no family for: Gemm (transB) -> Tanh -> Gemm, opset 17."""
    rng = np.random.default_rng(seed)
    w1 = (rng.normal(0, 1 / np.sqrt(n_in), (hidden, n_in))).astype(np.float32)
    w2 = (rng.normal(0, 1 / np.sqrt(hidden), (n_out, hidden))).astype(np.float32)
    arrays = {"fc1_w": w1, "fc1_b": np.zeros(hidden, np.float32), "fc2_w": w2,
              "fc2_b": np.zeros(n_out, np.float32)}  # fmt: skip
    inits = [numpy_helper.from_array(v, k) for k, v in arrays.items()]
    nodes = [
        helper.make_node("Gemm", ["features", "fc1_w", "fc1_b"], ["h0"], transB=1),
        helper.make_node("Tanh", ["h0"], ["h"]),
        helper.make_node("Gemm", ["h", "fc2_w", "fc2_b"], ["scores"], transB=1),
    ]
    graph = helper.make_graph(
        nodes, "user_mlp",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", n_in])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", n_out])],
        initializer=inits,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    data: bytes = model.SerializeToString()
    return data


def make_net() -> Any:
    """The user's module (a factory the devices import: ``tests.test_byom_fleet:make_net``)."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(30, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8), torch.nn.ReLU(),
        torch.nn.Linear(8, 2),
    )  # fmt: skip


def cli_body(fleet: Any, name: str, labels: list[str]) -> dict[str, Any]:
    """What ``fedfleet job create --torch-module tests.test_byom_fleet:make_net
    --input-shape 30 ...`` sends: the module exported here, uploaded, named in the body."""
    parser = argparse.ArgumentParser()
    job_cli.register(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args([
        "job", "create", "--torch-module", "tests.test_byom_fleet:make_net",
        "--input-shape", "30", "--model-name", name, "--labels", ",".join(labels),
        "--shards", "2", "--concurrency", "6", "--lr", "0.01", "--local-epochs", "2",
        "--batch-size", "8", "--optimizer", "adam", "--max-updates", "120",
        "--eval-devices", "0",
    ])  # fmt: skip
    target = Target(url=fleet.services.rest_url, token=ADMIN)
    with JobClient(target) as client:
        art = client.upload_artifact(job_cli.model_file(args), args.trainable)
    return build_body(args, art)


def _test_rows(test_csv: Path, labels: list[str]) -> tuple[np.ndarray, np.ndarray]:
    with test_csv.open(newline="") as fh:
        rows = list(csv.reader(fh))[1:]
    x = np.asarray([[float(v) for v in row[:-1]] for row in rows], dtype=np.float32)
    return x, np.asarray([labels.index(row[-1]) for row in rows])


async def _upload_body(fleet: Any, data: Path, onnx_file: bytes,
                       name: str) -> tuple[dict[str, Any], dict[str, Any]]:  # fmt: skip
    r = await fleet.http.post("/v1/artifacts", content=onnx_file, headers=AUTH)
    assert r.status_code == 201, r.text
    art = r.json()
    spec = {**art["spec"], "labels": _labels(data)}
    body = {"model_name": name, "spec": spec, "shards": 2, "concurrency": 6,
            "train": {"lr": 0.01, "local_epochs": 2, "batch_size": 8, "optimizer": "adam"},
            "stop": {"max_updates": 120}, "evaluation": {"devices": 0}}  # fmt: skip
    return art, body


async def _train(fleet: Any, data: Path, body: dict[str, Any], tag: str) -> dict[str, Any]:
    job = await run_job(fleet, agents_for(fleet, data, tag), body)
    assert job["status"] == "completed", job
    # every device built the model and trained it; "shutdown" is a task a device was still
    # training when run_job stopped the agents at the end of the job
    built = {k: v for k, v in job["aborts"].items() if k != "shutdown"}
    assert built == {}, job["aborts"]
    return job


def _labels(data: Path) -> list[str]:
    body = json.loads((data / "job.json").read_text())
    return list(body["spec"]["labels"])


async def _check_served(fleet: Any, name: str, data: Path) -> None:
    m = (await fleet.http.get(f"/v1/models/{name}/latest")).json()
    spec = msgspec.convert(m["spec"], ModelSpecMsg)
    served = (await fleet.http.get(f"/v1/models/{name}/latest.onnx")).content
    weights = (await fleet.http.get(f"/v1/models/{name}/versions/{m['version']}/weights")).content
    flat = np.frombuffer(weights, dtype="<f4").astype(np.float32)
    artifact = (await fleet.http.get(f"/v1/artifacts/{spec.artifact}")).content
    x, y = _test_rows(data / "test.csv", list(spec.labels))
    sess = ort.InferenceSession(served, providers=["CPUExecutionProvider"])
    z_onnx = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    acc = float((z_onnx.argmax(axis=1) == y).mean())
    assert acc >= 0.9, acc  # trained: breast_cancer is ~0.95+ for these models
    model = build(spec, artifact)  # what a device trains: the same version's weights
    with torch.no_grad():
        z_torch = model.logits(torch.from_numpy(flat.copy()), torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(z_torch, z_onnx, atol=1e-4, rtol=1e-4)


async def test_user_models_train_on_the_fleet_and_the_served_onnx_matches_the_device(
    stack: StackInfo, unique_prefix: str, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    write_example("breast_cancer", data, devices=DEVICES, seed=2, standardized=True)
    p = unique_prefix
    async with fleet_services(stack, tmp_path / "svc", p) as fleet:
        art, body = await _upload_body(fleet, data, helper_mlp(), f"{p}gemm")
        assert [q["name"] for q in art["spec"]["params"]] == ["fc1_w", "fc1_b", "fc2_w", "fc2_b"]
        job = await _train(fleet, data, body, "g")
        assert job["updates_applied"] >= 120
        await _check_served(fleet, f"{p}gemm", data)

        body = await asyncio.to_thread(cli_body, fleet, f"{p}module", _labels(data))
        assert body["spec"]["torch_module"] == "tests.test_byom_fleet:make_net"
        assert [q["name"] for q in body["spec"]["params"]][:2] == ["0.weight", "0.bias"]
        await _train(fleet, data, body, "m")
        await _check_served(fleet, f"{p}module", data)

        bad = await fleet.http.post("/v1/artifacts", content=b"not onnx", headers=AUTH)
        assert bad.status_code == 422 and "artifact" in bad.json()["detail"]
