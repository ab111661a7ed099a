"""Federated evaluation, the pure part: which versions to evaluate, how reports combine,
when an evaluation is done, and what the REST API shows of it (no I/O).

Devices score a published version on their local held-out split and report *sums*
(``EvalReport``: examples, loss sum, correct, per-class examples and correct). The
coordinator adds them up per (job, version), so the combined figures are example-weighted:
``loss = Σ loss_sum / Σ examples``, ``accuracy = Σ correct / Σ examples`` — not a mean of
the devices' means. ``EvalStore`` (``coordinator.evalstore``) keeps the sums in Redis.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from schemas.messages import EvalReport


@dataclass(frozen=True, slots=True)
class Evaluation:
    """The combined reports of one evaluation of ``version``.

    ``closed_ts`` is set once it reached ``min_reports`` (``complete``) or timed out with
    what it had (``complete`` then says whether that was enough)."""

    version: int
    opened_ts: float
    reports: int = 0
    examples: int = 0
    loss_sum: float = 0.0
    correct: int = 0
    class_examples: tuple[int, ...] = field(default_factory=tuple)
    class_correct: tuple[int, ...] = field(default_factory=tuple)
    asked: int = 0  # eval tasks issued for it
    closed_ts: float | None = None
    complete: bool = False
    final: bool = False  # the evaluation of a completed job's final (pinned) version
    need: int = 0  # final: it closes once this many reported (or at its timeout)

    @property
    def loss(self) -> float | None:
        return self.loss_sum / self.examples if self.examples else None

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.examples if self.examples else None

    def to_json(self) -> dict[str, Any]:
        """The shape ``GET /v1/jobs/{id}/metrics`` and the job's ``federated`` show."""
        return {
            "version": self.version, "reports": self.reports, "examples": self.examples,
            "loss": self.loss, "accuracy": self.accuracy,
            "class_examples": list(self.class_examples),
            "class_correct": list(self.class_correct),
            "complete": self.complete, "final": self.final,
            "opened_ts": self.opened_ts, "closed_ts": self.closed_ts,
        }  # fmt: skip


def combine(version: int, opened_ts: float, reports: Iterable[EvalReport]) -> Evaluation:
    """The reference combination of ``reports`` (the store adds the same sums in Redis)."""
    n_classes = 0
    ce: list[int] = []
    cc: list[int] = []
    n = ex = cor = 0
    loss = 0.0
    for r in reports:
        n_classes = max(n_classes, len(r.class_examples))
        ce += [0] * (n_classes - len(ce))
        cc += [0] * (n_classes - len(cc))
        for i, (e, c) in enumerate(zip(r.class_examples, r.class_correct, strict=True)):
            ce[i] += e
            cc[i] += c
        n += 1
        ex += r.num_examples
        cor += r.correct
        loss += r.loss_sum
    return Evaluation(
        version=version, opened_ts=opened_ts, reports=n, examples=ex, loss_sum=loss,
        correct=cor, class_examples=tuple(ce), class_correct=tuple(cc),
    )  # fmt: skip


def report_problem(r: EvalReport, n_classes: int, task_version: int) -> str | None:
    """Why a (well-formed) report cannot count for its task, as a reason code."""
    if len(r.class_examples) != n_classes:
        return "shape"
    if task_version >= 0 and r.model_version != task_version:
        return "wrong_version"
    return None


def should_open(
    version: int, shard_versions: Sequence[int], last: int | None, every_versions: int
) -> bool:
    """Evaluate ``version``? Never the job's initial model (every shard at 0: nothing
    trained); the first trained version always; later ones ``every_versions`` apart."""
    if not any(shard_versions):
        return False
    return last is None or version - last >= every_versions


def final_need(devices: int, final_devices: int, min_reports: int) -> int:
    """How many reports a final evaluation waits for: ``final_devices`` (0: ``devices``),
    never fewer than ``min_reports``."""
    return max(final_devices or devices, min_reports)


def final_of(evals: Sequence[Evaluation]) -> Evaluation | None:
    """The final evaluation among ``evals`` (a completed job has at most one)."""
    for ev in reversed(evals):
        if ev.final:
            return ev
    return None


def timed_out(ev: Evaluation, timeout_s: float, now: float) -> bool:
    return ev.closed_ts is None and now - ev.opened_ts >= timeout_s


def wanted(ev: Evaluation, devices: int) -> int:
    """How many more devices an open evaluation should ask."""
    return 0 if ev.closed_ts is not None else max(0, devices - ev.asked)


def final_wanted(ev: Evaluation, outstanding: int) -> int:
    """How many more devices an open final evaluation should ask: its ``need`` less the
    reports it has and the tasks still out (a device whose task expired unreported is
    replaced by another)."""
    return 0 if ev.closed_ts is not None else max(0, ev.need - ev.reports - outstanding)


def latest_complete(evals: Sequence[Evaluation]) -> Evaluation | None:
    """The newest evaluation that reached its ``min_reports`` (evals oldest first)."""
    for ev in reversed(evals):
        if ev.complete:
            return ev
    return None


def complete_accuracies(evals: Sequence[Evaluation]) -> list[float]:
    """Accuracies of the complete evaluations, oldest first (what stop conditions read)."""
    return [ev.accuracy for ev in evals if ev.complete and ev.accuracy is not None]
