"""The built-in trainer named by ``AgentSettings.trainer``: ``numpy`` or ``torch``.

Kept apart from both trainers so that neither imports the other's module: the PyTorch
trainer builds on the numpy one, and this factory knows them both.
"""

from __future__ import annotations

from edge_agent.onnx_trainer import OnnxTorchTrainer
from edge_agent.torch_trainer import TorchTrainer
from edge_agent.trainers import Labels, NumpyTrainer, Trainer, TrainRun
from schemas.messages import ModelSpecMsg, TrainConfig
from schemas.types import F32


def make_trainer(kind: str = "numpy") -> Trainer:
    """The built-in trainer named by ``kind`` (``torch`` itself is imported lazily)."""
    if kind == "numpy":
        return NumpyTrainer()
    if kind == "torch":
        return TorchTrainer()
    raise ValueError(f"unknown trainer {kind!r}")


class ArtifactTrainer:
    """The ``Trainer`` protocol for one ``onnx`` job: ``OnnxTorchTrainer`` given the job's
    verified artifact (PyTorch; a device without it aborts with ``torch_missing``)."""

    def __init__(self, inner: OnnxTorchTrainer, artifact: bytes) -> None:
        self.inner = inner
        self.artifact = artifact

    def start(self, spec: ModelSpecMsg, base: F32, x: F32, y: Labels, cfg: TrainConfig,
              *, seed: int = 0) -> TrainRun:  # fmt: skip
        return self.inner.start(spec, base, x, y, cfg, seed=seed, artifact=self.artifact)
