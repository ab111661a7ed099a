"""Every message that crosses a process boundary, as frozen typed structs.

Wire format: MessagePack maps (``msgspec``), one struct per kind, tagged with ``kind`` and
carrying ``v`` (schema major version). Decoding is strict: wrong types, missing fields,
out-of-range or non-finite numbers, oversized payloads and unknown major versions raise
:class:`schemas.errors.SchemaError`. Unknown fields (optional additions of a newer minor
version) are ignored.

Topics and who speaks what is documented in ``docs/wire.md``.
"""

from __future__ import annotations

import itertools
import math
import re
from typing import Annotated, Any, Literal, TypeVar

import msgspec

from schemas.errors import SchemaError

SCHEMA_VERSION: int = 1
DEFAULT_MAX_BYTES: int = 1 << 20  # 1 MiB for control messages
UPDATE_MAX_BYTES: int = 64 << 20  # 64 MiB for model updates and model slices

# ``$(?!\n)``: Python's ``$`` also matches before a final newline ("d1\n" would pass);
# the lookahead closes that and keeps the pattern valid JSON Schema (ECMA 262) for OpenAPI
ID_PATTERN = r"^[A-Za-z0-9._:\-]+$(?!\n)"
Id = Annotated[str, msgspec.Meta(min_length=1, max_length=128, pattern=ID_PATTERN)]
NonNegInt = Annotated[int, msgspec.Meta(ge=0)]
PosInt = Annotated[int, msgspec.Meta(ge=1)]
NonNegFloat = Annotated[float, msgspec.Meta(ge=0.0)]
Percent = Annotated[float, msgspec.Meta(ge=0.0, le=100.0)]
Timestamp = Annotated[float, msgspec.Meta(gt=0.0)]
Network = Literal["wifi", "cellular", "ethernet", "none"]


def _finite(name: str, value: float) -> None:
    if not math.isfinite(value):
        raise SchemaError("non_finite", f"{name} must be finite, got {value!r}")


def _may_hold_float(t: msgspec.inspect.Type) -> bool:
    """Whether a value of declared type ``t`` can contain a float (directly or nested)."""
    mi = msgspec.inspect
    if isinstance(t, mi.FloatType | mi.StructType | mi.AnyType):
        return True
    if isinstance(t, mi.ListType | mi.TupleType | mi.VarTupleType | mi.SetType):
        types = t.item_types if isinstance(t, mi.TupleType) else (t.item_type,)
        return any(_may_hold_float(x) for x in types)
    if isinstance(t, mi.DictType):
        return _may_hold_float(t.value_type)
    if isinstance(t, mi.UnionType):
        return any(_may_hold_float(x) for x in t.types)
    return False


_FLOAT_FIELDS: dict[type, tuple[str, ...]] = {}


def _float_fields(cls: type[msgspec.Struct]) -> tuple[str, ...]:
    """Names of the fields of ``cls`` whose type can hold a float (cached per class)."""
    names = _FLOAT_FIELDS.get(cls)
    if names is None:
        info = msgspec.inspect.type_info(cls)
        assert isinstance(info, msgspec.inspect.StructType)
        names = tuple(f.name for f in info.fields if _may_hold_float(f.type))
        _FLOAT_FIELDS[cls] = names
    return names


def _finite_fields(obj: msgspec.Struct, path: str = "$") -> None:
    """Every float in ``obj`` (nested structs, lists and dict values included) must be finite.

    msgspec's ``ge``/``le`` constraints let ``inf`` through open-ended ranges (``ts``,
    ``retry_after_s``, ...), so every message runs this once after decoding. Only fields
    whose declared type can hold a float are visited.
    """
    for name in _float_fields(type(obj)):
        _finite_value(getattr(obj, name), f"{path}.{name}")


def _finite_value(value: object, path: str) -> None:
    if isinstance(value, float):
        _finite(path, value)
    elif isinstance(value, msgspec.Struct):
        _finite_fields(value, path)
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _finite_value(item, f"{path}[{i}]")
    elif isinstance(value, dict):
        for key, item in value.items():
            _finite_value(item, f"{path}[{key!r}]")


class Message(
    msgspec.Struct, frozen=True, kw_only=True, tag_field="kind", forbid_unknown_fields=False
):
    """Base of all wire messages: ``v`` is the schema major version."""

    v: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if self.v != SCHEMA_VERSION:
            raise SchemaError("version", f"unsupported schema version {self.v}")
        _finite_fields(self)


