"""``eval`` and ``stats`` tasks: score a model on the held-out rows, summarise the training
rows. Answered by an ``EvalReport`` / ``StatsReport`` on ``fleet/{id}/report``.

Pure core: ``score`` (example-summed cross-entropy, correct, per-class counts with the
reference forward pass ``schemas.modelspec.forward``, standardisation included) and
``feature_stats`` (float64 sums), wrapped into reports by ``eval_report`` /
``stats_report``. ``build_report`` is the thin async shell: it fetches what the task needs
from the ``ModelStore`` (the version to score; for stats only the manifest) and turns data
problems into ``Aborted("data_<code>: ...")``. Nothing here touches the outbox or the
error-feedback residual.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from edge_agent.data import Dataset, check_dataset, check_features, data_abort_reason
from edge_agent.errors import Aborted, DataError
from edge_agent.holdout import Split
from edge_agent.inference import logits_fn
from edge_agent.labels import MAX_LABEL_CHARS
from edge_agent.link import DeviceLink
from edge_agent.model_cache import ModelStore, manifest_for_stats, pull_for_eval
from edge_agent.models import VerifiedModel
from schemas.messages import EvalReport, ModelManifest, ModelSpecMsg, StatsReport, Task
from schemas.modelspec import forward
from schemas.types import F32

_CHUNK = 4096  # rows per forward pass (bounds the logits' memory)
_MAX_DISTINCT_LABELS = 1 << 16  # StatsReport limit


@dataclass(frozen=True, slots=True)
class EvalCounts:
    """Sums over scored rows; ``class_*`` are ``n_classes`` long."""

    num_examples: int = 0
    loss_sum: float = 0.0
    correct: int = 0
    class_examples: list[int] = field(default_factory=list)
    class_correct: list[int] = field(default_factory=list)


def score(spec: ModelSpecMsg, params: F32, x: F32, y: npt.NDArray[np.int64], *,
          logits: Callable[[F32], F32] | None = None) -> EvalCounts:  # fmt: skip
    """Score the model on raw features ``x`` with class indices ``y``: sum of per-row
    natural-log cross-entropy (log-sum-exp in float64), rows predicted right (argmax, ties
    to the lowest class), and both per true class. ``logits``: the model's forward pass
    (default: the numpy reference of a built-in family)."""
    k = spec.n_classes
    run = logits if logits is not None else functools.partial(forward, spec, params)
    loss, correct = 0.0, 0
    class_examples = np.bincount(y, minlength=k)[:k] if y.size else np.zeros(k, np.int64)
    class_correct = np.zeros(k, np.int64)
    for a in range(0, len(y), _CHUNK):
        yb = y[a : a + _CHUNK]
        with np.errstate(over="ignore", invalid="ignore"):  # a diverged model: checked below
            z = run(x[a : a + _CHUNK]).astype(np.float64)
            pred = z.argmax(axis=1)
            z -= z.max(axis=1, keepdims=True)
            lse = np.log(np.exp(z).sum(axis=1))
            loss += float(np.sum(lse - z[np.arange(len(yb)), yb]))
        hit = pred == yb
        correct += int(hit.sum())
        class_correct += np.bincount(yb[hit], minlength=k)[:k]
    if not np.isfinite(loss):
        raise Aborted("diverged")
    return EvalCounts(
        num_examples=len(y),
        loss_sum=max(0.0, loss),
        correct=correct,
        class_examples=[int(v) for v in class_examples],
        class_correct=[int(v) for v in class_correct],
    )


def feature_stats(x: F32) -> tuple[list[float], list[float]]:
    """Per-feature sum and sum of squares, accumulated in float64."""
    total = np.zeros(x.shape[1], np.float64)
    squares = np.zeros(x.shape[1], np.float64)
    for a in range(0, x.shape[0], _CHUNK):
        xb = x[a : a + _CHUNK].astype(np.float64)
        total += xb.sum(axis=0)
        squares += np.square(xb).sum(axis=0)
    return total.tolist(), squares.tolist()


def check_job(manifest: ModelManifest, task: Task) -> None:
    """The model pulled must belong to the task's job."""
    if manifest.job_id != task.job_id:
        raise Aborted("job_mismatch")


