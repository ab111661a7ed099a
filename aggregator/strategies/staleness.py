"""Staleness functions s(d) of FedAsync (Xie et al., 2019), d = t - tau >= 0."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from aggregator.errors import ConfigError

StalenessFn = Callable[[int], float]
StalenessName = Literal["constant", "polynomial", "hinge"]


def constant(d: int) -> float:
    """s(d) = 1."""
    return 1.0


def polynomial(d: int, a: float) -> float:
    """s(d) = (d + 1) ** -a."""
    return float((d + 1) ** -a)


def hinge(d: int, a: float, b: float) -> float:
    """s(d) = 1 if d <= b else 1 / (a (d - b) + 1)."""
    if d <= b:
        return 1.0
    return 1.0 / (a * (d - b) + 1.0)


def make_staleness(name: str, a: float = 0.5, b: float = 4.0) -> StalenessFn:
    """The staleness function called ``name`` with its parameters bound."""
    if name == "constant":
        return constant
    if name == "polynomial":
        return lambda d: polynomial(d, a)
    if name == "hinge":
        return lambda d: hinge(d, a, b)
    raise ConfigError(f"unknown staleness function {name!r}")
