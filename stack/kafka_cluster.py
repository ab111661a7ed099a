"""A three-node Apache Kafka cluster (KRaft, each node broker + controller), one node per
host of ``stack.netns``, for fault tests.

Each node listens on its host's address (``9092`` clients, ``9093`` the controller quorum).
Topics get replication factor 3 and ``min.insync.replicas`` 2 by default (the
coordinator also asks for them when it creates its topics), so with ``acks=all`` one node
may crash or be cut off without losing an acknowledged record or stopping writes.
Failure detection is tightened for tests: a broker is fenced after 6 s without a
heartbeat, and a follower leaves the ISR after 6 s behind (Kafka's default is 30 s, for
which producers with ``acks=all`` would stall on a partitioned follower).
``kill(i)`` is a ``kill -9`` of node ``i``; ``start_node(i)`` brings it back on its data
directory (no re-format).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from stack.errors import StackError
from stack.hosted import HostedProcess
from stack.kafka import kafka_brokers, kafka_lib_dir, kafka_version, prepare_node, random_cluster_id
from stack.netns import Host

PORT, CONTROLLER_PORT = 9092, 9093


class KafkaCluster:
    """Nodes ``1..len(hosts)`` on ``hosts``; ``start()``/``stop()`` idempotent."""

    impl = "apache-kafka"

    def __init__(self, hosts: Sequence[Host], workdir: Path, *, heap_mb: int = 384) -> None:
        lib = kafka_lib_dir()
        if lib is None:
            raise StackError("Kafka: jars not available (need java and mvn)")
        self.lib = lib
        self.version = kafka_version()
        self.hosts = list(hosts)
        self.workdir = workdir
        self.heap_mb = heap_mb
        self.nodes: list[HostedProcess] = []

    @property
    def bootstrap(self) -> str:
        return ",".join(f"{h.ip}:{PORT}" for h in self.hosts)

    def _props(self, i: int) -> str:
        h, n = self.hosts[i], len(self.hosts)
        rf, isr = min(3, n), min(2, n)
        voters = ",".join(f"{j + 1}@{x.ip}:{CONTROLLER_PORT}" for j, x in enumerate(self.hosts))
        return "\n".join([
            "process.roles=broker,controller", f"node.id={i + 1}",
            f"controller.quorum.voters={voters}",
            f"listeners=PLAINTEXT://{h.ip}:{PORT},CONTROLLER://{h.ip}:{CONTROLLER_PORT}",
            f"advertised.listeners=PLAINTEXT://{h.ip}:{PORT}",
            "controller.listener.names=CONTROLLER", "inter.broker.listener.name=PLAINTEXT",
            "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            f"log.dirs={self.workdir / f'kafka-{i + 1}' / 'data'}",
            f"offsets.topic.replication.factor={rf}", "offsets.topic.num.partitions=4",
            f"transaction.state.log.replication.factor={rf}",
            f"transaction.state.log.min.isr={isr}",
            f"default.replication.factor={rf}", f"min.insync.replicas={isr}",
            f"share.coordinator.state.topic.replication.factor={rf}",
            f"share.coordinator.state.topic.min.isr={isr}",
            "unclean.leader.election.enable=false",
            "broker.session.timeout.ms=6000", "broker.heartbeat.interval.ms=1000",
            "replica.lag.time.max.ms=6000",
            "group.initial.rebalance.delay.ms=0", "num.partitions=8",
            "auto.create.topics.enable=true", "message.max.bytes=67108864",
            "replica.fetch.max.bytes=67108864", "log.segment.bytes=67108864",
            "num.network.threads=2", "num.io.threads=2", "num.replica.fetchers=1", "",
        ])  # fmt: skip

    def start(self) -> None:
        if self.nodes:
            return
        cid, cp = random_cluster_id(), f"{self.lib}/*"
        for i, host in enumerate(self.hosts):
            d = self.workdir / f"kafka-{i + 1}"
            argv = prepare_node(d, self._props(i), cid, cp, self.heap_mb,
                                "-XX:TieredStopAtLevel=1")  # fmt: skip
            self.nodes.append(HostedProcess(host, f"kafka-{i + 1}", argv,
                                            log_path=d / "stdout.log"))  # fmt: skip
        for node in self.nodes:
            node.start()

    async def brokers(self, timeout: float = 5.0) -> int:
        """Brokers the cluster's metadata lists now (0 when none answers)."""
        try:
            return await kafka_brokers(self.bootstrap, timeout=timeout)
        except Exception:
            return 0

    async def wait_ready(self, timeout: float = 120.0, *, brokers: int | None = None) -> None:
        """Until the metadata lists ``brokers`` (default: all) brokers."""
        want = len(self.hosts) if brokers is None else brokers
        deadline = time.monotonic() + timeout
        n = 0
        while time.monotonic() < deadline:
            for node in self.nodes:
                if not node.alive():
                    raise StackError(f"Kafka: {node.name} exited; log {node.log_path}:\n"
                                     f"{node.log_tail()}")  # fmt: skip
            n = await self.brokers()
            if n >= want:
                return
            await asyncio.sleep(0.5)
        raise StackError(f"Kafka: {n}/{want} brokers after {timeout:.0f}s on {self.bootstrap}")

    def kill(self, i: int) -> None:
        """``kill -9`` node ``i`` (0-based)."""
        self.nodes[i].kill9()

    def start_node(self, i: int) -> None:
        self.nodes[i].start()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop(timeout=15.0)

    def pids(self) -> list[int]:
        return [n.pid for n in self.nodes if n.pid]


async def topic_replication(bootstrap: str, topic: str) -> dict[str, Any]:
    """Replicas per partition of ``topic`` and its ``min.insync.replicas``."""
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        (t,) = await admin.describe_topics([topic])
        cfg = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)])
        isr = next((e[1] for r in cfg for res in r.resources for e in res[4]
                    if e[0] == "min.insync.replicas"), None)  # fmt: skip
        return {"topic": topic, "replicas": sorted({len(p["replicas"]) for p in t["partitions"]}),
                "min_insync_replicas": None if isr is None else int(isr)}  # fmt: skip
    finally:
        await admin.close()