def eval_report(task: Task, model: VerifiedModel, holdout: Dataset, device_id: str) -> EvalReport:
    """Score ``model`` on the held-out rows (checked against the job: ``DataError``). No
    held-out rows: a report of zero examples."""
    spec = model.manifest.spec
    if len(holdout) == 0:
        counts = EvalCounts(class_examples=[0] * spec.n_classes,
                            class_correct=[0] * spec.n_classes)  # fmt: skip
    else:
        rows = check_dataset(holdout, n_features=spec.n_features, n_classes=spec.n_classes,
                             labels=spec.labels)  # fmt: skip
        logits = logits_fn(spec, model.params, model.artifact)
        counts = score(spec, model.params, rows.x, rows.y, logits=logits)
    return EvalReport(
        task_id=task.task_id,
        job_id=task.job_id,
        device_id=device_id,
        upload_token=task.upload_token,
        model_version=model.manifest.version,
        num_examples=counts.num_examples,
        loss_sum=counts.loss_sum,
        correct=counts.correct,
        class_examples=counts.class_examples,
        class_correct=counts.class_correct,
        ts=time.time(),
    )


def stats_report(task: Task, spec: ModelSpecMsg, rows: Dataset, device_id: str) -> StatsReport:
    """Statistics of the training rows: their count, per-feature float64 sum and sum of
    squares, rows per raw label. Labels the job does not know are reported, not refused
    (the coordinator fails the job on them); a wrong feature count or no rows is a
    ``DataError``."""
    if len(rows) == 0:
        raise DataError("empty", "no rows to train on")
    check_features(rows, spec.n_features)
    counts = rows.label_counts()
    if len(counts) > _MAX_DISTINCT_LABELS:
        raise DataError("labels", f"{len(counts)} distinct labels (at most "
                                  f"{_MAX_DISTINCT_LABELS})")  # fmt: skip
    long = next((raw for raw in counts if len(raw) > MAX_LABEL_CHARS), None)
    if long is not None:
        raise DataError("labels", f"label {long[:40]!r}... is longer than "
                                  f"{MAX_LABEL_CHARS} characters")  # fmt: skip
    total, squares = feature_stats(rows.x)
    return StatsReport(
        task_id=task.task_id,
        job_id=task.job_id,
        device_id=device_id,
        upload_token=task.upload_token,
        num_rows=len(rows),
        feature_sum=total,
        feature_sumsq=squares,
        label_counts=counts,
        ts=time.time(),
    )


async def build_report(
    task: Task, *, models: ModelStore, split: Split, device_id: str
) -> EvalReport | StatsReport:
    """The answer to an ``eval`` or ``stats`` task. Raises ``Aborted`` (data problems,
    ``job_mismatch``, ``diverged``) or the store's ``AgentError`` (model pull)."""
    try:
        if task.task_kind == "eval":
            model = await pull_for_eval(models, task.model_name, task.model_version)
            check_job(model.manifest, task)
            return eval_report(task, model, split.holdout, device_id)
        if task.task_kind == "stats":
            manifest = await manifest_for_stats(models, task.model_name)
            check_job(manifest, task)
            return stats_report(task, manifest.spec, split.train, device_id)
    except DataError as exc:
        raise Aborted(data_abort_reason(exc)) from None
    raise Aborted(f"task_kind_{task.task_kind}")


async def publish_until(
    publish: Callable[[], Awaitable[bool]],
    link: DeviceLink,
    deadline_ts: float,
    *,
    retry_s: float = 0.5,
) -> bool:
    """Publish a report (QoS 1, no ack comes back); while the link is down, wait for it
    and try again until ``deadline_ts``. False: the report could not be sent in time."""
    while not await publish():
        left = deadline_ts - time.time()
        if left <= 0:
            return False
        try:
            await link.wait_connected(min(left, 5.0))
        except TimeoutError:
            continue
        await asyncio.sleep(min(retry_s, max(0.0, deadline_ts - time.time())))
    return True