# --------------------------------------------------------------------------- device → server

# What a device reports is bounded to the physically plausible, so absurd but well-typed
# values (bandwidth 1e308, a clock in the year 31,700, a 900 KB version string) are refused
# at decode (``range``) instead of being stored and served. The caps sit far above any real
# reading: 100 Gbit/s is beyond any NIC an edge device carries (the simulator's fastest
# is ~150 Mbit/s); a round trip over a minute means the session is dead (MQTT keep-alive);
# 2100-01-01 is the latest clock we take (the coordinator also refuses telemetry whose ts
# is far from its own clock, ``CoordinatorSettings.telemetry_max_ahead_s``/``_behind_s``).
MAX_BANDWIDTH_KBPS: float = 1e8  # 100 Gbit/s
MAX_RTT_MS: float = 60_000.0  # one minute
MAX_DEVICE_TS: float = 4_102_444_800.0  # 2100-01-01T00:00:00Z
MAX_AGENT_VERSION: int = 64  # "1.2.3-rc.1+build.20260101.abcdef" is 32
MAX_STATUS_REASON: int = 256
# printable ASCII only: the version is stored, served, logged and compared (parse_version)
AgentVersion = Annotated[str, msgspec.Meta(max_length=MAX_AGENT_VERSION, pattern=r"^[ -~]*$(?!\n)")]
StatusReason = Annotated[str, msgspec.Meta(max_length=MAX_STATUS_REASON)]


def _at_most(name: str, value: float, cap: float) -> None:
    """``value`` (finite: checked first, so Inf stays ``non_finite``) must be <= ``cap``."""
    if value > cap:
        raise SchemaError("range", f"{name} must be <= {cap:g}, got {value!r}")


class Telemetry(Message, frozen=True, kw_only=True, tag="telemetry"):
    """Periodic device report on ``fleet/{device_id}/telemetry`` (QoS 0). Every field is
    bounded (see ``MAX_*`` above); ``battery`` is a percentage."""

    device_id: Id
    ts: Timestamp
    battery: Percent
    charging: bool
    network: Network
    metered: bool
    bandwidth_kbps: NonNegFloat = 0.0
    rtt_ms: NonNegFloat = 0.0
    idle: bool = False
    agent_version: AgentVersion = "0"
    seq: NonNegInt = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        _finite("ts", self.ts)
        _finite("bandwidth_kbps", self.bandwidth_kbps)
        _finite("rtt_ms", self.rtt_ms)
        _at_most("ts", self.ts, MAX_DEVICE_TS)
        _at_most("bandwidth_kbps", self.bandwidth_kbps, MAX_BANDWIDTH_KBPS)
        _at_most("rtt_ms", self.rtt_ms, MAX_RTT_MS)


class DeviceStatus(Message, frozen=True, kw_only=True, tag="status"):
    """Online/offline mark on ``fleet/{device_id}/status`` (retained; offline is the LWT)."""

    device_id: Id
    state: Literal["online", "offline"]
    ts: Timestamp  # when the message was built: an LWT's is its connect time, maybe days ago
    reason: StatusReason = ""

    def __post_init__(self) -> None:
        super().__post_init__()
        _finite("ts", self.ts)
        _at_most("ts", self.ts, MAX_DEVICE_TS)


class TaskResponse(Message, frozen=True, kw_only=True, tag="task_response"):
    """Device's answer to a task on ``fleet/{device_id}/task_status`` (QoS 1)."""

    task_id: Id
    device_id: Id
    status: Literal["accepted", "declined", "aborted"]
    reason: str = ""
    ts: Timestamp


class EvalReport(Message, frozen=True, kw_only=True, tag="eval_report"):
    """A device's score of one model version on its local held-out split (an ``eval``
    task), on ``fleet/{device_id}/report`` (QoS 1). Sums, not means, so the coordinator
    combines reports example-weighted: loss = sum(loss_sum) / sum(num_examples)."""

    task_id: Id
    job_id: Id
    device_id: Id
    upload_token: str
    model_version: NonNegInt  # the published version actually scored
    num_examples: NonNegInt
    loss_sum: NonNegFloat  # sum over examples of the cross-entropy (natural log)
    correct: NonNegInt
    class_examples: list[NonNegInt]  # held-out examples per true class (n_classes long)
    class_correct: list[NonNegInt]  # of those, predicted right
    ts: Timestamp

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.class_examples) != len(self.class_correct):
            raise SchemaError("shape", "class_examples and class_correct differ in length")
        if self.correct > self.num_examples:
            raise SchemaError("range", "correct > num_examples")
        if sum(self.class_examples) != self.num_examples:
            raise SchemaError("range", "class_examples do not sum to num_examples")
        if any(c > e for c, e in zip(self.class_correct, self.class_examples, strict=True)):
            raise SchemaError("range", "class_correct > class_examples")


