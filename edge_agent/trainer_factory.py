"""The built-in trainer named by ``AgentSettings.trainer``: ``numpy`` or ``torch``.

Kept apart from both trainers so that neither imports the other's module: the PyTorch
trainer builds on the numpy one, and this factory knows them both.
"""

from __future__ import annotations

from edge_agent.torch_trainer import TorchTrainer
from edge_agent.trainers import NumpyTrainer, Trainer


def make_trainer(kind: str = "numpy") -> Trainer:
    """The built-in trainer named by ``kind`` (``torch`` itself is imported lazily)."""
    if kind == "numpy":
        return NumpyTrainer()
    if kind == "torch":
        return TorchTrainer()
    raise ValueError(f"unknown trainer {kind!r}")
