"""What the REST routes work on: the coordinator's open adapters (``AppState``)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from fastapi import Request

from coordinator.artifacts import ArtifactStore
from coordinator.enrolment import Enroller
from coordinator.evalstore import EvalStore
from coordinator.fleet import FleetStore
from coordinator.jobs import JobStore
from coordinator.jobstats import JobStatsStore
from coordinator.journal import JobJournal, MemoryJobJournal
from coordinator.metrics import CoordinatorMetrics
from coordinator.registry import ModelRegistry
from coordinator.settings import CoordinatorSettings
from coordinator.signing import Signer
from coordinator.tasks import TaskStore
from schemas.messages import JobSpec, Update, UploadAck


@dataclass
class AppState:
    settings: CoordinatorSettings
    fleet: FleetStore
    jobs: JobStore
    tasks: TaskStore
    stats: JobStatsStore
    registry: ModelRegistry
    signer: Signer
    metrics: CoordinatorMetrics
    publish_job: Callable[[JobSpec], Awaitable[None]]
    ready: Callable[[], Awaitable[bool]] | None = None
    # the durable job record (the service passes its Kafka journal)
    journal: JobJournal = field(default_factory=MemoryJobJournal)
    # federated evaluations (GET /v1/jobs/{id}/metrics, the job's ``federated``)
    evals: EvalStore | None = None
    # onnx jobs' model artifacts (POST/GET /v1/artifacts; the service passes KafkaArtifacts)
    artifacts: ArtifactStore | None = None
    onnx_cache: dict[tuple[str, int, str], tuple[bytes, str, str]] = field(default_factory=dict)
    # POST /v1/uploads: an upload whose ack is returned (the service passes
    # ``coordinator.uploads.replying``); None: uploads only over MQTT
    upload: Callable[[Update], Awaitable[UploadAck]] | None = None
    # enrolment and revocation, and the device credentials HTTP uploads are checked
    # against (None: no enrolment on this coordinator)
    enroller: Enroller | None = None


def app_state(request: Request) -> AppState:
    """FastAPI dependency: the state ``create_app`` was built around."""
    state: AppState = request.app.state.coord
    return state