class StatsReport(Message, frozen=True, kw_only=True, tag="stats_report"):
    """A device's feature and label statistics over its training rows (a ``stats`` task),
    on ``fleet/{device_id}/report`` (QoS 1). No row leaves the device: per-feature count,
    sum and sum of squares, and the number of rows per raw label."""

    task_id: Id
    job_id: Id
    device_id: Id
    upload_token: str
    num_rows: NonNegInt
    feature_sum: list[float]  # n_features long
    feature_sumsq: list[NonNegFloat]  # n_features long
    # raw label as the device's data spells it ("3", "setosa") -> rows; labels the job does
    # not know make the job fail before training starts
    label_counts: dict[Annotated[str, msgspec.Meta(max_length=256)], NonNegInt]
    ts: Timestamp

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.feature_sum) != len(self.feature_sumsq):
            raise SchemaError("shape", "feature_sum and feature_sumsq differ in length")
        if len(self.label_counts) > 1 << 16:
            raise SchemaError("too_large", f"{len(self.label_counts)} distinct labels")
        if sum(self.label_counts.values()) != self.num_rows:
            raise SchemaError("range", "label_counts do not sum to num_rows")


class UpdateChunk(msgspec.Struct, frozen=True, kw_only=True):
    """One shard's part of an update: codec frame for parameters [start, stop)."""

    shard: NonNegInt
    start: NonNegInt
    stop: NonNegInt
    base_version: NonNegInt
    payload: bytes

    def __post_init__(self) -> None:
        if self.stop <= self.start:
            raise SchemaError("range", f"chunk stop {self.stop} <= start {self.start}")


class Update(Message, frozen=True, kw_only=True, tag="update"):
    """A device's model update on ``fleet/{device_id}/update`` (QoS 1), resent until acked."""

    update_id: Id
    task_id: Id
    job_id: Id
    device_id: Id
    upload_token: str
    num_samples: PosInt
    chunks: list[UpdateChunk]
    train_loss: NonNegFloat = 0.0
    train_seconds: NonNegFloat = 0.0
    sent_ts: Timestamp

    def __post_init__(self) -> None:
        super().__post_init__()
        _finite("train_loss", self.train_loss)
        _finite("train_seconds", self.train_seconds)
        if not self.chunks:
            raise SchemaError("shape", "update has no chunks")
        shards = [c.shard for c in self.chunks]
        if len(set(shards)) != len(shards):
            raise SchemaError("shape", "duplicate shard chunks")


# --------------------------------------------------------------------------- server → device


class TrainConfig(msgspec.Struct, frozen=True, kw_only=True):
    """Local training hyper-parameters carried by a task."""

    lr: Annotated[float, msgspec.Meta(gt=0.0, le=100.0)] = 0.1
    local_epochs: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 1
    batch_size: Annotated[int, msgspec.Meta(ge=1, le=1 << 20)] = 32
    prox_mu: Annotated[float, msgspec.Meta(ge=0.0, le=100.0)] = 0.0
    optimizer: Literal["sgd", "momentum", "adam"] = "sgd"
    momentum: Annotated[float, msgspec.Meta(ge=0.0, lt=1.0)] = 0.9  # for "momentum"
    # cross_entropy on the logits; mse: mean over batch and classes of
    # (logits - one_hot(y))^2 (on the logits, not the softmax)
    loss: Literal["cross_entropy", "mse"] = "cross_entropy"
    weight_decay: Annotated[float, msgspec.Meta(ge=0.0, le=100.0)] = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.momentum < 1.0:
            raise SchemaError("range", f"momentum must be in [0, 1), got {self.momentum!r}")
        if not 0.0 <= self.weight_decay <= 100.0:
            raise SchemaError(
                "range", f"weight_decay must be in [0, 100], got {self.weight_decay!r}"
            )


