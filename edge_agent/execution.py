"""Task execution core: train under the resource gate, then delta → codec → ``Update``.

No MQTT here: the agent pulls the model, calls ``train_and_encode`` and owns the outbox.
"""

from __future__ import annotations

import asyncio
import random
import time
import zlib
from dataclasses import dataclass

import numpy as np

from edge_agent.crash import CrashPoints
from edge_agent.data import Dataset, check_dataset, data_abort_reason
from edge_agent.errors import Aborted, DataError
from edge_agent.gate import abort_reason
from edge_agent.models import VerifiedModel
from edge_agent.pacing import ComputePacer
from edge_agent.probe import DeviceProbe, ProbeReading
from edge_agent.settings import AgentSettings
from edge_agent.torch_models import ModelMismatch
from edge_agent.trainers import Trainer, TrainRun
from schemas.codec import encode_update
from schemas.messages import Task, Update, UpdateChunk
from schemas.types import F32


@dataclass(frozen=True, slots=True)
class Encoded:
    update: Update
    residual: F32 | None  # new error-feedback residual (None: feedback off)


def backoff_delay(attempt: int, lo: float, hi: float, rng: random.Random) -> float:
    """Exponential backoff with equal jitter: uniform in [d/2, d], d = min(hi, lo * 2^attempt)."""
    d = min(hi, lo * 2.0 ** min(attempt, 60))
    return rng.uniform(d / 2.0, d)


def _step(run: TrainRun, n: int) -> bool:
    try:
        return run.step(n)
    except FloatingPointError:
        raise Aborted("diverged") from None


def check(task: Task, start: ProbeReading, probe: DeviceProbe) -> None:
    """Raise ``Aborted`` if the deadline passed or the resource gate now fails."""
    if time.time() > task.deadline_ts:
        raise Aborted("deadline")
    reason = abort_reason(
        start, probe.read(), min_battery=task.min_battery, allow_metered=task.allow_metered
    )
    if reason is not None:
        raise Aborted(reason)


async def train_and_encode(
    task: Task,
    model: VerifiedModel,
    start: ProbeReading,
    *,
    trainer: Trainer,
    dataset: Dataset,
    probe: DeviceProbe,
    settings: AgentSettings,
    residual: F32 | None,
    crash: CrashPoints | None = None,
    pacer: ComputePacer | None = None,
) -> Encoded:
    """Train on ``dataset`` (the device's training rows, raw labels) in slices (yielding to
    the loop, re-checking the gate), let ``pacer`` wait (simulated compute time; default:
    none), then encode ``new - base`` (+ residual) per shard."""
    manifest = model.manifest
    if manifest.job_id != task.job_id:
        raise Aborted("job_mismatch")
    t0 = time.monotonic()
    probe.set_training(True)
    try:
        seed = settings.seed ^ zlib.crc32(task.task_id.encode())
        spec = manifest.spec
        try:  # raw labels -> the job's class indices
            rows = check_dataset(dataset, n_features=spec.n_features, n_classes=spec.n_classes,
                                 labels=spec.labels)  # fmt: skip
        except DataError as exc:
            raise Aborted(data_abort_reason(exc)) from None
        try:
            run = trainer.start(spec, model.params, rows.x, rows.y, task.train, seed=seed)
        except ValueError as exc:
            raise Aborted(f"data:{exc}"[:120]) from None
        except ModelMismatch as exc:  # an onnx job's module is not its graph on this device
            raise Aborted(exc.reason) from None
        while not _step(run, settings.batches_per_step):
            if crash is not None:
                crash.hit("during_training")
            await asyncio.sleep(0)
            check(task, start, probe)
        check(task, start, probe)
        if pacer is not None:
            await pacer.after_training(run.samples_seen, lambda: check(task, start, probe))
    finally:
        probe.set_training(False)
    train_seconds = time.monotonic() - t0
    delta = (run.params - model.params).astype(np.float32, copy=False)
    if not np.all(np.isfinite(delta)):
        raise Aborted("diverged")
    ef = task.codec.error_feedback
    if not ef or (residual is not None and residual.shape != delta.shape):
        residual = None  # feedback off, or the model changed shape: start afresh
    frames, new_residual = encode_update(delta, manifest.shard_bounds, task.codec, residual)
    chunks = [
        UpdateChunk(
            shard=sh, start=a, stop=b, base_version=manifest.shard_versions[sh], payload=frame
        )
        for sh, a, b, frame in frames
    ]
    loss = float(run.mean_loss)
    update = Update(
        update_id=task.task_id,  # deterministic: re-sends and re-issues dedupe server-side
        task_id=task.task_id,
        job_id=task.job_id,
        device_id=settings.device_id,
        upload_token=task.upload_token,
        num_samples=max(1, len(dataset)),
        chunks=chunks,
        train_loss=loss if np.isfinite(loss) and loss >= 0 else 0.0,
        train_seconds=train_seconds,
        sent_ts=time.time(),
    )
    return Encoded(update, new_residual if ef else None)
