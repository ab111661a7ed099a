"""Prometheus metrics of the coordinator (one registry per process, shared by instances)."""

from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram


class CoordinatorMetrics:
    """All counters in one object so tests can read them and services share them."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.registry = registry
        self.messages = Counter(
            "fedfleet_coord_mqtt_messages_total",
            "MQTT messages received",
            ["kind"],
            registry=registry,
        )
        self.rejected = Counter(
            "fedfleet_coord_rejected_total",
            "Inputs rejected, by source (topic leaf, http_update, fl.models) and reason (a "
            "schema reason such as range, or device_mismatch, clock_skew, rate_limited, ...)",
            ["source", "reason"],
            registry=registry,
        )
        self.telemetry_written = Counter(
            "fedfleet_coord_telemetry_written_total",
            "Telemetry records written to Redis",
            registry=registry,
        )
        self.devices_expired = Counter(
            "fedfleet_coord_devices_expired_total",
            "Devices removed from the fleet after device_ttl_s without a message",
            registry=registry,
        )
        self.tasks_issued = Counter(
            "fedfleet_coord_tasks_issued_total", "Tasks issued", registry=registry
        )
        self.tasks_expired = Counter(
            "fedfleet_coord_tasks_expired_total", "Task leases expired", registry=registry
        )
        self.tasks_dispatched = Counter(
            "fedfleet_coord_tasks_dispatched_total", "Tasks pushed over MQTT", registry=registry
        )
        self.uploads = Counter(
            "fedfleet_coord_uploads_total", "Upload outcomes", ["status"], registry=registry
        )
        self.pace_sent = Counter(
            "fedfleet_coord_pace_sent_total", "Pace messages sent", registry=registry
        )
        self.versions = Counter(
            "fedfleet_coord_model_versions_total",
            "Global model versions assembled",
            registry=registry,
        )
        self.selection_seconds = Histogram(
            "fedfleet_coord_selection_seconds", "Selection pass latency", registry=registry
        )
        self.training_now = Gauge(
            "fedfleet_coord_training_now", "Active task leases", registry=registry
        )
        self.task_aborts = Counter(
            "fedfleet_coord_task_aborts_total",
            "Tasks devices aborted, by job and reason code",
            ["job", "reason"],
            registry=registry,
        )
        self.side_tasks_issued = Counter(
            "fedfleet_coord_side_tasks_issued_total",
            "Evaluation and statistics tasks issued (no training slot), by kind",
            ["kind"],
            registry=registry,
        )
        self.reports = Counter(
            "fedfleet_coord_reports_total",
            "Evaluation / statistics reports, by kind and outcome (accepted, duplicate, "
            "closed: the evaluation had ended, rejected: see fedfleet_coord_rejected_total)",
            ["kind", "outcome"],
            registry=registry,
        )
        self.fed_accuracy = Gauge(
            "fedfleet_coord_fed_accuracy",
            "Federated accuracy of the job's newest complete evaluation",
            ["job"],
            registry=registry,
        )
        self.fed_loss = Gauge(
            "fedfleet_coord_fed_loss",
            "Federated loss (mean cross-entropy) of the job's newest complete evaluation",
            ["job"],
            registry=registry,
        )
        self.jobs_restored = Counter(
            "fedfleet_coord_jobs_restored_total",
            "Jobs restored into Redis from the job journal (Redis lost or rolled them back)",
            registry=registry,
        )
        self.credentials_restored = Counter(
            "fedfleet_coord_credentials_restored_total",
            "Device credentials restored into Redis from the credential journal (Redis lost "
            "or rolled them back)",
            registry=registry,
        )
        self.enrolments = Counter(
            "fedfleet_coord_enrolments_total",
            "Enrolment attempts by outcome (enrolled, token_unknown, token_used, token_expired, "
            "token_device, already_enrolled, invalid_request, bad_id, reserved_id, broker_error, "
            "unavailable)",
            ["outcome"],
            registry=registry,
        )
        self.enrolment_tokens = Counter(
            "fedfleet_coord_enrolment_tokens_total", "Enrolment tokens issued", registry=registry
        )
        self.revocations = Counter(
            "fedfleet_coord_revocations_total", "Device credentials revoked", registry=registry
        )
        self.auth_refused = Counter(
            "fedfleet_coord_auth_refused_total",
            "Requests refused for their credential, by what (admin, operator, device) and "
            "reason (missing, wrong, not_enrolled, device_mismatch)",
            ["what", "reason"],
            registry=registry,
        )
        self.errors = Counter(
            "fedfleet_coord_loop_errors_total",
            "Unexpected errors caught in loops",
            ["loop"],
            registry=registry,
        )


_default: CoordinatorMetrics | None = None


def default_metrics() -> CoordinatorMetrics:
    global _default
    if _default is None:
        _default = CoordinatorMetrics()
    return _default


def counter_value(counter: Counter, **labels: str) -> float:
    """Current value of a (labelled) counter, for tests and reports."""
    c = counter.labels(**labels) if labels else counter
    return float(c._value.get())
