"""Issuing one task: its record and lease (``TaskStore``), the device marked busy
(``FleetStore.assign_task``), then the ``Task`` handed to the ``TaskSink``; a task the sink
refused is rolled back so no lease waits for a task nobody will receive. The selector
issues training tasks with it, ``coordinator.sidetasks`` evaluation and statistics tasks.

The upload token is derived (``tasks.derive_token``) from the task id with the deployment's
task key: Redis keeps its SHA-256, the sink gets the task with ``upload_token=""`` and the
dispatcher derives the same token again right before the push to the device."""

from __future__ import annotations

import msgspec

from coordinator.fleet import FleetStore
from coordinator.task_sink import TaskSink
from coordinator.tasks import TaskStore, derive_token
from schemas.messages import Task


async def issue_task(
    task: Task, *, key: bytes, tasks: TaskStore, fleet: FleetStore, sink: TaskSink,
    reissue_of: str = "", round_no: int = 0,
) -> Task:  # fmt: skip
    """Record, lease and send ``task`` (its ``task_kind`` picks the lease, see
    ``TaskStore.create``) with its token derived from ``key``; the sink gets it without
    a token. Returns the task as its device receives it (token filled in). Raises what the
    sink raises, after rolling the task back."""
    token = derive_token(key, task.task_id)
    await tasks.create(
        task_id=task.task_id, job_id=task.job_id, device_id=task.device_id,
        token=token, issued_ts=task.issued_ts, deadline_ts=task.deadline_ts,
        reissue_of=reissue_of, round_no=round_no, kind=task.task_kind,
        model_version=task.model_version,
    )  # fmt: skip
    # evaluation and statistics tasks do not count toward a device's daily_cap
    await fleet.assign_task(task.device_id, task.task_id, task.issued_ts,
                            counts=task.task_kind == "train")  # fmt: skip
    try:
        await sink.send(msgspec.structs.replace(task, upload_token=""))
    except Exception:
        rec = await tasks.get(task.task_id)
        if rec is not None:
            await tasks.transition(rec, "aborted", ("offered",), reason="produce_failed")
        await fleet.release_task(task.device_id, task.task_id, contributed=False)
        raise
    return msgspec.structs.replace(task, upload_token=token)
