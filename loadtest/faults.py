"""``faults``: scripted faults across hosts during a running job; nothing acknowledged is
lost and nothing is applied twice.

Every server runs on a host of its own (``stack.netns``: a network namespace with its own
10.x address on one bridge): Redis, Mosquitto, three Kafka nodes (KRaft, topics
replicated 3 times, ``min.insync.replicas`` 2, producers ``acks=all``), two coordinators
and ``aggregators`` aggregator shards. The driver and the simulated fleet stay in the
root namespace; the devices reach the coordinators' REST APIs through a round-robin
front (``stack.proxy.TcpProxy``, as a load balancer would) and Mosquitto through a
second proxy that can delay their traffic. The stack runs insecure (anonymous MQTT, plain
HTTP; a banner says so): the secure mode's certificates, enrolment records and the
broker's password file would each need to span the hosts, and are tested elsewhere.

After a warm-up, the faults run one after the other, each followed by ``between_s`` of
training:

==============  ==========================================================================
``redis``       ``kill -9`` redis-server, down ``down_s``, restarted on its append-only file
``kafka``       ``kill -9`` one Kafka node (default ``kafka-2``), down ``down_s``, restarted
``coordinator`` ``kill -9`` one of the two coordinators, down ``down_s``, restarted
``aggregator``  ``kill -9`` one aggregator, down ``down_s`` (past its session timeout: a
                survivor takes its partitions over), restarted
``mosquitto``   ``kill -9`` Mosquitto, down ``down_s``, restarted (no persistence: every
                client reconnects and subscribes again)
``partition``   one host's link down for ``partition_s``, then up (default ``kafka-1``;
                ``partition:agg-2`` names another host)
``slow``        for ``slow_s``: the host's link capped at ``slow_kbit`` with a short queue
                that drops what overflows (``tbf``), and ``slow_delay_ms`` added each way to
                the devices' MQTT traffic (default host ``mosquitto``). ``netem`` is not
                used: kernels without ``sch_netem`` refuse it
==============  ==========================================================================

Per fault: **resume_s** = seconds from the recovery (restart issued, link back) until every
shard has applied a new update (REST ``shards[].updates_applied``), within
``resume_timeout_s``. At the end the job stops, the fleet stops, the aggregators drain and
stop gracefully, and ``loadtest.failover.ledger`` compares, per shard, the update ids on
``fl.updates``, the ids the devices saw acknowledged and the final checkpoint's applied-id
window: **lost** must be 0 and **doubled** 0. Lost ids are charged to the fault during
which they were logged (record timestamps); doubled applications to the fault after which
a checkpoint snapshot first counted them.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from loadtest.failover import (
    FailoverSettings,
    aggregator_args,
    applied_ids,
    fault_job,
    ledger,
    log_index,
    refused,
)
from loadtest.runner import Progress, Timeline
from sim.fleet import FleetSpec
from sim.load_services import Api
from sim.pool import FleetPool
from stack.errors import StackError
from stack.hosted import HostedMosquitto, HostedProcess, HostedRedis
from stack.kafka_cluster import KafkaCluster, topic_replication
from stack.netns import Network
from stack.proxy import TcpProxy

FAULTS = ("redis", "kafka", "coordinator", "aggregator", "mosquitto", "partition", "slow")
DEFAULT_TARGET = {"kafka": "kafka-2", "coordinator": "coord-1", "aggregator": "agg-1",
                  "partition": "kafka-1", "slow": "mosquitto", "redis": "redis",
                  "mosquitto": "mosquitto"}  # fmt: skip
HTTP_PORT, METRICS_PORT = 8000, 9100


@dataclass(frozen=True, kw_only=True)
class FaultSettings:
    devices: int = 60
    concurrency: int = 20
    coordinators: int = 2
    aggregators: int = 3  # also the job's shard count
    faults: tuple[str, ...] = FAULTS  # a name, or name:host (partition:agg-2)
    warmup_updates: int = 30  # applied on every shard before the first fault
    down_s: float = 10.0  # a killed server stays down this long
    partition_s: float = 30.0
    slow_s: float = 30.0
    slow_kbit: int = 256
    slow_delay_ms: int = 200
    between_s: float = 10.0  # training after a fault resumed, before the next one
    resume_timeout_s: float = 120.0
    session_timeout_ms: int = 6000
    kafka_heap_mb: int = 384
    seed: int = 0

    def __post_init__(self) -> None:
        for f in self.faults:
            if f.split(":")[0] not in FAULTS:
                raise StackError(f"faults: unknown fault {f!r} (one of {', '.join(FAULTS)})")
        if self.coordinators < 1 or self.aggregators < 1:
            raise StackError("faults: at least one coordinator and one aggregator")

    def target(self, fault: str) -> tuple[str, str]:
        kind, _, host = fault.partition(":")
        return kind, host or DEFAULT_TARGET[kind]

    @property
    def budget_s(self) -> float:
        """Upper bound of the fault phases (the run stops itself past it)."""
        per = {"partition": self.partition_s, "slow": self.slow_s}
        return sum(per.get(self.target(f)[0], self.down_s) + self.resume_timeout_s
                   + self.between_s + 60 for f in self.faults)  # fmt: skip


# --------------------------------------------------------------------------- environment
@dataclass
class Cluster:
    """Every host's server, the fronts, and the admin API (through the REST front)."""

    net: Network
    redis: HostedRedis
    mqtt: HostedMosquitto
    kafka: KafkaCluster
    coords: list[HostedProcess]
    aggs: list[HostedProcess]
    rest: TcpProxy
    mqtt_front: TcpProxy
    http: httpx.AsyncClient
    api: Api
    workdir: Path
    run_id: str
    topic_prefix: str

    @property
    def checkpoints(self) -> Path:
        return self.workdir / "checkpoints"

    def by_host(self, name: str) -> list[HostedProcess]:
        procs = [self.redis, self.mqtt, *self.kafka.nodes, *self.coords, *self.aggs]
        return [p for p in procs if p.host.name == name]

    def dead(self) -> list[str]:
        procs = [self.redis, self.mqtt, *self.kafka.nodes, *self.coords, *self.aggs]
        return [p.name for p in procs if not p.alive()]

    def restart_dead(self) -> None:
        for p in [self.redis, self.mqtt, *self.kafka.nodes, *self.coords, *self.aggs]:
            if not p.alive():
                p.start()


