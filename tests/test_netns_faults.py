"""Faults across hosts (``stack.netns``, ``stack.proxy``, ``loadtest.faults``).

The small version of ``fedfleet loadtest faults``: every server in a network namespace
of its own, a job running on a simulated fleet, then ``kill -9`` + restart of Redis and of
one of three Kafka nodes, and one host cut off for a while. Each time the job must resume
by itself, and the ledger (devices' acks, ``fl.updates``, the aggregators' applied-id
windows) must show 0 lost and 0 applied twice. Times are reported, never asserted.

Needs root (``ip netns``) and Apache Kafka's jars: skipped without them, an error with
``FEDFLEET_REQUIRE_REAL=1`` (CI runs as root).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from typing import Any

import httpx
import pytest

from loadtest.faults import FaultSettings, charge, cluster, run_faults
from stack import netns
from stack.kafka import kafka_lib_dir
from stack.procs import free_port
from stack.proxy import TcpProxy

REQUIRE = os.environ.get("FEDFLEET_REQUIRE_REAL", "").strip().lower() in ("1", "true", "yes")


def need_hosts() -> None:
    reason = netns.unavailable()
    if reason is None and kafka_lib_dir(fetch=False) is None:
        reason = "Apache Kafka's jars are not cached (fedfleet stack fetch)"
    if reason is not None:
        if REQUIRE:
            pytest.fail(f"FEDFLEET_REQUIRE_REAL=1 but {reason}")
        pytest.skip(reason)


async def echo_server() -> tuple[asyncio.Server, int]:
    async def echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while data := await r.read(1024):
            w.write(data)
            await w.drain()
        w.close()

    srv = await asyncio.start_server(echo, "127.0.0.1", 0)
    return srv, srv.sockets[0].getsockname()[1]


async def roundtrip(port: int, payload: bytes = b"ping") -> bytes:
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(payload)
    await w.drain()
    data = await asyncio.wait_for(r.readexactly(len(payload)), 5.0)
    w.close()
    return data


async def test_proxy_skips_a_dead_backend_and_delays_on_request() -> None:
    # Prepare: one live echo server, one port nobody listens on
    srv, port = await echo_server()
    dead = free_port()  # nobody listens there
    async with srv, TcpProxy([("127.0.0.1", dead), ("127.0.0.1", port)]) as proxy:
        # Execute / Assert: every connection lands on the live one
        for _ in range(3):
            assert await roundtrip(proxy.port) == b"ping"
        proxy.delay_s = 0.3
        t0 = asyncio.get_running_loop().time()
        assert await roundtrip(proxy.port) == b"ping"
        assert proxy.connections == 4
        assert asyncio.get_running_loop().time() - t0 >= 0.5  # 0.3 s each way


def test_charge_gives_each_fault_its_lost_and_doubled() -> None:
    # Prepare: two faults; "u3" logged during the second and never applied; one double
    # application counted by the snapshot after the first fault
    rows: list[dict[str, Any]] = [
        {"window": (100.0, 110.0), "doubled_total": [1, 0]},
        {"window": (120.0, 130.0), "doubled_total": [1, 0]},
    ]
    index = [{"u1": 101_000, "u3": 125_000}, {"u1": 101_000, "u3": 125_000}]
    applied = [{"ids": {"u1"}, "count": 2}, {"ids": {"u1", "u3"}, "count": 2}]
    # Execute
    charge(rows, {"u1", "u3"}, index, applied)
    # Assert
    assert [r["lost"] for r in rows] == [0, 1]
    assert [r["doubled"] for r in rows] == [1, 0]


def ip_out(*args: str) -> str:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=False).stdout


def test_network_partition_and_slow_link_then_nothing_left() -> None:
    need_hosts()
    serve = "import http.server as h; h.HTTPServer(('{ip}', 8080), h.BaseHTTPRequestHandler)"
    with netns.Network(["a", "b"]) as net:
        ip = net["b"].ip
        argv = [sys.executable, "-c", serve.format(ip=ip) + ".serve_forever()"]
        srv = subprocess.Popen(net["b"].argv(argv), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)  # fmt: skip
        try:
            with httpx.Client(timeout=2.0) as http:
                for _ in range(50):  # the server binds b's address, reachable from here
                    try:
                        http.get(f"http://{ip}:8080/")
                        break
                    except httpx.TransportError:
                        time.sleep(0.1)
                else:
                    pytest.fail("server in host b never answered")
                net.partition("b")
                with pytest.raises(httpx.TransportError):
                    http.get(f"http://{ip}:8080/", timeout=1.0)
                net.heal("b")
                http.get(f"http://{ip}:8080/")
                net.shape("b", rate_kbit=256)
                http.get(f"http://{ip}:8080/")
                net.unshape("b")
            probe = f"import socket; socket.create_connection(('{ip}', 8080), 2)"
            other = subprocess.run(net["a"].argv([sys.executable, "-c", probe]), check=False)
            assert other.returncode == 0  # host a reaches host b
        finally:
            srv.kill()
            srv.wait()
    assert net.prefix not in ip_out("netns", "list")
    assert net.prefix not in ip_out("-br", "link")


@pytest.mark.integration
@pytest.mark.timeout(420)
async def test_redis_kafka_broker_and_partition_faults_lose_nothing() -> None:
    need_hosts()
    s = FaultSettings(devices=30, concurrency=12, coordinators=2, aggregators=2,
                      faults=("redis", "kafka", "partition"), warmup_updates=10, down_s=5.0,
                      partition_s=12.0, between_s=4.0, resume_timeout_s=90.0)  # fmt: skip
    async with cluster(s, lambda _m: None) as c:
        prefix = c.net.prefix
        res = await run_faults(c, s, quiet=True)
    r = res["result"]
    rows = {x["fault"]: x for x in r["faults"]}
    assert set(rows) == {"redis", "kafka", "partition"}
    for x in rows.values():  # the job resumed by itself after each fault
        assert x["resume_s"] is not None, x
        assert "error" not in x and not x["crashed"], x
    assert r["acked"] > 0
    assert r["lost"] == 0 and r["doubled"] == 0, r["shards"]
    assert r["shards_agree"]
    assert all(sh["rejected_after_ack"] == 0 and sh["applied_not_logged"] == 0
               for sh in r["shards"])  # fmt: skip
    assert r["replication"]["replicas"] == [3] and r["replication"]["min_insync_replicas"] == 2
    assert res["ok"], r["faults"]
    assert prefix not in await asyncio.to_thread(ip_out, "netns", "list")  # all torn down
