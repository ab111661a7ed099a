"""Federated preprocessing, the pure part: a ``standardize`` job's statistics phase.

Devices report per-feature count, sum and sum of squares of their training rows and the
rows per raw label (``StatsReport``); no row leaves a device. The coordinator adds the
sums (``coordinator.evalstore.StatsStore``) and, once enough devices reported, fixes the
model's input standardisation in float64::

    mean = Σ sum / Σ n        var = max(Σ sumsq / Σ n - mean², 0)        std = sqrt(var)

with a constant feature (std < 1e-8) getting std 1.0. Before that, every raw label must be
one of the job's classes (an integer string in 0..n_classes-1, or one of ``spec.labels``);
otherwise the job fails with ``data_labels: ...`` before any training.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import msgspec

from schemas.messages import JobSpec, ModelSpecMsg, StatsReport

MIN_STD = 1e-8
Phase = Literal["statistics", "training", "ended"]


def job_phase(spec: JobSpec) -> Phase:
    """``statistics`` while a running ``standardize`` job has no input standardisation
    yet (only ``stats`` tasks), ``training`` while it runs, ``ended`` otherwise."""
    if spec.status != "running":
        return "ended"
    if spec.standardize and not spec.spec.input_mean:
        return "statistics"
    return "training"


@dataclass(frozen=True, slots=True)
class FeatureStats:
    """Sums over every reporting device (what the Redis hash holds)."""

    reports: int = 0
    rows: int = 0
    feature_sum: tuple[float, ...] = ()
    feature_sumsq: tuple[float, ...] = ()
    label_rows: Mapping[str, int] = field(default_factory=dict)  # raw label -> rows
    label_devices: Mapping[str, int] = field(default_factory=dict)  # raw label -> devices
    opened_ts: float = 0.0


def combine(reports: Sequence[StatsReport]) -> FeatureStats:
    """The reference sum of ``reports`` (all ``n_features`` long)."""
    n = len(reports[0].feature_sum) if reports else 0
    s = [0.0] * n
    sq = [0.0] * n
    rows: dict[str, int] = {}
    devs: dict[str, int] = {}
    for r in reports:
        for i in range(n):
            s[i] += r.feature_sum[i]
            sq[i] += r.feature_sumsq[i]
        for label, k in r.label_counts.items():
            rows[label] = rows.get(label, 0) + k
            devs[label] = devs.get(label, 0) + 1
    return FeatureStats(
        reports=len(reports), rows=sum(r.num_rows for r in reports), feature_sum=tuple(s),
        feature_sumsq=tuple(sq), label_rows=rows, label_devices=devs,
    )  # fmt: skip


def mean_std(st: FeatureStats) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-feature mean and std (float64); a constant feature's std is 1.0."""
    if st.rows <= 0:
        raise ValueError("no rows to standardise on")
    mean: list[float] = []
    std: list[float] = []
    for s, sq in zip(st.feature_sum, st.feature_sumsq, strict=True):
        m = s / st.rows
        var = max(sq / st.rows - m * m, 0.0)
        sd = math.sqrt(var)
        mean.append(m)
        std.append(sd if sd >= MIN_STD and math.isfinite(sd) else 1.0)
    return tuple(mean), tuple(std)


def label_index(label: str, spec: ModelSpecMsg) -> int | None:
    """The class index of a raw label, None if the job has no such class."""
    if spec.labels and label in spec.labels:
        return spec.labels.index(label)
    text = label.strip()
    if text.isascii() and text.lstrip("-").isdigit():
        i = int(text)
        return i if 0 <= i < spec.n_classes else None
    return None


def label_problem(st: FeatureStats, spec: ModelSpecMsg) -> str | None:
    """``data_labels: ...`` for the first label (most rows) outside the job's classes."""
    bad = [lab for lab in st.label_rows if label_index(lab, spec) is None]
    if not bad:
        return None
    bad.sort(key=lambda lab: (-st.label_rows[lab], lab))
    lab = bad[0]
    more = f" (and {len(bad) - 1} more unknown labels)" if len(bad) > 1 else ""
    return (f"data_labels: label {lab[:40]!r} ({st.label_rows[lab]} rows on "
            f"{st.label_devices.get(lab, 0)} devices) is not one of the job's "
            f"{spec.n_classes} classes{more}")  # fmt: skip


def ready(
    st: FeatureStats, *, outstanding: int, more_devices: bool, min_reports: int,
    timeout_s: float, now: float,
) -> bool:  # fmt: skip
    """Fix the statistics now? ``min_reports`` devices reported; or every device there was
    to ask reported (none outstanding, none left to ask); or ``timeout_s`` passed since the
    phase opened — each with at least one report."""
    if st.reports < 1:
        return False
    if st.reports >= min_reports:
        return True
    if outstanding == 0 and not more_devices:
        return True
    return now - st.opened_ts >= timeout_s


def standardized_spec(spec: ModelSpecMsg, st: FeatureStats) -> ModelSpecMsg:
    """``spec`` with the input standardisation fixed from ``st``."""
    mean, std = mean_std(st)
    return msgspec.structs.replace(spec, input_mean=mean, input_std=std)
