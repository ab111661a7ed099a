"""The agent as a real process: kill -9 after training, restart, update delivered once;
last will; ``predict`` subcommand. REST is the fake model server over real HTTP."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import uvicorn

from edge_agent.cli import main as cli_main
from edge_agent.testing import FakeModelServer, asgi_app
from schemas.messages import DeviceStatus, Update, decode
from schemas.modelspec import forward, init_params, num_params
from tests.test_agent_mqtt import SPEC, Coord, _free_port, broker, coord, digits, until

pytestmark = pytest.mark.integration
__all__ = ["broker", "coord", "digits"]  # fixtures re-used from test_agent_mqtt


@pytest.fixture
async def http_server() -> AsyncIterator[tuple[FakeModelServer, str]]:
    srv = FakeModelServer()
    srv.publish("digits", SPEC, init_params(SPEC) + np.float32(0.01), shard_bounds=[0, 650])
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(asgi_app(srv), "127.0.0.1", port, log_level="error"))
    task = asyncio.create_task(server.serve())
    await until(lambda: server.started)
    yield srv, f"http://127.0.0.1:{port}"
    server.should_exit = True
    await task


async def _spawn(args: list[str]) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "edge_agent.cli",
        *args,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
        cwd=str(Path(__file__).resolve().parents[1]),
    )


async def test_kill_restart_delivers_update_once(  # type: ignore[no-untyped-def]
    broker, coord: Coord, digits, http_server, tmp_path: Path
) -> None:
    srv, url = http_server
    tr = digits[0]
    data = tmp_path / "d.npz"
    np.savez(data, x=tr.x[:200], y=tr.y[:200])
    dev = f"p{_free_port()}"
    args = [
        "--device-id",
        dev,
        "--mqtt",
        f"{broker[0]}:{broker[1]}",
        "--api",
        url,
        "--data",
        str(data),
        "--state-dir",
        str(tmp_path / "state"),
        "--public-key",
        srv.public_key_hex,
        "--telemetry-interval",
        "0.5",
        "--no-inference",
    ]
    p1 = await _spawn(args)
    try:
        await until(lambda: len(coord.got("telemetry")) >= 1, timeout=60)
        await coord.task(dev, "k1")
        await until(lambda: bool(coord.got("update")), timeout=60)
    finally:
        p1.send_signal(signal.SIGKILL)
        await p1.wait()
    # abrupt death: the broker publishes the last will
    await until(lambda: decode(coord.got("status")[-1], DeviceStatus).state == "offline", 60)
    assert decode(coord.got("status")[-1], DeviceStatus).reason == "lost"
    assert os.listdir(tmp_path / "state" / "outbox") == ["k1.upd"]
    p2 = await _spawn(args)
    try:
        await until(lambda: len(coord.got("update")) >= 2, timeout=60)
        u1, u2 = (decode(b, Update, max_bytes=1 << 26) for b in coord.got("update")[:2])
        assert u1 == u2 and u1.update_id == "k1"
        await coord.ack(dev, "k1")
        await until(lambda: not os.listdir(tmp_path / "state" / "outbox"), timeout=30)
        assert len(coord.responses()) == 1  # the task was accepted once, never re-trained
    finally:
        p2.send_signal(signal.SIGTERM)
        await asyncio.wait_for(p2.wait(), 30)
    await until(lambda: decode(coord.got("status")[-1], DeviceStatus).reason == "shutdown")


async def test_predict_subcommand(http_server, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    srv, url = http_server
    x = np.random.default_rng(0).random((3, 64)).astype(np.float32)
    np.savez(tmp_path / "x.npz", x=x)
    argv = [
        "predict",
        "--api",
        url,
        "--model",
        "digits",
        "--input",
        str(tmp_path / "x.npz"),
        "--public-key",
        srv.public_key_hex,
    ]
    assert await asyncio.to_thread(cli_main, argv) == 0
    want = forward(SPEC, init_params(SPEC) + np.float32(0.01), x).argmax(1).tolist()
    assert [int(v) for v in capsys.readouterr().out.split()] == want
    srv.tamper_onnx = True
    srv.tamper_weights = True
    assert await asyncio.to_thread(cli_main, argv) == 2
    assert num_params(SPEC) == 650