class CodecConfig(msgspec.Struct, frozen=True, kw_only=True):
    """How a device must encode its update (see ``schemas.codec``)."""

    topk: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] = 0.0  # 0 = dense
    quant: Literal["none", "fp16", "int8"] = "int8"
    zstd_level: Annotated[int, msgspec.Meta(ge=-7, le=22)] = 3
    error_feedback: bool = True
    # False stores the value planes raw: top-1% int8 frames ~15% larger, decode ~25% faster
    # (a server-CPU-for-uplink-bytes trade; docs/codec.md, "Choosing a setting").
    zstd_values: bool = True


TaskKind = Literal["train", "eval", "stats"]


class Task(Message, frozen=True, kw_only=True, tag="task"):
    """Work for one device: produced to Kafka ``fl.tasks``, pushed to ``fleet/{id}/task``.

    ``task_kind``: ``train`` (answered by an ``Update``), ``eval`` (score ``model_version`` on
    the local held-out split, answered by an ``EvalReport``) or ``stats`` (feature and
    label statistics of the training rows, answered by a ``StatsReport``). Each is
    accepted, declined or aborted with a ``TaskResponse`` as usual.
    """

    task_id: Id
    job_id: Id
    device_id: Id
    model_name: Id
    upload_token: str
    issued_ts: Timestamp
    deadline_ts: Timestamp
    train: TrainConfig = TrainConfig()
    codec: CodecConfig = CodecConfig()
    allow_metered: bool = False
    min_battery: Percent = 20.0
    task_kind: TaskKind = "train"
    model_version: Annotated[int, msgspec.Meta(ge=-1)] = -1  # eval: version to score (-1: latest)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.deadline_ts < self.issued_ts:
            raise SchemaError("range", "deadline before issue time")


class UploadAck(Message, frozen=True, kw_only=True, tag="ack"):
    """Server's answer to an upload on ``fleet/{device_id}/ack`` (QoS 1)."""

    update_id: Id
    task_id: Id
    status: Literal["accepted", "duplicate", "rejected"]
    reason: str = ""


class Pace(Message, frozen=True, kw_only=True, tag="pace"):
    """Pace steering on ``fleet/{device_id}/pace``: not selected now, check back later."""

    device_id: Id
    retry_after_s: NonNegFloat
    ts: Timestamp


# --------------------------------------------------------------------------- server ↔ server


ARTIFACT_DIGEST = r"^sha256:[0-9a-f]{64}$"  # a model artifact's name (schemas.artifact)
_ARTIFACT = re.compile(ARTIFACT_DIGEST)
_TORCH_MODULE = re.compile(
    r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$"
)
MAX_INPUT_RANK: int = 8  # per-example input dims of an ONNX model


class ParamMsg(msgspec.Struct, frozen=True):
    """One trainable tensor of an ``onnx`` model: its ONNX initializer name and shape (C
    order in the flat vector; a scalar has shape ``()``)."""

    name: Annotated[str, msgspec.Meta(min_length=1, max_length=1024)]
    shape: tuple[Annotated[int, msgspec.Meta(ge=1, le=1 << 31)], ...]

    def __post_init__(self) -> None:
        if not self.name:
            raise SchemaError("range", "parameter name is empty")
        if len(self.shape) > 32:
            raise SchemaError("range", f"parameter {self.name!r} has rank {len(self.shape)}")
        if any(d < 1 for d in self.shape):
            raise SchemaError("range", f"parameter {self.name!r} has shape {self.shape}")

    @property
    def size(self) -> int:
        return math.prod(self.shape)