def _child_env(workdir: Path) -> dict[str, str]:
    import os

    # never a developer's stack file: its secure settings would be read as defaults
    return dict(os.environ, PYTHONUNBUFFERED="1",
                FEDFLEET_STACK_FILE=str(workdir / "no-stack-file.json"))  # fmt: skip


@asynccontextmanager
async def cluster(s: FaultSettings, log: Callable[[str], None], *,
                  keep_logs: Path | None = None) -> AsyncIterator[Cluster]:  # fmt: skip
    """Hosts, servers and services up; everything torn down on exit (even on failure).
    ``keep_logs``: copy every server's and service's log there first."""
    run_id = uuid.uuid4().hex[:6]
    prefix = f"nf{run_id}."
    token = f"nf-{uuid.uuid4().hex}"
    names = ["redis", "mosquitto", "kafka-1", "kafka-2", "kafka-3",
             *(f"coord-{i + 1}" for i in range(s.coordinators)),
             *(f"agg-{i + 1}" for i in range(s.aggregators))]  # fmt: skip
    async with AsyncExitStack() as stack:
        workdir = Path(tempfile.mkdtemp(prefix=f"fedfleet-faults-{run_id}-"))
        stack.callback(shutil.rmtree, workdir, ignore_errors=True)
        if keep_logs is not None:  # runs after every process stopped, before the rmtree
            stack.callback(copy_logs, workdir, keep_logs)
        net = await stack.enter_async_context(Network(names))  # torn down last
        log(f"hosts: {len(names)} namespaces {net.prefix}-* on {net.subnet}")
        env = _child_env(workdir)
        redis = HostedRedis(net["redis"], workdir / "redis")
        mqtt = HostedMosquitto(net["mosquitto"], workdir / "mosquitto")
        kafka = KafkaCluster([net[f"kafka-{i}"] for i in (1, 2, 3)], workdir / "kafka",
                             heap_mb=s.kafka_heap_mb)  # fmt: skip
        for srv in (redis, mqtt, kafka):
            stack.callback(srv.stop)
            srv.start()
        await redis.wait_ready()
        await mqtt.wait_ready()
        await kafka.wait_ready(180.0)
        log(f"servers: redis {redis.url}, mosquitto {mqtt.host.ip}:{mqtt.port}, "
            f"kafka {kafka.version} {kafka.bootstrap}")  # fmt: skip
        keys = workdir / "keys"
        coords = []
        for i in range(s.coordinators):
            h = net[f"coord-{i + 1}"]
            argv = [sys.executable, "-m", "fedfleet", "coordinator",
                    "--kafka", kafka.bootstrap, "--mqtt", f"mqtt://{mqtt.host.ip}:{mqtt.port}",
                    "--redis", redis.url, "--http-host", h.ip, "--http-port", str(HTTP_PORT),
                    "--topic-prefix", prefix, "--admin-token", token, "--client-id", h.name,
                    "--model-store-dir", str(workdir / h.name / "models"),
                    "--signing-key-path", str(keys / "model-signing.ed25519"),
                    "--task-key-path", str(keys / "task-token.key"),
                    "--retention", "500"]  # fmt: skip
            c = HostedProcess(h, h.name, argv, log_path=workdir / f"{h.name}.log", env=env)
            stack.callback(c.stop)
            coords.append(c)
            c.start()  # one at a time: the first one writes the shared keys
            await wait_rest(c, 120.0)
        aggs = []
        extra = aggregator_args(FailoverSettings(session_timeout_ms=s.session_timeout_ms))
        for i in range(s.aggregators):
            h = net[f"agg-{i + 1}"]
            argv = [sys.executable, "-m", "fedfleet", "aggregator", "--kafka", kafka.bootstrap,
                    "--topic-prefix", prefix, "--checkpoint-dir", str(workdir / "checkpoints"),
                    "--client-id", h.name, "--history-size", "256",
                    "--metrics-port", str(METRICS_PORT), *extra]  # fmt: skip
            a = HostedProcess(h, h.name, argv, log_path=workdir / f"{h.name}.log", env=env)
            stack.callback(a.stop, 30.0)  # SIGTERM first: final checkpoints
            aggs.append(a)
            a.start()
        rest = await stack.enter_async_context(
            TcpProxy([(c.host.ip, HTTP_PORT) for c in coords], connect_timeout_s=1.0)
        )
        mqtt_front = await stack.enter_async_context(TcpProxy([(mqtt.host.ip, mqtt.port)]))
        http = await stack.enter_async_context(httpx.AsyncClient(
            base_url=f"http://{rest.address}", timeout=15.0,
            headers={"Authorization": f"Bearer {token}"}))  # fmt: skip
        yield Cluster(net, redis, mqtt, kafka, coords, aggs, rest, mqtt_front, http,
                      Api(http, token), workdir, run_id, prefix)  # fmt: skip


