"""Round trips and strict rejection for every wire message in schemas.messages."""

from __future__ import annotations

import math
from typing import Any

import msgspec
import pytest

from schemas import messages as m
from schemas.errors import REASONS, SchemaError

TS = 1_700_000_000.0
SPEC = m.ModelSpecMsg(family="mlp", n_features=20, n_classes=5, hidden=16)

SAMPLES: list[m.Message] = [
    m.Telemetry(
        device_id="dev-1",
        ts=TS,
        battery=87.5,
        charging=True,
        network="wifi",
        metered=False,
        bandwidth_kbps=1200.0,
        rtt_ms=35.0,
        idle=True,
        agent_version="1.2",
        seq=9,
    ),
    m.DeviceStatus(device_id="dev-1", state="offline", ts=TS, reason="lwt"),
    m.TaskResponse(task_id="t1", device_id="dev-1", status="declined", reason="battery", ts=TS),
    m.Update(
        update_id="u1",
        task_id="t1",
        job_id="j1",
        device_id="dev-1",
        upload_token="tok",
        num_samples=32,
        chunks=[
            m.UpdateChunk(shard=0, start=0, stop=10, base_version=3, payload=b"\x00\x01"),
            m.UpdateChunk(shard=1, start=10, stop=25, base_version=4, payload=b"\xff"),
        ],
        train_loss=0.7,
        train_seconds=12.5,
        sent_ts=TS,
    ),
    m.EvalReport(
        task_id="t2", job_id="j1", device_id="dev-1", upload_token="tok", model_version=7,
        num_examples=5, loss_sum=2.5, correct=3, class_examples=[2, 3], class_correct=[1, 2],
        ts=TS,
    ),
    m.StatsReport(
        task_id="t3", job_id="j1", device_id="dev-1", upload_token="tok", num_rows=4,
        feature_sum=[1.0, -2.0], feature_sumsq=[3.0, 4.0], label_counts={"0": 1, "x": 3},
        ts=TS,
    ),
    m.Task(
        task_id="t1",
        job_id="j1",
        device_id="dev-1",
        model_name="mnist",
        upload_token="tok",
        issued_ts=TS,
        deadline_ts=TS + 60,
        train=m.TrainConfig(lr=0.05, local_epochs=2, batch_size=16, prox_mu=0.01),
        codec=m.CodecConfig(topk=0.01, quant="int8", zstd_level=3, error_feedback=True),
        allow_metered=True,
        min_battery=30.0,
    ),
    m.UploadAck(update_id="u1", task_id="t1", status="duplicate", reason="seen"),
    m.Pace(device_id="dev-1", retry_after_s=30.0, ts=TS),
    m.JobSpec(
        job_id="j1",
        model_name="mnist",
        spec=SPEC,
        shard_bounds=[0, 100, 250],
        strategy=m.StrategyConfig(name="fedbuff", staleness="hinge", buffer_size=5),
        created_ts=TS,
    ),
    m.ShardUpdate(
        update_id="u1",
        task_id="t1",
        job_id="j1",
        device_id="dev-1",
        shard=1,
        start=100,
        stop=250,
        base_version=2,
        num_samples=32,
        payload=b"frame",
        accepted_ts=TS,
    ),
    m.ShardVersion(
        job_id="j1",
        model_name="mnist",
        shard=0,
        start=0,
        stop=100,
        version=7,
        params=b"zstd",
        updates_applied=7,
        updates_rejected=1,
        mean_staleness=1.5,
        ts=TS,
    ),
    m.ModelManifest(
        model_name="mnist",
        job_id="j1",
        version=3,
        shard_versions=[7, 4],
        shard_bounds=[0, 100, 250],
        spec=SPEC,
        digest="ab" * 32,
        signature="cd" * 64,
        created_ts=TS,
    ),
    m.ErrorMsg(code="schema", reason="range", ref="u1"),
]


def _raw(msg: m.Message) -> dict[str, Any]:
    data: dict[str, Any] = msgspec.msgpack.decode(m.encode(msg))
    return data


def _sample(kind: type[m.Message]) -> dict[str, Any]:
    return _raw(next(s for s in SAMPLES if type(s) is kind))