class ModelSpecMsg(msgspec.Struct, frozen=True, kw_only=True):
    """Model family and shape; the flat parameter layout is defined in ``schemas.modelspec``.

    ``softmax`` and ``mlp`` are built-in families (their layout follows from the sizes).
    ``onnx`` is a user's model: the normalised ONNX graph whose digest is ``artifact``
    (``schemas.artifact``), trained on the flat vector of its ``params`` (trainable
    initializers, in order); ``n_features == prod(input_shape)`` and devices reshape each
    flat CSV row to ``input_shape``. Built-ins leave those four fields empty.
    """

    family: Literal["softmax", "mlp", "onnx"]
    n_features: Annotated[int, msgspec.Meta(ge=1, le=1 << 20)]
    n_classes: Annotated[int, msgspec.Meta(ge=2, le=1 << 16)]
    hidden: Annotated[int, msgspec.Meta(ge=0, le=1 << 16)] = 0
    # Input standardisation, part of the model: x' = (x - input_mean) / input_std before the
    # first layer, in training, in the ONNX graph and on-device inference (empty: none).
    # Fixed by a ``standardize`` job's statistics phase; devices keep raw features.
    # (tuples: the spec stays hashable, trainers cache per spec)
    input_mean: tuple[float, ...] = ()
    input_std: tuple[Annotated[float, msgspec.Meta(gt=0.0)], ...] = ()
    # Class names in index order (string labels in device data map to their index);
    # empty: labels are the integers 0..n_classes-1.
    labels: tuple[Annotated[str, msgspec.Meta(min_length=1, max_length=256)], ...] = ()
    # onnx only: "sha256:<64 hex>" of the normalised ONNX artifact
    artifact: str = ""
    # onnx only: the trainable initializers in flat-vector order (required)
    params: tuple[ParamMsg, ...] = ()
    # onnx only: per-example input shape (the graph input is [N, *input_shape])
    input_shape: tuple[Annotated[int, msgspec.Meta(ge=1, le=1 << 20)], ...] = ()
    # onnx only, optional: "pkg.mod:factory" a device may have installed; factory() returns
    # an nn.Module whose named parameters match ``params``
    torch_module: Annotated[str, msgspec.Meta(max_length=256)] = ""

    def __post_init__(self) -> None:
        self._check_family()
        if len(self.input_mean) != len(self.input_std):
            raise SchemaError("shape", "input_mean and input_std differ in length")
        if self.input_mean and len(self.input_mean) != self.n_features:
            raise SchemaError(
                "shape", f"input_mean has {len(self.input_mean)} values, n_features is "
                f"{self.n_features}",
            )  # fmt: skip
        if self.labels and len(self.labels) != self.n_classes:
            raise SchemaError("shape", f"{len(self.labels)} labels for n_classes {self.n_classes}")
        if len(set(self.labels)) != len(self.labels):
            raise SchemaError("shape", "labels are not distinct")

    def _check_family(self) -> None:
        if self.family != "onnx":
            if self.artifact or self.params or self.input_shape or self.torch_module:
                raise SchemaError(
                    "shape", f"family {self.family} takes no artifact, params, input_shape or "
                    "torch_module",
                )  # fmt: skip
            return
        if not _ARTIFACT.match(self.artifact):
            raise SchemaError(
                "range", f"onnx artifact must be 'sha256:<64 hex>', got {self.artifact!r}"
            )
        if self.hidden:
            raise SchemaError("shape", "family onnx takes no hidden")
        if not self.params:
            raise SchemaError("shape", "family onnx needs params (its trainable tensors)")
        if len({p.name for p in self.params}) != len(self.params):
            raise SchemaError("shape", "param names are not distinct")
        if not self.input_shape or len(self.input_shape) > MAX_INPUT_RANK:
            raise SchemaError("shape", f"onnx input_shape must have 1..{MAX_INPUT_RANK} dims")
        if any(d < 1 for d in self.input_shape):
            raise SchemaError("range", f"input_shape {self.input_shape} has a dim < 1")
        if math.prod(self.input_shape) != self.n_features:
            raise SchemaError(
                "shape", f"prod(input_shape {self.input_shape}) != n_features {self.n_features}"
            )
        if self.torch_module and not _TORCH_MODULE.match(self.torch_module):
            raise SchemaError(
                "range", f"torch_module must be 'pkg.mod:factory', got {self.torch_module!r}"
            )


