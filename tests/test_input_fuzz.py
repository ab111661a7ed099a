"""Mutation fuzzing of the input surfaces that take bytes or JSON from outside: every wire
message kind (MQTT payloads: telemetry, status, task responses, uploads; device side:
tasks, acks, pace; Kafka records) and REST job bodies. Each input either decodes / builds
or raises the surface's typed error (``SchemaError`` / ``JobError``) — never another
exception.

Mutations work on the decoded structure (drop, duplicate, retype or blow up a field; nest
junk; swap a message kind) and on the bytes (flip, truncate, splice). The CI run is
bounded by a case count per surface; a long run::

    FEDFLEET_FUZZ_CASES=100000 FEDFLEET_FUZZ_SEED=7 .venv/bin/pytest -q tests/test_input_fuzz.py
"""

from __future__ import annotations

import json
import os
import random
from collections import Counter
from typing import Any

import msgspec
import pytest

from coordinator.errors import JobError
from coordinator.jobs import build_job
from schemas import messages as m
from schemas.errors import REASONS, SchemaError
from tests.test_messages import SAMPLES

CASES = int(os.environ.get("FEDFLEET_FUZZ_CASES", "3000"))
SEED = int(os.environ.get("FEDFLEET_FUZZ_SEED", "20261202"))

JUNK: list[Any] = [
    None, True, -1, 0, 2**63, -(2**63) - 1, 1e308, -1e308, float("nan"), float("inf"), "",
    "x" * 5000, "ä\x00\ud800"[:2], b"\x00\xff", [], [1, [2, [3]]], {}, {"a": {"b": {}}},
    "../../etc/passwd", "fleet/+/#",
]  # fmt: skip


def _mutate_value(rng: random.Random, v: Any, depth: int = 0) -> Any:
    r = rng.random()
    if r < 0.35 or depth > 3:
        return rng.choice(JUNK)
    if isinstance(v, dict) and v:
        return _mutate_obj(rng, dict(v), depth + 1)
    if isinstance(v, list) and v:
        i = rng.randrange(len(v))
        v = list(v)
        v[i] = _mutate_value(rng, v[i], depth + 1)
        return v
    if isinstance(v, int | float) and not isinstance(v, bool):
        return rng.choice([-v, v * 10**rng.randint(1, 30), v + 1, -1, 0])
    if isinstance(v, str):
        return rng.choice([v * 50, v[: len(v) // 2], v + "\x00", v.upper(), "?" + v])
    return rng.choice(JUNK)


def _mutate_obj(rng: random.Random, obj: dict[str, Any], depth: int = 0) -> dict[str, Any]:
    for _ in range(rng.randint(1, 3)):
        keys = list(obj)
        op = rng.random()
        if keys and op < 0.2:
            del obj[rng.choice(keys)]
        elif keys and op < 0.8:
            k = rng.choice(keys)
            obj[k] = _mutate_value(rng, obj[k], depth)
        else:
            obj[rng.choice(["extra", "kind", "v", "schema", "x" * 40])] = rng.choice(JUNK)
    return obj


def _bytes(rng: random.Random, raw: bytes) -> bytes:
    b = bytearray(raw)
    op = rng.random()
    if op < 0.4 and b:
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(len(b))] = rng.randrange(256)
    elif op < 0.7:
        b = b[: rng.randrange(len(b) + 1)]
    else:
        cut = rng.randrange(len(b) + 1)
        b = b[:cut] + bytes(rng.randrange(256) for _ in range(rng.randint(1, 20))) + b[cut:]
    return bytes(b)


def _case(rng: random.Random, sample: m.Message) -> bytes:
    raw = m.encode(sample)
    if rng.random() < 0.25:
        return _bytes(rng, raw)
    obj = msgspec.msgpack.decode(raw)
    if rng.random() < 0.1:  # another message's body under this kind's tag
        other = msgspec.msgpack.decode(m.encode(rng.choice(SAMPLES)))
        other["kind"] = obj.get("kind")
        obj = other
    obj = _mutate_obj(rng, obj)
    try:
        return msgspec.msgpack.encode(obj)
    except (TypeError, OverflowError, ValueError):  # not representable: fuzz the bytes
        return _bytes(rng, raw)


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda s: type(s).__name__)
def test_wire_messages_decode_or_raise_schema_error(sample: m.Message) -> None:
    rng = random.Random(f"{SEED}-{type(sample).__name__}")
    kind = type(sample)
    outcomes: Counter[str] = Counter()
    for _ in range(CASES):
        data = _case(rng, sample)
        try:
            got = m.decode(data, kind)
        except SchemaError as exc:
            assert exc.reason in REASONS, exc
            outcomes[exc.reason] += 1
            continue
        assert isinstance(got, kind)
        outcomes["ok"] += 1
    # the fuzzer reached both sides: valid variants and several kinds of rejection
    assert outcomes["ok"] > 0 and len(outcomes) >= 3, outcomes


JOB = {
    "model_name": "digits",
    "spec": {"family": "mlp", "n_features": 64, "n_classes": 10, "hidden": 16},
    "shards": 2,
    "strategy": {"name": "fedasync", "alpha": 0.6, "staleness": "polynomial"},
    "train": {"lr": 0.5, "local_epochs": 2, "batch_size": 8},
    "codec": {"topk": 0.01, "quant": "int8"},
    "concurrency": 20,
    "eligibility": {"min_battery": 20, "allow_metered": False},
    "selection": {"mode": "async"},
    "publish_every": 1,
}


def test_job_bodies_build_or_raise_job_error() -> None:
    rng = random.Random(f"{SEED}-job")
    outcomes: Counter[str] = Counter()
    for _ in range(CASES):
        body: Any = json.loads(json.dumps(JOB))
        body = _mutate_obj(rng, body) if rng.random() < 0.9 else rng.choice(JUNK)
        try:
            job = build_job(body, max_shards=8)
        except JobError as exc:
            outcomes[exc.code] += 1
            continue
        assert job.spec.shard_bounds[-1] > 0
        outcomes["ok"] += 1
    assert outcomes["ok"] > 0 and outcomes["validation"] > 0, outcomes