def _reject(data: Any, kind: type[m.Message], **kw: int) -> str:
    raw = data if isinstance(data, bytes) else msgspec.msgpack.encode(data)
    with pytest.raises(SchemaError) as err:
        m.decode(raw, kind, **kw)
    assert err.value.reason in REASONS
    return err.value.reason


def test_every_message_type_has_a_sample() -> None:
    assert {type(s) for s in SAMPLES} == set(m.AnyMessage.__args__)


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda s: type(s).__name__)
def test_round_trip(msg: m.Message) -> None:
    data = m.encode(msg)
    assert m.decode(data, type(msg), max_bytes=m.UPDATE_MAX_BYTES) == msg
    assert m.decode_any(data) == msg
    assert _raw(msg)["v"] == m.SCHEMA_VERSION


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda s: type(s).__name__)
def test_unknown_optional_fields_are_tolerated(msg: m.Message) -> None:
    data = _raw(msg)
    data["added_in_1_1"] = {"nested": [1, 2.5, "x"]}
    assert m.decode(msgspec.msgpack.encode(data), type(msg)) == msg


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda s: type(s).__name__)
def test_unknown_major_version_is_rejected(msg: m.Message) -> None:
    data = _raw(msg)
    data["v"] = m.SCHEMA_VERSION + 1
    assert _reject(data, type(msg)) == "version"


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda s: type(s).__name__)
def test_missing_required_field_is_rejected(msg: m.Message) -> None:
    data = _raw(msg)
    fields = msgspec.structs.fields(msg)
    required = [f.encode_name for f in fields if f.required]
    assert required
    del data[required[0]]
    assert _reject(data, type(msg)) == "type"


@pytest.mark.parametrize(
    ("field", "value"),
    [("battery", "full"), ("charging", "yes"), ("seq", 1.5), ("network", 3), ("ts", None)],
)
def test_wrong_types_are_rejected(field: str, value: Any) -> None:
    data = _sample(m.Telemetry) | {field: value}
    assert _reject(data, m.Telemetry) in {"type", "range"}


@pytest.mark.parametrize("battery", [-0.1, 100.01, 1e9])
def test_battery_outside_0_100_is_rejected(battery: float) -> None:
    assert _reject(_sample(m.Telemetry) | {"battery": battery}, m.Telemetry) == "range"


@pytest.mark.parametrize("battery", [0.0, 100.0])
def test_battery_bounds_are_inclusive(battery: float) -> None:
    data = msgspec.msgpack.encode(_sample(m.Telemetry) | {"battery": battery})
    assert m.decode(data, m.Telemetry).battery == battery


@pytest.mark.parametrize(
    ("kind", "field", "value"),
    [
        (m.Telemetry, "seq", -1),
        (m.Telemetry, "bandwidth_kbps", -5.0),
        (m.Update, "num_samples", 0),
        (m.Update, "num_samples", -3),
        (m.ShardUpdate, "base_version", -1),
        (m.ShardVersion, "updates_applied", -1),
        (m.ShardVersion, "version", -2),
        (m.Pace, "retry_after_s", -1.0),
        (m.ModelManifest, "shard_versions", [1, -1]),
    ],
)
def test_negative_counts_are_rejected(kind: type[m.Message], field: str, value: Any) -> None:
    assert _reject(_sample(kind) | {field: value}, kind) == "range"


@pytest.mark.parametrize(
    ("kind", "field"),
    [
        (m.Telemetry, "ts"),
        (m.DeviceStatus, "ts"),
        (m.TaskResponse, "ts"),
        (m.Update, "sent_ts"),
        (m.Task, "issued_ts"),
        (m.Pace, "ts"),
        (m.JobSpec, "created_ts"),
        (m.ShardUpdate, "accepted_ts"),
        (m.ShardVersion, "ts"),
        (m.ModelManifest, "created_ts"),
    ],
)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_timestamps_are_rejected(
    kind: type[m.Message], field: str, value: float
) -> None:
    data = _sample(kind) | {field: value}
    if kind is m.Task:
        data["deadline_ts"] = value
    # NaN fails msgspec's ``> 0`` constraint first ("range"); +inf passes it and is caught
    # by the finiteness check ("non_finite").
    assert _reject(data, kind) in {"non_finite", "range"}


