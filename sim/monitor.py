"""Watching a job through the coordinator's REST API: model accuracy on held-out data
(central, a cross-check), the latest federated evaluation (devices' own held-out splits,
``GET /v1/jobs/{id}/metrics``), updates applied, staleness, devices by state; and a live
progress view."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import numpy as np

from edge_agent.data import Dataset
from edge_agent.errors import AgentError
from edge_agent.inference import logits_fn
from edge_agent.models import ModelClient
from edge_agent.trainers import accuracy
from schemas.messages import ModelSpecMsg
from schemas.types import F32
from stack.errors import StackError


@dataclass
class Snapshot:
    version: int = -1
    shard_versions: list[int] = field(default_factory=list)
    accuracy: float = 0.0
    updates_applied: int = 0  # applied on every shard (the fewest any shard applied)
    updates_accepted: int = 0  # acknowledged to devices
    updates_lost: int = 0  # refused by a shard after the ack (should stay 0)
    mean_staleness: float = 0.0
    fleet: dict[str, Any] = field(default_factory=dict)
    t: float = 0.0
    # the newest complete federated evaluation (None: none yet, or no metrics route)
    fed_accuracy: float | None = None
    fed_loss: float | None = None
    fed_version: int | None = None


class ModelMonitor:
    """Pulls the latest model like a device would (``edge_agent.models.ModelClient``: digest
    and Ed25519 signature checked) and scores it on a test set."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        model: str,
        job_id: str,
        test: Dataset,
        *,
        public_key_hex: str = "",
    ) -> None:
        self.http = http
        self.model = model
        self.job_id = job_id
        self.test = test
        self.models = ModelClient(http, str(http.base_url), public_key_hex=public_key_hex)
        self.snap = Snapshot()
        self.history: list[Snapshot] = []
        self.fed_by_version: dict[int, float] = {}  # every complete federated evaluation
        # the same versions scored on the central test set (the cross-check)
        self.central_by_version: dict[int, float] = {}
        self._tried: set[int] = set()

    async def federated(self) -> dict[str, Any] | None:
        """The newest complete federated evaluation; None when there is none or the
        coordinator does not serve ``/v1/jobs/{id}/metrics`` (any failure: None)."""
        try:
            r = await self.http.get(f"/v1/jobs/{self.job_id}/metrics")
        except httpx.HTTPError:
            return None
        if r.status_code != 200:
            return None
        try:
            body = r.json()
        except ValueError:
            return None
        if not isinstance(body, dict):
            return None
        for ev in body.get("evaluations") or []:
            if isinstance(ev, dict) and ev.get("complete"):
                with contextlib.suppress(TypeError, ValueError):
                    self.fed_by_version[int(ev["version"])] = float(ev["accuracy"])
        latest = body.get("latest")
        if not isinstance(latest, dict):
            return None
        try:
            loss = latest.get("loss")
            return {"version": int(latest["version"]), "accuracy": float(latest["accuracy"]),
                    "loss": None if loss is None else float(loss)}  # fmt: skip
        except (KeyError, TypeError, ValueError):
            return None

    async def _score_evaluated(self) -> None:
        """Score every federated-evaluated version centrally too (once each)."""
        for v in sorted(set(self.fed_by_version) - self._tried):
            try:
                m = await self.models.pull_version(self.model, v)
            except AgentError:
                continue
            self._tried.add(v)
            if m.manifest.version == v:  # (a version the registry no longer keeps: skip)
                self.central_by_version[v] = await self._accuracy(m.manifest.spec, m.params)

    async def _accuracy(self, spec: ModelSpecMsg, flat: F32) -> float:
        """Central held-out accuracy of ``flat`` (an onnx job: onnxruntime on its artifact,
        off the event loop; built-ins: the numpy reference)."""
        if spec.family != "onnx":
            return accuracy(spec, flat, self.test.x, self.test.y)
        try:
            art = await self.models.artifact(spec.artifact)
        except AgentError as exc:
            raise StackError(f"model {self.model}: artifact: {exc}") from None

        def score() -> float:
            z = logits_fn(spec, flat, art)(self.test.x.astype(np.float32))
            return float((z.argmax(axis=1) == self.test.y).mean())

        return await asyncio.to_thread(score)

    async def _json(self, path: str) -> Any:
        r = await self.http.get(path)
        if r.status_code != 200:
            raise StackError(f"GET {path}: {r.status_code} {r.text[:200]}")
        return r.json()

    async def poll(self) -> Snapshot:
        try:
            man = await self.models.latest_manifest(self.model)
            flat = await self.models.weights(man) if man.version != self.snap.version else None
        except AgentError as exc:
            raise StackError(f"model {self.model}: {exc}") from None
        job = await self._json(f"/v1/jobs/{self.job_id}")
        fleet = await self._json("/v1/fleet")
        snap = Snapshot(
            version=self.snap.version,
            shard_versions=self.snap.shard_versions,
            accuracy=self.snap.accuracy,
            t=time.monotonic(),
            fed_accuracy=self.snap.fed_accuracy,
            fed_loss=self.snap.fed_loss,
            fed_version=self.snap.fed_version,
        )
        fed = await self.federated()
        await self._score_evaluated()
        if fed is not None:
            snap.fed_accuracy, snap.fed_loss = fed["accuracy"], fed["loss"]
            snap.fed_version = fed["version"]
        if flat is not None:
            snap.accuracy = await self._accuracy(man.spec, flat)
            snap.version = man.version
            snap.shard_versions = list(man.shard_versions)
        snap.updates_applied = int(job.get("updates_applied", 0))
        snap.updates_accepted = int(job.get("updates_accepted", 0))
        snap.updates_lost = int(job.get("updates_rejected_by_shards", 0))
        snap.mean_staleness = float(job.get("mean_staleness", 0.0))
        snap.fleet = fleet
        self.snap = snap
        self.history.append(snap)
        return snap

    async def drain(self, *, quiet_s: float, timeout_s: float) -> Snapshot:
        """Poll until every shard has applied (or refused) every acknowledged update and no
        new model version appeared for ``quiet_s``, or ``timeout_s`` passed. (A busy
        shard's last announcement can come seconds after the others': quiet versions
        alone are not enough.)"""
        start = last_change = time.monotonic()
        version = self.snap.version
        while True:
            snap = await self.poll()
            now = time.monotonic()
            if snap.version != version:
                version, last_change = snap.version, now
            settled = snap.updates_applied + snap.updates_lost >= snap.updates_accepted
            if (settled and now - last_change >= quiet_s) or now - start >= timeout_s:
                return snap
            await asyncio.sleep(0.25)

    async def export_onnx(self, path: Path) -> tuple[int, float]:
        """Download the latest verified ONNX artifact, write it, score it in onnxruntime."""
        import onnxruntime as ort

        try:
            art = await self.models.onnx(self.model, self.snap.version)
        except AgentError as exc:
            raise StackError(f"latest.onnx: {exc}") from None
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(art.data)
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        logits = sess.run(None, {name: self.test.x.astype(np.float32)})[0]
        acc = float((np.asarray(logits).argmax(axis=1) == self.test.y).mean())
        return art.version, acc


