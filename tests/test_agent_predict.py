"""``fedfleet agent predict`` on CSVs with and without the label column, class names,
accuracy; the model served over real HTTP by the fake model server (no broker)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import uvicorn

from edge_agent.cli import main as cli_main
from edge_agent.testing import FakeModelServer, asgi_app
from schemas.messages import ModelSpecMsg
from schemas.modelspec import forward, num_params
from tests.test_agent_memory_link import until

SPEC = ModelSpecMsg(family="softmax", n_features=2, n_classes=3, labels=("ant", "bee", "cat"),
                    input_mean=(10.0, -1.0), input_std=(2.0, 0.5))  # fmt: skip
PARAMS = np.random.default_rng(1).normal(size=num_params(SPEC)).astype(np.float32)
ROWS = np.array([[10.0, -1.0], [14.0, 0.0], [6.0, -2.0], [9.0, 1.0]], np.float32)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
async def served() -> AsyncIterator[tuple[FakeModelServer, str]]:
    srv = FakeModelServer()
    srv.publish("m", SPEC, PARAMS)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(asgi_app(srv), "127.0.0.1", port, log_level="error"))
    task = asyncio.create_task(server.serve())
    await until(lambda: server.started)
    yield srv, f"http://127.0.0.1:{port}"
    server.should_exit = True
    await task


def _argv(srv: FakeModelServer, url: str, path: Path, *extra: str) -> list[str]:
    return ["predict", "--api", url, "--model", "m", "--input", str(path),
            "--public-key", srv.public_key_hex, *extra]  # fmt: skip


async def test_predict_prints_class_names_without_a_label_column(
    served: tuple[FakeModelServer, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    srv, url = served
    p = tmp_path / "rows.csv"
    p.write_text("a,b\n" + "".join(f"{a},{b}\n" for a, b in ROWS.tolist()))
    assert await asyncio.to_thread(cli_main, _argv(srv, url, p)) == 0
    want = [SPEC.labels[i] for i in forward(SPEC, PARAMS, ROWS).argmax(1)]
    out = capsys.readouterr()
    assert out.out.split() == want and "accuracy" not in out.err


async def test_predict_reports_accuracy_when_the_label_column_is_there(
    served: tuple[FakeModelServer, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    srv, url = served
    pred = forward(SPEC, PARAMS, ROWS).argmax(1)
    truth = [SPEC.labels[i] for i in pred]
    truth[0] = SPEC.labels[(pred[0] + 1) % 3]  # one wrong
    truth[1] = "wasp"  # one the model does not know: counted wrong
    p = tmp_path / "labelled.csv"
    lines = [f"{a},{b},{t}\n" for (a, b), t in zip(ROWS.tolist(), truth, strict=True)]
    p.write_text("a,b,kind\n" + "".join(lines))
    assert await asyncio.to_thread(cli_main, _argv(srv, url, p, "--label-column", "kind")) == 0
    out = capsys.readouterr()
    assert len(out.out.split()) == 4
    assert "accuracy 0.5000 (2/4 rows); 1 rows have a label" in out.err


async def test_predict_with_the_wrong_feature_count_is_one_line(
    served: tuple[FakeModelServer, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    srv, url = served
    p = tmp_path / "three.csv"
    p.write_text("a,b,c\n1,2,3\n")
    assert await asyncio.to_thread(cli_main, _argv(srv, url, p)) == 2
    assert "has 3 features, the model takes 2" in capsys.readouterr().err
