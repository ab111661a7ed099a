"""The cost of the secure stack's Kafka (SASL_SSL: TLS + a SCRAM-SHA-512 login) against
plain text, on the product's own Kafka clients and record sizes, in the same run.

Two single-node Apache Kafka brokers run side by side (``stack.kafka.ApacheKafka``, one
with ``ca_dir``: ``stack.kafka_secure``). For each record size, ``--records`` records are
produced to a fresh one-partition topic with the coordinator's producer settings (``acks=
all``, idempotent, ``linger_ms`` 2) and then read back from the start with one consumer
(the aggregator's fetch sizes); reported: records/s and MB/s of each, the secure / plain
ratio, and the connect time (bootstrap + login) of a fresh producer. Alternating order,
median of ``--repeats``.

    .venv/bin/python bench/kafka_auth_cost.py --json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from schemas.kafka_auth import as_kwargs, client_kwargs
from stack.kafka import ApacheKafka
from stack.pki import ensure_ca


async def one_run(kw: dict[str, Any], size: int, n: int) -> dict[str, float]:
    topic = f"bench-{uuid.uuid4().hex[:8]}"
    admin = AIOKafkaAdminClient(**kw)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, 1, 1)])
    finally:
        await admin.close()
    payload = bytes(size)
    t0 = time.perf_counter()
    prod = AIOKafkaProducer(**kw, acks="all", enable_idempotence=True, linger_ms=2,
                            max_request_size=80 << 20)  # fmt: skip
    await prod.start()
    connect_s = time.perf_counter() - t0
    try:
        t0 = time.perf_counter()
        futs = [await prod.send(topic, payload, partition=0) for _ in range(n)]
        await asyncio.gather(*futs)
        produce_s = time.perf_counter() - t0
    finally:
        await prod.stop()
    cons = AIOKafkaConsumer(**kw, group_id=None, enable_auto_commit=False,
                            fetch_max_bytes=64 << 20,
                            max_partition_fetch_bytes=64 << 20)  # fmt: skip
    await cons.start()
    try:
        tp = TopicPartition(topic, 0)
        cons.assign([tp])
        await cons.seek_to_beginning(tp)
        got, t0 = 0, time.perf_counter()
        while got < n:
            for recs in (await cons.getmany(tp, timeout_ms=1000, max_records=5000)).values():
                got += len(recs)
        consume_s = time.perf_counter() - t0
    finally:
        await cons.stop()
    return {"connect_s": connect_s, "produce_per_s": n / produce_s,
            "consume_per_s": n / consume_s}  # fmt: skip


async def main_async(a: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="fedfleet-kafka-auth-"))
    ensure_ca(work / "ca")
    plain = ApacheKafka(work / "plain", heap_mb=a.heap_mb)
    secure = ApacheKafka(work / "secure", heap_mb=a.heap_mb, ca_dir=work / "ca")
    for broker in (plain, secure):
        broker.start()
    try:
        for broker in (plain, secure):
            await asyncio.to_thread(broker.wait_ready, 120)
        targets = {
            "plain": as_kwargs(plain.bootstrap),
            "sasl_ssl": {"bootstrap_servers": secure.bootstrap,
                         **client_kwargs(secure.auth("coordinator"))},
        }  # fmt: skip
        out: dict[str, Any] = {}
        for size in a.sizes:
            n = max(200, min(a.records, (a.megabytes << 20) // size))
            runs: dict[str, list[dict[str, float]]] = {"plain": [], "sasl_ssl": []}
            for r in range(a.repeats):
                order = ("plain", "sasl_ssl") if r % 2 == 0 else ("sasl_ssl", "plain")
                for label in order:
                    runs[label].append(await one_run(targets[label], size, n))
            row: dict[str, Any] = {"records": n}
            for label, rs in runs.items():
                row[label] = {k: statistics.median(x[k] for x in rs) for k in rs[0]}
            for metric in ("produce_per_s", "consume_per_s"):
                row[f"{metric}_ratio"] = row["sasl_ssl"][metric] / row["plain"][metric]
            out[str(size)] = row
            p, s = row["plain"], row["sasl_ssl"]
            print(f"{size:>8d} B x {n}: produce {p['produce_per_s']:8.0f} vs "
                  f"{s['produce_per_s']:8.0f}/s ({row['produce_per_s_ratio']:.2f}x), consume "
                  f"{p['consume_per_s']:8.0f} vs {s['consume_per_s']:8.0f}/s "
                  f"({row['consume_per_s_ratio']:.2f}x), connect {1e3 * p['connect_s']:.0f} vs "
                  f"{1e3 * s['connect_s']:.0f} ms", flush=True)  # fmt: skip
        return out
    finally:
        for broker in (plain, secure):
            broker.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")],
                   default=[1_000, 20_000, 400_000],
                   help="record sizes in bytes (a demo slice ~1 kB, a top-1%% CNN update ~20 kB, "
                        "a dense 100k-parameter slice ~400 kB)")  # fmt: skip
    p.add_argument("--records", type=int, default=20_000, help="records per run, at most")
    p.add_argument("--megabytes", type=int, default=400, help="bytes per run, at most")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--heap-mb", type=int, default=512)
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    res = asyncio.run(main_async(a))
    if a.json:
        print(json.dumps({"args": vars(a), "results": res}))


if __name__ == "__main__":
    main()