class ProgressView:
    """A rich progress bar toward the target accuracy, with fleet and training figures."""

    def __init__(self, target: float, budget_s: float, *, quiet: bool = False) -> None:
        self.target = target
        self.budget_s = budget_s
        self.quiet = quiet
        self._progress: Any = None
        self._task: Any = None
        self._last_line = 0.0

    def __enter__(self) -> ProgressView:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        console = Console(file=sys.stderr)
        if not console.is_terminal or self.quiet:
            return self
        self._progress = Progress(
            TextColumn("held-out accuracy"), BarColumn(), TextColumn("{task.fields[acc]}"),
            TimeElapsedColumn(), TextColumn("{task.fields[info]}"), console=console,
        )  # fmt: skip
        self._progress.start()
        self._task = self._progress.add_task("train", total=self.target, acc="0.000", info="")
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._progress is not None:
            self._progress.stop()

    def update(self, snap: Snapshot, fleet_stats: dict[str, Any]) -> None:
        by_state = snap.fleet.get("by_state") or snap.fleet.get("counts") or {}
        states = " ".join(f"{k}={v}" for k, v in sorted(by_state.items())) if by_state else ""
        info = (
            f"{fed_text(snap)} v{snap.version} updates={snap.updates_applied} "
            f"staleness={snap.mean_staleness:.2f} training={snap.fleet.get('training_now', '?')}"
            f" {states}"
        )
        if self._progress is not None:
            self._progress.update(
                self._task, completed=min(snap.accuracy, self.target),
                acc=f"{snap.accuracy:.3f}", info=info,
            )  # fmt: skip
            return
        now = time.monotonic()
        if now - self._last_line >= 5.0:
            self._last_line = now
            print(f"[demo] accuracy {snap.accuracy:.3f} {info}", file=sys.stderr, flush=True)


def fed_text(snap: Snapshot) -> str:
    """``fed=0.912@v10`` (the latest federated evaluation), ``fed=-`` before the first."""
    if snap.fed_accuracy is None:
        return "fed=-"
    return f"fed={snap.fed_accuracy:.3f}@v{snap.fed_version}"
