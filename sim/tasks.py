"""The learning tasks ``fedfleet demo --task`` and ``fedfleet loadtest train --task`` train.

* ``digits`` — scikit-learn's 8x8 digits, the built-in ``softmax`` family (650 parameters),
  200 devices: the quick end-to-end run.
* ``mnist1d`` — MNIST-1D generated locally (``sim.mnist1d``: 60,000 training rows, 10,000
  test rows, never downloaded), a PyTorch 1D CNN of 102,282 parameters (``sim.cnn1d``)
  brought as the user's own model: exported to ONNX, uploaded with ``POST /v1/artifacts``,
  and built on the devices from its factory (``spec.torch_module``); 1,000 devices,
  non-IID (Dirichlet over labels), trained with Adam (``loadtest train --optimizer
  momentum --lr 0.05`` for top-k runs: top-k keeps the largest coordinates of an update,
  and Adam's per-coordinate normalisation makes every coordinate about as large as the
  next; see ``bench/mnist1d_fedasync.py``). Needs ``fedfleet[torch]``.

A task gives the data, the job's model part (a built-in spec, or an ONNX file plus spec
extras) and its own learning defaults (``DEFAULTS``; the demo and the load test lay their
flags over them). The defaults of ``mnist1d`` come from a single-process FedAsync reference
run (``bench/mnist1d_fedasync.py``; BENCHMARKS.md, "MNIST-1D"). Simulated devices load only
a task's rows (``task_data``), never its model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from edge_agent.data import Dataset
from stack.errors import StackError

TASKS = ("digits", "mnist1d")


@dataclass(frozen=True)
class Task:
    name: str
    model_name: str
    train: Dataset
    test: Dataset
    spec: dict[str, Any]  # a built-in family's spec, or extras for the artifact's spec
    artifact: bytes | None = None  # the ONNX file of a user model (None: built-in)
    train_extra: dict[str, Any] = field(default_factory=dict)  # e.g. the optimizer


# the learning settings of a task (what both the demo and ``loadtest train`` use)
LEARNING: dict[str, dict[str, Any]] = {
    "digits": {},
    "mnist1d": {
        "devices": 1000, "concurrency": 10, "lr": 2e-3, "local_epochs": 3, "batch_size": 16,
        "target_accuracy": 0.90, "publish_every": 5,
        # the CNN's accuracy moves a few points from version to version at first: stop
        # only after 10 versions in a row at the target (the in-flight uploads then land)
        "stable_versions": 10,
    },
}

# the demo's settings per task (DemoSettings field -> value); flags given win
DEFAULTS: dict[str, dict[str, Any]] = {
    "digits": {},
    "mnist1d": {
        **LEARNING["mnist1d"], "alpha": 0.6, "time_budget_s": 1200.0,
        "eval_every": 25, "eval_devices": 50, "final_devices": 300,
        # the reference: the same CNN trained centrally on the same rows, in the same run
        "central_epochs": 3,
    },
}


def task_data(name: str, seed: int) -> tuple[Dataset, Dataset]:
    """The task's (train, test) rows only: what a simulated device process loads."""
    if name == "digits":
        from edge_agent.data import load_digits_split

        return load_digits_split(seed=seed)
    if name == "mnist1d":
        try:
            from sim.mnist1d import load_mnist1d
        except ImportError as exc:  # pragma: no cover - the torch extra is missing
            raise StackError(f"task mnist1d needs fedfleet[torch]: {exc}") from None
        data = load_mnist1d(seed=0)  # one fixed data set; ``seed`` varies model and fleet
        return data.train, data.test
    raise StackError(f"unknown task {name!r} (one of {', '.join(TASKS)})")


def load_task(name: str, seed: int) -> Task:
    if name == "digits":
        train, test = task_data(name, seed)
        return Task("digits", "digits", train, test,
                    {"family": "softmax", "n_features": 64, "n_classes": 10})  # fmt: skip
    if name == "mnist1d":
        return _mnist1d(seed)
    raise StackError(f"unknown task {name!r} (one of {', '.join(TASKS)})")


def central_reference(task: Task, epochs: int, seed: int) -> dict[str, Any] | None:
    """The task's model trained centrally on the pooled training rows (``epochs`` of Adam;
    ``sim.cnn1d.central_train``), scored on the same test rows: what the federated run is
    compared with. None for tasks without one (digits) or ``epochs`` 0."""
    if task.name != "mnist1d" or epochs <= 0:
        return None
    from sim.cnn1d import central_train

    hist = central_train(task.train, task.test, epochs=epochs, seed=seed)
    return {"epochs": epochs, "accuracy": round(hist.accuracy[-1], 4),
            "accuracy_by_epoch": [round(a, 4) for a in hist.accuracy],
            "samples_per_s": round(hist.samples_per_s)}  # fmt: skip


def _mnist1d(seed: int) -> Task:
    try:
        from sim.cnn1d import export_onnx, make_cnn
    except ImportError as exc:  # pragma: no cover - the torch extra is missing
        raise StackError(f"task mnist1d needs fedfleet[torch]: {exc}") from None
    train, test = task_data("mnist1d", seed)
    try:
        artifact = export_onnx(make_cnn(seed))
    except Exception as exc:  # torch / onnx problems, typed for the user
        raise StackError(f"task mnist1d: {type(exc).__name__}: {exc}") from None
    return Task("mnist1d", "mnist1d-cnn", train, test,
                {"torch_module": "sim.cnn1d:make_cnn"}, artifact,
                {"optimizer": "adam"})  # fmt: skip


def codec_of(name: str) -> dict[str, Any]:
    """A codec's name -> the job's ``codec``: ``fp32`` (dense, unquantised), ``fp16``,
    ``int8``, or ``topk<F>-<quant>`` (the top ``F`` share of coordinates, e.g.
    ``topk0.01-int8``); error feedback stays on (the codec's default)."""
    quants = {"fp32": "none", "none": "none", "fp16": "fp16", "int8": "int8"}
    topk, _, quant = name.rpartition("-") if name.startswith("topk") else ("", "", name)
    if quant not in quants:
        raise StackError(f"unknown codec {name!r} (fp32, fp16, int8, "
                         "topk<F>-<fp32|fp16|int8>)")  # fmt: skip
    frac = 0.0
    if topk:
        try:
            frac = float(topk[len("topk"):])
        except ValueError:
            raise StackError(f"bad top-k share in {name!r}") from None
        if not 0.0 < frac <= 1.0:
            raise StackError(f"top-k share must be in (0, 1]: {name!r}")
    return {"topk": frac, "quant": quants[quant]}
