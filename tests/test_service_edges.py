"""Service edges: what a service cannot bind or open is one typed error (one line, exit 2),
never a traceback or a headless process."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from coordinator.errors import CoordinatorError, RegistryError
from coordinator.registry import ModelRegistry
from coordinator.service import bind_rest
from coordinator.signing import Signer


def test_a_corrupt_signing_key_is_a_typed_error(tmp_path: Path) -> None:
    key = tmp_path / "k"
    key.write_bytes(b"short")
    with pytest.raises(CoordinatorError) as e:
        Signer.load_or_create(key)
    assert e.value.code == "signing_key" and "32" in str(e.value)
    good = tmp_path / "new" / "k"
    Signer.load_or_create(good)
    assert len(good.read_bytes()) == 32 and (good.stat().st_mode & 0o777) == 0o600
    Signer.load_or_create(good)  # and it loads again


def test_an_unusable_model_store_is_a_typed_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")  # a file where the directory should be (root ignores modes)
    with pytest.raises(RegistryError) as e:
        ModelRegistry(blocker / "models", Signer.load_or_create(tmp_path / "k"))
    assert e.value.code == "model_store"


def test_rest_port_in_use_or_unroutable_host_fails_at_once() -> None:
    busy = socket.create_server(("127.0.0.1", 0))
    try:
        port = busy.getsockname()[1]
        with pytest.raises(CoordinatorError) as e:
            bind_rest("127.0.0.1", port)
        assert e.value.code == "http_bind" and str(port) in str(e.value)
    finally:
        busy.close()
    with pytest.raises(CoordinatorError):
        bind_rest("203.0.113.7", 0)  # TEST-NET-3: not an address of this machine
    s = bind_rest("127.0.0.1", 0)
    s.close()


@pytest.mark.integration
def test_coordinator_cli_exits_2_when_its_rest_port_is_taken(stack: Any, tmp_path: Path) -> None:
    busy = socket.create_server(("127.0.0.1", 0))
    port = busy.getsockname()[1]
    argv = [sys.executable, "-m", "fedfleet", "coordinator", "--kafka", stack.kafka_bootstrap,
            "--mqtt", stack.mqtt_url, "--redis", stack.redis_url, "--http-port", str(port),
            "--topic-prefix", f"edge{port}.", "--model-store-dir", str(tmp_path / "m"),
            "--signing-key-path", str(tmp_path / "k"), "--task-key-path", str(tmp_path / "tk"),
            "--admin-token", "x"]  # fmt: skip
    try:
        t0 = time.monotonic()
        p = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    finally:
        busy.close()
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    lines = p.stderr.strip().splitlines()
    assert lines[-1].startswith("fedfleet: error: http_bind") and "Traceback" not in p.stderr
    assert time.monotonic() - t0 < 60


def test_predict_input_errors_are_one_line(tmp_path: Path) -> None:
    from edge_agent.data import load_features
    from edge_agent.errors import DataError

    np.savez(tmp_path / "k.npz", z=np.zeros(3))
    (tmp_path / "x.csv").write_text("a,b\n1,2\n3,4\n")
    (tmp_path / "bad.csv").write_text("a,b\n1,x\n")
    assert load_features(tmp_path / "x.csv").shape == (2, 2)  # no label column needed
    np.testing.assert_array_equal(
        load_features(tmp_path / "x.csv", label_col="b"), np.array([[1.0], [3.0]], np.float32)
    )
    for path, code in (("none.npz", "read"), ("k.npz", "keys"), ("bad.csv", "value"),
                       ("x.json", "format")):  # fmt: skip
        with pytest.raises(DataError) as e:
            load_features(tmp_path / path)
        assert e.value.code == code
    p = subprocess.run(
        [sys.executable, "-m", "fedfleet", "agent", "predict", "--api", "http://127.0.0.1:1",
         "--model", "m", "--input", str(tmp_path / "k.npz")],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith("fedfleet agent: keys:")