@pytest.mark.parametrize(
    ("kind", "path", "value"),
    [
        (m.Telemetry, ("rtt_ms",), math.inf),
        (m.Pace, ("retry_after_s",), math.inf),
        (m.Update, ("train_loss",), math.inf),
        (m.ShardVersion, ("mean_staleness",), math.inf),
        (m.JobSpec, ("strategy", "staleness_a"), math.inf),
        (m.JobSpec, ("strategy", "clip_norm"), math.inf),
    ],
)
def test_infinite_values_are_non_finite(
    kind: type[m.Message], path: tuple[str, ...], value: float
) -> None:
    data = _sample(kind)
    target = data
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    assert _reject(data, kind) == "non_finite"


def test_oversized_payload_is_rejected() -> None:
    data = m.encode(SAMPLES[0])
    assert _reject(data, m.Telemetry, max_bytes=len(data) - 1) == "too_large"
    assert m.decode(data, m.Telemetry, max_bytes=len(data)) == SAMPLES[0]
    big = _sample(m.ShardUpdate) | {"payload": b"\0" * (m.DEFAULT_MAX_BYTES + 1)}
    assert _reject(big, m.ShardUpdate) == "too_large"


def test_wrong_kind_is_rejected() -> None:
    assert _reject(m.encode(SAMPLES[0]), m.Task) == "kind"


@pytest.mark.parametrize(
    "data", [b"", b"\xc1", b"\x92\x01", b"not msgpack at all", b"\x81\xa4kind"]
)
def test_malformed_bytes_are_rejected(data: bytes) -> None:
    assert _reject(data, m.Telemetry) in {"malformed", "type"}
    with pytest.raises(SchemaError):
        m.decode_any(data)


def test_non_bytes_input_is_rejected() -> None:
    with pytest.raises(SchemaError) as err:
        m.decode("telemetry", m.Telemetry)  # type: ignore[arg-type]
    assert err.value.reason == "malformed"


@pytest.mark.parametrize("device_id", ["", "has space", "x" * 129, "slash/inside", "ü"])
def test_bad_ids_are_rejected(device_id: str) -> None:
    assert _reject(_sample(m.Telemetry) | {"device_id": device_id}, m.Telemetry) == "range"


def test_update_semantic_checks() -> None:
    data = _sample(m.Update)
    assert _reject(data | {"chunks": []}, m.Update) == "shape"
    dup = [data["chunks"][0], data["chunks"][0]]
    assert _reject(data | {"chunks": dup}, m.Update) == "shape"
    bad = [data["chunks"][0] | {"stop": 0}]
    assert _reject(data | {"chunks": bad}, m.Update) == "range"


def test_task_deadline_before_issue_is_rejected() -> None:
    data = _sample(m.Task) | {"deadline_ts": TS - 1}
    assert _reject(data, m.Task) == "range"


def test_task_codec_config_is_validated() -> None:
    data = _sample(m.Task)
    for codec in ({"topk": 1.5}, {"quant": "int4"}, {"zstd_level": 23}):
        assert _reject(data | {"codec": data["codec"] | codec}, m.Task) in {"range", "type"}


@pytest.mark.parametrize("bounds", [[0], [1, 10], [0, 10, 10], [0, 10, 5]])
def test_jobspec_bounds_are_validated(bounds: list[int]) -> None:
    assert _reject(_sample(m.JobSpec) | {"shard_bounds": bounds}, m.JobSpec) == "shape"


def test_status_literals_are_enforced() -> None:
    data = _sample(m.DeviceStatus) | {"state": "sleeping"}
    assert _reject(data, m.DeviceStatus) in {"type", "range"}


def test_schema_error_normalises_unknown_reasons() -> None:
    err = SchemaError("no-such-reason", "x")
    assert err.reason == "malformed" and isinstance(err, ValueError)


# ------------------------------------------------ StrategyConfig: per-job robust rule and DP


def _job(strategy: m.StrategyConfig) -> m.JobSpec:
    return m.JobSpec(
        job_id="j1",
        model_name="m",
        spec=SPEC,
        shard_bounds=[0, 10],
        strategy=strategy,
        created_ts=TS,
    )


def test_strategy_robust_and_dp_fields_round_trip() -> None:
    cfg = m.StrategyConfig(
        name="fedbuff",
        robust="trimmed_mean",
        trim_ratio=0.2,
        dp_noise_multiplier=1.1,
        clip_norm=1.0,
    )
    job = _job(cfg)
    assert m.decode(m.encode(job), m.JobSpec).strategy == cfg
    unset = m.StrategyConfig()
    assert (unset.robust, unset.trim_ratio, unset.dp_noise_multiplier) == (None, None, None)