class StrategyConfig(msgspec.Struct, frozen=True, kw_only=True):
    """Server aggregation rule for a job (see ``aggregator.strategies``)."""

    name: Literal["fedasync", "fedasync_delta", "fedbuff", "fedavg"] = "fedasync"
    alpha: Annotated[float, msgspec.Meta(gt=0.0, le=1.0)] = 0.6
    staleness: Literal["constant", "polynomial", "hinge"] = "polynomial"
    staleness_a: NonNegFloat = 0.5
    staleness_b: NonNegFloat = 4.0
    max_staleness: NonNegInt = 64
    buffer_size: PosInt = 10  # FedBuff K / FedAvg round size
    server_lr: Annotated[float, msgspec.Meta(gt=0.0, le=100.0)] = 1.0
    server_momentum: Annotated[float, msgspec.Meta(ge=0.0, lt=1.0)] = 0.0
    clip_norm: NonNegFloat = 0.0  # fixed L2 bound per slice; 0 = none
    # Adaptive L2 bound per slice (aggregator.strategies.adaptive): clip_multiplier x the
    # lower median of the last clip_window slice norms (this one included); 0 = off. Off
    # here, on by default for jobs created through the coordinator (coordinator.jobs).
    clip_multiplier: Annotated[float, msgspec.Meta(ge=0.0, le=1e6)] = 0.0
    clip_window: Annotated[int, msgspec.Meta(ge=2, le=10_000)] = 100
    # Exact FedAsync with a sparse (top-k) update: mix only the coordinates the device sent
    # ("support"), or read the unsent ones as the stale base ("all"); see aggregator docs.
    sparse_mix: Literal["support", "all"] = "support"
    # Optional per-job add-ons (minor addition; ``None`` = the aggregator deployment's
    # default, ``AggregatorSettings.robust`` / ``trim_ratio`` / ``dp_noise_multiplier``).
    robust: Literal["mean", "median", "trimmed_mean"] | None = None  # FedBuff reducer
    trim_ratio: Annotated[float, msgspec.Meta(ge=0.0, lt=0.5)] | None = None  # per side
    dp_noise_multiplier: NonNegFloat | None = None  # > 0: Gaussian DP, clips at clip_norm

    def __post_init__(self) -> None:
        if self.robust not in (None, "mean") and self.name != "fedbuff":
            raise SchemaError("range", f"robust={self.robust!r} needs name='fedbuff'")
        if self.dp_noise_multiplier and self.clip_norm <= 0.0:
            raise SchemaError("range", "dp_noise_multiplier > 0 needs clip_norm > 0")
        if 0.0 < self.clip_multiplier < 1.0:
            raise SchemaError("range", "clip_multiplier must be 0 (off) or >= 1")
        if self.dp_noise_multiplier and self.clip_multiplier:
            raise SchemaError("range", "dp_noise_multiplier > 0 bounds by clip_norm: "
                              "set clip_multiplier to 0")  # fmt: skip


class EvalConfig(msgspec.Struct, frozen=True, kw_only=True):
    """Federated evaluation of a job: devices score published versions on their held-out
    split. An evaluation of version v asks ``devices`` eligible devices, counts once
    ``min_reports`` reported, and closes after ``timeout_s`` with what it has."""

    every_versions: PosInt = 5  # evaluate every N-th published version
    devices: Annotated[int, msgspec.Meta(ge=0, le=1 << 16)] = 10  # 0 = federated eval off
    min_reports: PosInt = 3
    timeout_s: Annotated[float, msgspec.Meta(gt=0.0, le=86400.0)] = 120.0
    # When the job completes, its final (pinned) version is evaluated on up to this many
    # devices (0: ``devices``); that evaluation waits for all of them (or ``timeout_s``).
    final_devices: Annotated[int, msgspec.Meta(ge=0, le=1 << 20)] = 0

    def __post_init__(self) -> None:
        if self.devices and self.min_reports > self.devices:
            raise SchemaError("range", f"min_reports {self.min_reports} > devices {self.devices}")


class JobSpec(Message, frozen=True, kw_only=True, tag="job"):
    """A training job, on the compacted topic ``fl.jobs`` keyed by ``job_id``."""

    job_id: Id
    model_name: Id
    spec: ModelSpecMsg
    shard_bounds: list[NonNegInt]  # S+1 increasing offsets into the flat vector
    strategy: StrategyConfig = StrategyConfig()
    train: TrainConfig = TrainConfig()
    codec: CodecConfig = CodecConfig()
    concurrency: PosInt = 50
    target_accuracy: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] = 0.9
    init_seed: NonNegInt = 0
    publish_every: PosInt = 5  # shard publishes a version event every N applied updates
    created_ts: Timestamp
    status: Literal["running", "stopped", "done", "completed", "failed"] = "running"
    status_reason: str = ""  # why a job stopped by itself (e.g. "data_features: ...")
    evaluation: EvalConfig = EvalConfig()
    # a statistics phase fixes spec.input_mean/input_std before training starts (and
    # fails the job on labels outside its classes); done once spec.input_mean is set
    standardize: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        b = self.shard_bounds
        if len(b) < 2 or b[0] != 0 or any(x >= y for x, y in itertools.pairwise(b)):
            raise SchemaError("shape", f"shard_bounds must start at 0 and increase: {b}")


