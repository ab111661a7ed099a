"""Stop conditions on federated evaluations (pure): a target accuracy held for N complete
evaluations, and a plateau (no improvement over the last W). ``policy.stop_reason`` calls
these next to its update and wall-time limits."""

from __future__ import annotations

from collections.abc import Sequence


def target_reason(accuracies: Sequence[float], target: float, hold: int) -> str | None:
    """The last ``hold`` complete evaluations all reached ``target`` (0 = off)."""
    if target <= 0 or hold < 1 or len(accuracies) < hold:
        return None
    recent = accuracies[-hold:]
    if all(a >= target for a in recent):
        return (f"target_accuracy: {recent[-1]:.3f} >= {target:g} for {hold} evaluation"
                f"{'s' if hold != 1 else ''}")  # fmt: skip
    return None


def plateau_reason(accuracies: Sequence[float], window: int, delta: float) -> str | None:
    """The best of the last ``window`` complete evaluations does not beat the best before
    them by more than ``delta`` (0 = off; needs at least ``window + 1`` evaluations)."""
    if window <= 0 or len(accuracies) < window + 1:
        return None
    best_recent = max(accuracies[-window:])
    best_before = max(accuracies[:-window])
    if best_recent <= best_before + delta:
        return (f"plateau: best accuracy {best_recent:.3f} of the last {window} evaluations "
                f"does not beat {best_before:.3f} by more than {delta:g}")  # fmt: skip
    return None
