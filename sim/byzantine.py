"""Byzantine devices: attack models as a ``Trainer`` wrapper around any real trainer.

A Byzantine device trains honestly (so its timing, loss and sample counts look normal) and
then uploads a forged model: ``base + attack(delta)`` where ``delta`` is what it really
learnt. The attacks (:data:`ATTACKS`):

* ``sign_flip``: ``-k * delta`` (``k = sign_flip_k``, default 4): pushes against learning;
* ``scaled``: ``scale * delta`` (default 100): an honest direction, a huge step;
* ``random``: a Gaussian direction of L2 norm ``random_norm`` (default 100): noise;
* ``bias``: ``delta`` plus ``bias_value`` (default 1e4) on one bias of the output layer:
  the hostile tester's single-upload attack (one class wins every prediction).

``ByzantineTrainer(NumpyTrainer(), Attack("scaled"))`` is a drop-in ``Trainer`` for an
``EdgeAgent`` (``trainer=``); ``bench/byzantine.py`` uses it in a single-process fleet.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

import numpy as np

from edge_agent.trainers import Labels, Trainer, TrainRun
from schemas.messages import ModelSpecMsg, TrainConfig
from schemas.modelspec import layout
from schemas.types import F32

AttackKind = Literal["sign_flip", "scaled", "random", "bias"]
ATTACKS: Final[tuple[AttackKind, ...]] = ("sign_flip", "scaled", "random", "bias")


@dataclass(frozen=True, slots=True, kw_only=True)
class Attack:
    """One attack model and its strength."""

    kind: AttackKind
    sign_flip_k: float = 4.0
    scale: float = 100.0
    random_norm: float = 100.0
    bias_value: float = 1e4

    def __post_init__(self) -> None:
        if self.kind not in ATTACKS:
            raise ValueError(f"unknown attack {self.kind!r}; one of {', '.join(ATTACKS)}")


def output_bias_index(spec: ModelSpecMsg) -> int:
    """Flat index of the first bias of the model's last layer (``b`` / ``b2`` / the last
    1-D tensor of an onnx model)."""
    biases = [t for t in layout(spec) if len(t.shape) == 1]
    if not biases:
        raise ValueError("the model has no 1-D (bias) tensor")
    return int(biases[-1].offset)


def forge(spec: ModelSpecMsg, delta: F32, attack: Attack, rng: np.random.Generator) -> F32:
    """The delta a Byzantine device uploads instead of ``delta`` (a new array)."""
    d = np.asarray(delta, dtype=np.float32)
    if attack.kind == "sign_flip":
        return (d * np.float32(-attack.sign_flip_k)).astype(np.float32)
    if attack.kind == "scaled":
        return (d * np.float32(attack.scale)).astype(np.float32)
    if attack.kind == "random":
        g = rng.standard_normal(d.size)
        return (g * (attack.random_norm / max(float(np.linalg.norm(g)), 1e-12))).astype(np.float32)
    out = d.copy()
    out[output_bias_index(spec)] += np.float32(attack.bias_value)
    return out


class ByzantineRun:
    """A real run whose final ``params`` are ``base + forge(delta)``."""

    def __init__(
        self, inner: TrainRun, spec: ModelSpecMsg, base: F32, attack: Attack, seed: int
    ) -> None:
        self._inner = inner
        self._spec = spec
        self._base = np.array(base, dtype=np.float32, copy=True)
        self._attack = attack
        self._seed = seed
        self._forged: F32 | None = None

    @property
    def done(self) -> bool:
        return self._inner.done

    @property
    def params(self) -> F32:
        if not self._inner.done:
            return self._inner.params
        if self._forged is None:
            delta = (self._inner.params - self._base).astype(np.float32)
            rng = np.random.default_rng([self._seed, 0xB12])
            self._forged = (self._base + forge(self._spec, delta, self._attack, rng)).astype(
                np.float32
            )
        return self._forged

    @property
    def mean_loss(self) -> float:
        return self._inner.mean_loss

    @property
    def samples_seen(self) -> int:
        return self._inner.samples_seen

    def step(self, max_batches: int) -> bool:
        return self._inner.step(max_batches)


class ByzantineTrainer:
    """``Trainer`` that trains with ``inner`` and forges the result with ``attack``."""

    def __init__(self, inner: Trainer, attack: Attack) -> None:
        self.inner = inner
        self.attack = attack

    def start(
        self,
        spec: ModelSpecMsg,
        base: F32,
        x: F32,
        y: Labels,
        cfg: TrainConfig,
        *,
        seed: int = 0,
    ) -> ByzantineRun:
        run = self.inner.start(spec, base, x, y, cfg, seed=seed)
        return ByzantineRun(run, spec, base, self.attack, seed)