def test_strategy_without_new_fields_decodes_to_unset() -> None:
    """Bytes from a 1.0 writer (no robust/DP fields) decode with every new field unset."""
    data = _raw(_job(m.StrategyConfig(name="fedbuff")))
    for k in ("robust", "trim_ratio", "dp_noise_multiplier"):
        del data["strategy"][k]
    job = m.decode(msgspec.msgpack.encode(data), m.JobSpec)
    assert job.strategy == m.StrategyConfig(name="fedbuff")


def test_old_reader_ignores_the_new_strategy_fields() -> None:
    class OldStrategyConfig(msgspec.Struct, frozen=True, kw_only=True):
        name: str = "fedasync"
        buffer_size: int = 10
        clip_norm: float = 0.0

    cfg = m.StrategyConfig(name="fedbuff", robust="median", dp_noise_multiplier=0.5, clip_norm=1)
    old = msgspec.msgpack.decode(msgspec.msgpack.encode(cfg), type=OldStrategyConfig)
    assert (old.name, old.buffer_size, old.clip_norm) == ("fedbuff", 10, 1.0)


@pytest.mark.parametrize(
    "fields",
    [
        {"name": "fedasync", "robust": "median"},  # robust reducers need a FedBuff buffer
        {"name": "fedbuff", "robust": "mode"},
        {"name": "fedbuff", "trim_ratio": 0.5},
        {"name": "fedbuff", "trim_ratio": -0.1},
        {"dp_noise_multiplier": -1.0, "clip_norm": 1.0},
        {"dp_noise_multiplier": 1.0},  # DP needs a clip norm
    ],
)
def test_bad_strategy_robust_or_dp_is_rejected(fields: dict[str, Any]) -> None:
    data = _raw(_job(m.StrategyConfig()))
    data["strategy"].update(fields)
    with pytest.raises(SchemaError) as err:
        m.decode(msgspec.msgpack.encode(data), m.JobSpec)
    assert err.value.reason in ("range", "type")


@pytest.mark.parametrize(
    ("kind", "patch"),
    [
        (m.EvalReport, {"correct": 9}),
        (m.EvalReport, {"class_examples": [1, 1]}),
        (m.EvalReport, {"class_correct": [3, 0]}),
        (m.EvalReport, {"class_correct": [1]}),
        (m.StatsReport, {"feature_sumsq": [1.0]}),
        (m.StatsReport, {"label_counts": {"0": 1}}),
        (m.StatsReport, {"feature_sum": [float("nan"), 1.0]}),
    ],
)
def test_reports_must_be_consistent(kind: type[m.Message], patch: dict[str, Any]) -> None:
    raw = {**_sample(kind), **patch}
    with pytest.raises(SchemaError):
        m.decode(msgspec.msgpack.encode(raw), kind)


@pytest.mark.parametrize(
    "patch",
    [
        {"input_mean": [0.0], "input_std": [1.0, 2.0]},
        {"input_mean": [0.0], "input_std": [1.0]},  # n_features is 2
        {"input_mean": [0.0, 1.0], "input_std": [1.0, 0.0]},
        {"labels": ["a"]},
        {"labels": ["a", "a"]},
    ],
)
def test_model_spec_preprocessing_is_checked(patch: dict[str, Any]) -> None:
    raw = {"family": "softmax", "n_features": 2, "n_classes": 2, **patch}
    with pytest.raises((SchemaError, msgspec.ValidationError)):
        msgspec.convert(raw, m.ModelSpecMsg)


@pytest.mark.parametrize("bad", ["d1\n", "d1\nx", "\nd1", "d 1", ""])
def test_an_id_with_a_newline_or_space_is_refused(bad: str) -> None:
    """``$`` alone would let a final newline through ("d1\\n"): ids name MQTT topics,
    Redis keys and files."""
    import msgspec as ms

    from schemas.messages import DeviceStatus

    with pytest.raises(ms.ValidationError):
        ms.convert({"device_id": bad, "state": "online", "ts": 1.0}, DeviceStatus)
    assert ms.convert({"device_id": "d1", "state": "online", "ts": 1.0}, DeviceStatus)
