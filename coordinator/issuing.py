"""Issuing one task: its record and lease (``TaskStore``), the device marked busy
(``FleetStore.assign_task``), then the ``Task`` handed to the ``TaskSink``; a task the sink
refused is rolled back so no lease waits for a task nobody will receive. The selector
issues training tasks with it, ``coordinator.sidetasks`` evaluation and statistics tasks."""

from __future__ import annotations

from coordinator.fleet import FleetStore
from coordinator.task_sink import TaskSink
from coordinator.tasks import TaskStore
from schemas.messages import Task


async def issue_task(
    task: Task, *, tasks: TaskStore, fleet: FleetStore, sink: TaskSink,
    reissue_of: str = "", round_no: int = 0,
) -> None:  # fmt: skip
    """Record, lease and send ``task`` (its ``task_kind`` picks the lease, see
    ``TaskStore.create``). Raises what the sink raises, after rolling the task back."""
    await tasks.create(
        task_id=task.task_id, job_id=task.job_id, device_id=task.device_id,
        token=task.upload_token, issued_ts=task.issued_ts, deadline_ts=task.deadline_ts,
        reissue_of=reissue_of, round_no=round_no, kind=task.task_kind,
        model_version=task.model_version,
    )  # fmt: skip
    # evaluation and statistics tasks do not count toward a device's daily_cap
    await fleet.assign_task(task.device_id, task.task_id, task.issued_ts,
                            counts=task.task_kind == "train")  # fmt: skip
    try:
        await sink.send(task)
    except Exception:
        rec = await tasks.get(task.task_id)
        if rec is not None:
            await tasks.transition(rec, "aborted", ("offered",), reason="produce_failed")
        await fleet.release_task(task.device_id, task.task_id, contributed=False)
        raise