class ShardUpdate(Message, frozen=True, kw_only=True, tag="shard_update"):
    """One shard's part of an accepted update, on ``fl.updates`` partition ``shard``."""

    update_id: Id
    task_id: Id
    job_id: Id
    device_id: Id
    shard: NonNegInt
    start: NonNegInt
    stop: NonNegInt
    base_version: NonNegInt
    num_samples: PosInt
    payload: bytes
    accepted_ts: Timestamp
    # the newest version of this shard the accepting coordinator knew of (-1: none yet).
    # It admitted the upload only if base_version was at most max_staleness behind it;
    # shards keep every announced slice such a record can still name (aggregator.shard).
    seen_version: Annotated[int, msgspec.Meta(ge=-1)] = -1


class ShardVersion(Message, frozen=True, kw_only=True, tag="shard_version"):
    """A shard's new slice, on ``fl.models``; ``params`` is zstd(float32 little-endian)."""

    job_id: Id
    model_name: Id
    shard: NonNegInt
    start: NonNegInt
    stop: NonNegInt
    version: NonNegInt
    params: bytes
    updates_applied: NonNegInt
    updates_rejected: NonNegInt = 0
    mean_staleness: NonNegFloat = 0.0
    ts: Timestamp


class ModelManifest(Message, frozen=True, kw_only=True, tag="manifest"):
    """A published global model version (served by the coordinator's REST API)."""

    model_name: Id
    job_id: Id
    version: NonNegInt
    shard_versions: list[NonNegInt]
    shard_bounds: list[NonNegInt]
    spec: ModelSpecMsg
    digest: str  # sha256 hex of the float32 little-endian weights
    signature: str = ""  # Ed25519 over the digest, hex
    created_ts: Timestamp


class ErrorMsg(Message, frozen=True, kw_only=True, tag="error"):
    """A rejection sent back to a peer: machine-readable ``code`` plus text."""

    code: str
    reason: str = ""
    ref: str = ""


AnyMessage = (
    Telemetry
    | DeviceStatus
    | TaskResponse
    | Update
    | EvalReport
    | StatsReport
    | Task
    | UploadAck
    | Pace
    | JobSpec
    | ShardUpdate
    | ShardVersion
    | ModelManifest
    | ErrorMsg
)

M = TypeVar("M", bound=Message)

_encoder = msgspec.msgpack.Encoder()
_decoders: dict[Any, msgspec.msgpack.Decoder[Any]] = {}


def encode(msg: Message) -> bytes:
    """Serialise a message to MessagePack."""
    return _encoder.encode(msg)


def _reason_from(err: msgspec.ValidationError) -> tuple[str, str]:
    text = str(err)
    cause = err.__cause__ or err.__context__
    if isinstance(cause, SchemaError):
        return cause.reason, cause.detail
    head = text.split(" - ", 1)[0]
    for code in ("version", "non_finite", "range", "shape"):
        if head.startswith(code + ":"):
            return code, text
    if any(op in head for op in (">=", "<=", "> ", "< ", "length", "matching regex")):
        return "range", text
    if "Invalid value" in head and "kind" in text:
        return "kind", text
    return "type", text


def decode(
    data: bytes | bytearray | memoryview, kind: type[M], *, max_bytes: int = DEFAULT_MAX_BYTES
) -> M:
    """Strictly decode ``data`` as message type ``kind``; any failure is a SchemaError."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise SchemaError("malformed", f"expected bytes, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise SchemaError("too_large", f"{len(data)} bytes > limit {max_bytes}")
    dec = _decoders.get(kind)
    if dec is None:
        dec = _decoders[kind] = msgspec.msgpack.Decoder(kind)
    try:
        return dec.decode(data)  # type: ignore[no-any-return]
    except msgspec.ValidationError as exc:
        reason, detail = _reason_from(exc)
        raise SchemaError(reason, detail) from None
    except msgspec.DecodeError as exc:
        raise SchemaError("malformed", str(exc)) from None
    except SchemaError:
        raise
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise SchemaError("malformed", f"{type(exc).__name__}: {exc}") from None


def decode_any(data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES) -> AnyMessage:
    """Decode any tagged message (dispatch on ``kind``)."""
    return decode(data, AnyMessage, max_bytes=max_bytes)  # type: ignore[arg-type]