def copy_logs(workdir: Path, dest: Path) -> None:
    for f in workdir.rglob("*.log"):
        target = dest / f.relative_to(workdir)
        target.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(OSError):
            shutil.copyfile(f, target)


async def wait_rest(c: HostedProcess, timeout: float) -> None:
    """Until coordinator ``c`` answers ``/readyz`` on its host's address."""
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(timeout=2.0) as http:
        while time.monotonic() < deadline:
            if not c.alive():
                raise StackError(f"{c.name} exited; log {c.log_path}:\n{c.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if (await http.get(f"http://{c.host.ip}:{HTTP_PORT}/readyz")).status_code == 200:
                    return
            await asyncio.sleep(0.3)
    raise StackError(f"{c.name} not ready after {timeout:.0f}s")


# --------------------------------------------------------------------------- observation
@dataclass
class Monitor:
    """Polls the job over REST twice a second; keeps the last good view."""

    api: Api
    job_id: str
    bar: Progress
    timeline: Timeline = field(default_factory=Timeline)
    applied: list[int] = field(default_factory=list)
    accepted: int = 0
    view: dict[str, Any] = field(default_factory=dict)
    phase: str = "warmup"
    errors: int = 0

    async def run(self) -> None:
        while True:
            try:
                v = await self.api.get(f"/v1/jobs/{self.job_id}")
                self.view = v
                self.applied = [int(sh["updates_applied"]) for sh in v.get("shards", [])]
                self.accepted = int(v.get("updates_accepted", 0))
                ok = True
            except Exception:  # the API answers 503 while Redis is down
                self.errors += 1
                ok = False
            self.timeline.add(phase=self.phase, api=ok, accepted=self.accepted,
                              applied_min=min(self.applied, default=0))  # fmt: skip
            info = f"accepted={self.accepted} applied/shard={self.applied}"
            self.bar.update(self.timeline.rows[-1]["t"],
                            info + ("" if ok else " (API unavailable)"), self.phase)  # fmt: skip
            await asyncio.sleep(0.5)

    async def progressed(self, base: list[int], timeout: float) -> float | None:
        """Seconds until every shard applied more than ``base`` (None past ``timeout``)."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if len(self.applied) == len(base) and all(
                a > b for a, b in zip(self.applied, base, strict=True)
            ):
                return time.monotonic() - t0
            await asyncio.sleep(0.2)
        return None


def doubled_now(c: Cluster, shards: int, job_id: str) -> list[int]:
    """Per shard: applications beyond distinct applied ids in the latest checkpoints."""
    try:
        snap = applied_ids(c.checkpoints, f"{c.topic_prefix}updates", shards, job_id)
    except Exception:
        return [0] * shards
    return [max(0, int(a["count"]) - len(a["ids"])) for a in snap]


async def agg_totals(http: httpx.AsyncClient, c: Cluster) -> float:
    """Applied + rejected updates summed over the aggregators' /metrics (on their hosts)."""
    total = 0.0
    for a in c.aggs:
        try:
            r = await http.get(f"http://{a.host.ip}:{METRICS_PORT}/metrics", timeout=3.0)
        except httpx.HTTPError:
            continue
        for fam in text_string_to_metric_families(r.text):
            for smp in fam.samples:
                if smp.name in ("fedfleet_aggregator_updates_applied_total",
                                "fedfleet_aggregator_updates_rejected_total"):  # fmt: skip
                    total += smp.value
    return total


async def wait_quiet(c: Cluster, *, quiet_s: float, timeout_s: float) -> None:
    start = last = time.monotonic()
    prev = -1.0
    async with httpx.AsyncClient() as http:
        while time.monotonic() - start < timeout_s:
            total = await agg_totals(http, c)
            if total != prev:
                prev, last = total, time.monotonic()
            elif time.monotonic() - last >= quiet_s:
                return
            await asyncio.sleep(0.5)


# --------------------------------------------------------------------------- faults
async def inject(c: Cluster, s: FaultSettings, kind: str, target: str) -> dict[str, Any]:
    """Apply one fault and undo it (restart / heal); returns what happened."""
    info: dict[str, Any] = {}
    if kind in ("redis", "kafka", "coordinator", "aggregator", "mosquitto"):
        procs = c.by_host(target)
        if not procs:
            raise StackError(f"faults: no server on host {target!r}")
        victim = procs[0]
        victim.kill9()
        info["pid_killed"] = victim.pid
        await asyncio.sleep(s.down_s)
        victim.start()
        if isinstance(victim, HostedRedis | HostedMosquitto):
            await victim.wait_ready()
        elif kind == "kafka":
            await c.kafka.wait_ready(120.0)
        elif kind == "coordinator":
            await wait_rest(victim, 120.0)
    elif kind == "partition":
        async with c.net.partitioned(target):
            await asyncio.sleep(s.partition_s)
        if target.startswith("kafka-"):
            await c.kafka.wait_ready(120.0)
    elif kind == "slow":
        front = target == "mosquitto"
        await asyncio.to_thread(c.net.shape, target, rate_kbit=s.slow_kbit)
        if front:
            c.mqtt_front.delay_s = s.slow_delay_ms / 1000
        try:
            await asyncio.sleep(s.slow_s)
        finally:
            c.mqtt_front.delay_s = 0.0
            await asyncio.to_thread(c.net.unshape, target)
        info["kbit"] = s.slow_kbit
        info["delay_ms"] = s.slow_delay_ms if front else 0
    return info


async def run_fault(c: Cluster, s: FaultSettings, mon: Monitor, fault: str,
                    job_id: str) -> dict[str, Any]:  # fmt: skip
    kind, target = s.target(fault)
    mon.phase = f"{kind}:{target}"
    acc0, app0 = mon.accepted, list(mon.applied)
    t_start, wall0 = time.monotonic(), time.time()
    row: dict[str, Any] = {"fault": kind, "host": target}
    try:
        async with asyncio.timeout(s.down_s + s.partition_s + s.slow_s + 300):
            row.update(await inject(c, s, kind, target))
    except (StackError, TimeoutError) as exc:
        row["error"] = f"{type(exc).__name__}: {exc}"[:500]
    row["fault_s"] = round(time.monotonic() - t_start, 1)
    during = [a - b for a, b in zip(mon.applied, app0, strict=False)]
    row["applied_during_fault"] = during
    mon.phase = f"{kind}:resume"
    resumed = await mon.progressed(list(mon.applied), s.resume_timeout_s)
    row["resume_s"] = None if resumed is None else round(resumed, 2)
    mon.phase = f"{kind}:after"
    await asyncio.sleep(s.between_s)
    row["crashed"] = c.dead()  # besides the victim, restarted already
    if row["crashed"]:
        c.restart_dead()
    row["accepted"] = mon.accepted - acc0
    row["applied"] = [a - b for a, b in zip(mon.applied, app0, strict=False)]
    row["doubled_total"] = await asyncio.to_thread(doubled_now, c, s.aggregators, job_id)
    row["window"] = (wall0, time.time())
    return row


async def run_faults(c: Cluster, s: FaultSettings, *, quiet: bool) -> dict[str, Any]:
    body = fault_job(s.concurrency, s.seed, s.aggregators, c.run_id)
    spec = FleetSpec(devices=s.devices, seed=s.seed, id_prefix=f"nf{c.run_id}",
                     reconnect_max_s=5.0)  # fmt: skip
    key = await c.api.public_key()
    pool = FleetPool(spec, processes=1, mqtt_host=c.mqtt_front.host,
                     mqtt_port=c.mqtt_front.port, api_url=f"http://{c.rest.address}",
                     public_key_hex=key, log_dir=c.workdir)  # fmt: skip
    total = 60 + s.budget_s
    async with asyncio.timeout(total + 600):  # each phase has its own deadline, and the run
        return await _drive(c, s, pool, body, total, quiet=quiet)


async def _drive(c: Cluster, s: FaultSettings, pool: FleetPool, body: dict[str, Any],
                 total: float, *, quiet: bool) -> dict[str, Any]:  # fmt: skip
    rows: list[dict[str, Any]] = []
    with Progress("faults", total, quiet=quiet) as bar:
        job_id = ""
        mon_task: asyncio.Task[None] | None = None
        try:
            await pool.start()
            job_id = (await c.api.create_job(body))["job_id"]
            mon = Monitor(c.api, job_id, bar)
            mon_task = asyncio.create_task(mon.run())
            base = [0] * s.aggregators
            warm = await mon.progressed([b + s.warmup_updates - 1 for b in base], 180.0)
            if warm is None:
                raise StackError(f"faults: warm-up never reached {s.warmup_updates} applied "
                                 f"updates per shard (applied {mon.applied})")  # fmt: skip
            for fault in s.faults:
                rows.append(await run_fault(c, s, mon, fault, job_id))
            mon.phase = "drain"
            await c.api.stop_job(job_id)
            await pool.stop()
            acked = pool.acked_ids()
            await wait_quiet(c, quiet_s=3.0, timeout_s=60.0)
            view = dict(mon.view)
        finally:
            if mon_task is not None:
                mon_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await mon_task
            await pool.stop()
    for a in c.aggs:  # SIGTERM: final checkpoints
        await asyncio.to_thread(a.stop, 30.0)
    topic = f"{c.topic_prefix}updates"
    async with asyncio.timeout(180):
        index = await log_index(c.kafka.bootstrap, topic, s.aggregators, job_id)
    logs = [set(ix) for ix in index]
    applied = await asyncio.to_thread(applied_ids, c.checkpoints, topic, s.aggregators, job_id)
    led = ledger(acked, logs, applied)
    try:
        repl: dict[str, Any] = await topic_replication(c.kafka.bootstrap, topic)
    except Exception as exc:  # reported, not fatal: the ledger is the check
        repl = {"error": repr(exc)[:200]}
    charge(rows, acked, index, applied)
    for r in rows:
        r["survived"] = (r["resume_s"] is not None and "error" not in r and not r["crashed"]
                         and r["lost"] == 0 and r["doubled"] == 0)  # fmt: skip
    ok = (led["lost"] == 0 and led["doubled"] == 0 and led["shards_agree"] and led["acked"] > 0
          and all(r["survived"] for r in rows)
          and all(x["rejected_after_ack"] == 0 and x["applied_not_logged"] == 0
                  for x in led["shards"]))  # fmt: skip
    result = {"devices": s.devices, "coordinators": s.coordinators,
              "aggregators": s.aggregators, "kafka": c.kafka.version, "replication": repl,
              "hosts": {h.name: h.ip for h in c.net.hosts.values()},
              "updates_accepted": int(view.get("updates_accepted", 0)),
              "refused_before_ack": refused(view.get("stats", {})),
              "rest_shards": view.get("shards", []), "faults": rows, **led}  # fmt: skip
    return {"scenario": "faults", "ok": ok, "result": result, "timeline": mon.timeline.rows}


def charge(rows: list[dict[str, Any]], acked: set[str], index: list[dict[str, int]],
           applied: list[dict[str, Any]]) -> None:  # fmt: skip
    """Give each fault row its lost ids (by the time they were logged: the fault's window
    up to the next fault) and its doubled applications (by checkpoint snapshot)."""
    stamp: dict[str, int] = {}
    for ix in index:
        for u, t in ix.items():
            stamp[u] = min(t, stamp.get(u, t))
    lost: set[str] = set()
    for ix, a in zip(index, applied, strict=True):
        lost |= (set(ix) | acked) - a["ids"]
    prev = [0] * len(applied)
    for k, r in enumerate(rows):
        lo = r["window"][0] * 1000
        hi = rows[k + 1]["window"][0] * 1000 if k + 1 < len(rows) else float("inf")
        r["lost"] = sum(1 for u in lost if lo <= stamp.get(u, -1) < hi)
        now = r.pop("doubled_total")
        r["doubled"] = sum(max(0, x - y) for x, y in zip(now, prev, strict=True))
        prev = now
        r["window"] = [round(x, 1) for x in r["window"]]
    final = [max(0, int(a["count"]) - len(a["ids"])) for a in applied]
    if rows:
        rows[-1]["doubled"] += sum(max(0, x - y) for x, y in zip(final, prev, strict=True))
    unplaced = sum(1 for u in lost if stamp.get(u, -1) < (rows[0]["window"][0] * 1000
                                                          if rows else float("inf")))  # fmt: skip
    if rows and unplaced:
        rows[0]["lost_before_first_fault"] = unplaced


def faults_report(
    res: dict[str, Any], out_dir: Path
) -> tuple[dict[str, Any], list[str], list[Path]]:
    from loadtest import report

    r = res["result"]
    summary = {"scenario": "faults", "ok": res["ok"], **r, "timeline": res["timeline"]}
    plots = [report.plot_rate(res["timeline"], "applied_min", out_dir / "updates_per_s.png",
                              "Updates applied on every shard per second",
                              "updates/s")]  # fmt: skip
    lines = [f"faults: {len(r['faults'])} faults on {len(r['hosts'])} hosts; "
             f"accepted {r['updates_accepted']}, acked to devices {r['acked']}, lost "
             f"{r['lost']}, doubled {r['doubled']}, shards agree {r['shards_agree']}; "
             f"ok={res['ok']}"]  # fmt: skip
    lines += [table_row(x) for x in r["faults"]]
    report.write(out_dir, summary, lines, plots)
    return summary, lines, plots


def table_row(x: dict[str, Any]) -> str:
    res = "-" if x["resume_s"] is None else f"{x['resume_s']} s"
    bad = "" if x["survived"] else "  FAILED " + "; ".join(
        v for v in (x.get("error", ""), f"crashed {x['crashed']}" if x["crashed"] else "",
                    "did not resume" if x["resume_s"] is None else "") if v)  # fmt: skip
    return (
        f"  {x['fault']:<11} {x['host']:<9} survived={x['survived']!s:<5} "
        f"fault={x['fault_s']} s applied/shard during={x['applied_during_fault']} "
        f"resume={res:<8} accepted={x['accepted']:<4} applied/shard={x['applied']} "
        f"lost={x['lost']} doubled={x['doubled']}{bad}"
    )
