"""Durable outbox: encoded ``Update`` messages kept until the server acknowledges them,
plus the error-feedback residual per job.

``FileOutbox`` writes one file per pending update (``outbox/<update_id>.upd``), one per
accepted task still in training (``tasks/<task_id>.task``, resumed after a crash) and one per
residual (``residual/<job_id>.npy``), each atomically (write temp, fsync, rename); nothing
is written while a device is idle, so a thousand simulated devices cost no I/O.
``MemoryOutbox`` has the same contract without durability (simulation, tests).
"""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path
from typing import Protocol

import numpy as np

from schemas.atomic import atomic_write
from schemas.types import F32

log = logging.getLogger(__name__)


class Outbox(Protocol):
    def put(self, update_id: str, data: bytes) -> None: ...

    def remove(self, update_id: str) -> bool: ...

    def pending(self) -> list[tuple[str, bytes]]: ...

    def __contains__(self, update_id: object) -> bool: ...

    def load_residual(self, job_id: str) -> F32 | None: ...

    def save_residual(self, job_id: str, residual: F32 | None) -> None: ...

    def put_task(self, task_id: str, data: bytes) -> None:
        """Remember an accepted task until its update is in the outbox (or it aborted)."""
        ...

    def remove_task(self, task_id: str) -> None: ...

    def pending_tasks(self) -> list[tuple[str, bytes]]: ...


class MemoryOutbox:
    def __init__(self) -> None:
        self._items: dict[str, bytes] = {}
        self._residuals: dict[str, F32] = {}
        self._tasks: dict[str, bytes] = {}

    def put_task(self, task_id: str, data: bytes) -> None:
        self._tasks[task_id] = data

    def remove_task(self, task_id: str) -> None:
        self._tasks.pop(task_id, None)

    def pending_tasks(self) -> list[tuple[str, bytes]]:
        return list(self._tasks.items())

    def put(self, update_id: str, data: bytes) -> None:
        self._items[update_id] = data

    def remove(self, update_id: str) -> bool:
        return self._items.pop(update_id, None) is not None

    def pending(self) -> list[tuple[str, bytes]]:
        return list(self._items.items())

    def __contains__(self, update_id: object) -> bool:
        return update_id in self._items

    def load_residual(self, job_id: str) -> F32 | None:
        return self._residuals.get(job_id)

    def save_residual(self, job_id: str, residual: F32 | None) -> None:
        if residual is None:
            self._residuals.pop(job_id, None)
        else:
            self._residuals[job_id] = residual


def _safe(name: str) -> str:
    # ids are [A-Za-z0-9._:-]; ':' is not portable in file names
    return name.replace(":", "%3A")


def _unsafe(name: str) -> str:
    return name.replace("%3A", ":")


class FileOutbox:
    def __init__(self, state_dir: Path) -> None:
        self._out = state_dir / "outbox"
        self._res = state_dir / "residual"
        self._tasks = state_dir / "tasks"
        for d in (self._out, self._res, self._tasks):
            d.mkdir(parents=True, exist_ok=True)
            for tmp in d.glob("*.tmp"):
                tmp.unlink(missing_ok=True)  # half-written by a crash: never acknowledged

    @staticmethod
    def _write(path: Path, data: bytes) -> None:
        atomic_write(path, data)

    def put(self, update_id: str, data: bytes) -> None:
        self._write(self._out / f"{_safe(update_id)}.upd", data)

    def remove(self, update_id: str) -> bool:
        path = self._out / f"{_safe(update_id)}.upd"
        existed = path.exists()
        path.unlink(missing_ok=True)
        return existed

    def pending(self) -> list[tuple[str, bytes]]:
        out: list[tuple[str, bytes]] = []
        for path in sorted(self._out.glob("*.upd"), key=lambda p: p.stat().st_mtime):
            try:
                out.append((_unsafe(path.stem), path.read_bytes()))
            except OSError as exc:
                log.warning("outbox entry %s unreadable: %s", path.name, exc)
        return out

    def __contains__(self, update_id: object) -> bool:
        return isinstance(update_id, str) and (self._out / f"{_safe(update_id)}.upd").exists()

    def put_task(self, task_id: str, data: bytes) -> None:
        self._write(self._tasks / f"{_safe(task_id)}.task", data)

    def remove_task(self, task_id: str) -> None:
        (self._tasks / f"{_safe(task_id)}.task").unlink(missing_ok=True)

    def pending_tasks(self) -> list[tuple[str, bytes]]:
        out: list[tuple[str, bytes]] = []
        for path in sorted(self._tasks.glob("*.task")):
            with contextlib.suppress(OSError):
                out.append((_unsafe(path.stem), path.read_bytes()))
        return out

    def load_residual(self, job_id: str) -> F32 | None:
        path = self._res / f"{_safe(job_id)}.npy"
        try:
            arr = np.load(path, allow_pickle=False)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("residual %s unreadable, starting from zero: %s", path.name, exc)
            return None
        return np.asarray(arr, dtype=np.float32)

    def save_residual(self, job_id: str, residual: F32 | None) -> None:
        path = self._res / f"{_safe(job_id)}.npy"
        if residual is None:
            path.unlink(missing_ok=True)
            return
        buf = io.BytesIO()
        np.save(buf, np.asarray(residual, dtype=np.float32), allow_pickle=False)
        self._write(path, buf.getvalue())
