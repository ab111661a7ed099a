"""The ``POST /v1/jobs`` body ``fedfleet job create`` sends: a job file, then flags (pure).

Flags override the file's values, nested ones field by field (``--max-updates`` sets
``stop.max_updates`` and keeps the file's other ``stop`` fields). The coordinator checks
the result; this module only shapes it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from fedfleet.job_client import JobCliError

# flag dest -> path in the body
FLAG_FIELDS: dict[str, tuple[str, ...]] = {
    "job_id": ("job_id",),
    "model_name": ("model_name",),
    "family": ("spec", "family"),
    "features": ("spec", "n_features"),
    "classes": ("spec", "n_classes"),
    "hidden": ("spec", "hidden"),
    "labels": ("spec", "labels"),
    "shards": ("shards",),
    "concurrency": ("concurrency",),
    "standardize": ("standardize",),
    "target_accuracy": ("stop", "target_accuracy"),
    "max_updates": ("stop", "max_updates"),
    "max_wall_s": ("stop", "max_wall_s"),
    "eval_devices": ("evaluation", "devices"),
    "eval_every": ("evaluation", "every_versions"),
    "final_devices": ("evaluation", "final_devices"),
    "lr": ("train", "lr"),
    "local_epochs": ("train", "local_epochs"),
    "batch_size": ("train", "batch_size"),
    "optimizer": ("train", "optimizer"),
    "momentum": ("train", "momentum"),
    "loss": ("train", "loss"),
    "prox_mu": ("train", "prox_mu"),
    "topk": ("codec", "topk"),
    "quant": ("codec", "quant"),
    "strategy": ("strategy", "name"),
    "alpha": ("strategy", "alpha"),
}


def add_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--file", "-f", type=Path, help="job JSON (the POST /v1/jobs body)")
    p.add_argument("--job-id", help="default: the coordinator picks one")
    p.add_argument("--model-name", help="the model the job trains (required)")
    p.add_argument("--family", choices=("softmax", "mlp"),
                   help="default softmax, or mlp with --hidden")  # fmt: skip
    p.add_argument("--features", type=int, help="spec.n_features")
    p.add_argument("--classes", type=int, help="spec.n_classes (default: the --labels count)")
    p.add_argument("--hidden", type=int, help="spec.hidden (mlp)")
    p.add_argument("--labels", type=_labels, help="class names in index order: a,b,c")
    p.add_argument("--shards", type=int, help="default: one per running aggregator")
    p.add_argument("--concurrency", type=int, help="devices training at once")
    p.add_argument("--standardize", action="store_const", const=True, default=None,
                   help="federated feature standardisation before training")  # fmt: skip
    p.add_argument(
        "--target-accuracy",
        type=float,
        help="stop.target_accuracy: end when the federated accuracy reaches it",
    )
    p.add_argument("--max-updates", type=int, help="stop.max_updates (applied on every shard)")
    p.add_argument("--max-wall-s", type=float, help="stop.max_wall_s (seconds since created)")
    p.add_argument("--eval-devices", type=int, help="evaluation.devices (0: off)")
    p.add_argument("--eval-every", type=int, help="evaluation.every_versions")
    p.add_argument("--final-devices", type=int,
                   help="evaluation.final_devices: devices scoring the final version")  # fmt: skip
    m = p.add_argument_group("your own model (docs/models.md)")
    m.add_argument("--onnx", type=Path, metavar="FILE",
                   help="train this ONNX model (uploaded with POST /v1/artifacts)")  # fmt: skip
    m.add_argument("--torch-module", metavar="PKG.MOD:FACTORY",
                   help="train this PyTorch module: exported to ONNX here (needs "
                        "--input-shape); devices that have it installed build it")  # fmt: skip
    m.add_argument("--input-shape", type=_shape, metavar="D[,D...]",
                   help="--torch-module: one example's input shape, e.g. 30 or 1,40")  # fmt: skip
    m.add_argument("--graph-only", action="store_true",
                   help="--torch-module: devices train the exported graph (onnx2torch), "
                        "not the module")  # fmt: skip
    m.add_argument("--trainable", type=_labels, metavar="NAME,...",
                   help="initializers to train (default: every float32 one)")  # fmt: skip
    t = p.add_argument_group("training, codec and strategy")
    t.add_argument("--lr", type=float, help="train.lr")
    t.add_argument("--local-epochs", type=int, help="train.local_epochs")
    t.add_argument("--batch-size", type=int, help="train.batch_size")
    t.add_argument("--optimizer", choices=("sgd", "momentum", "adam"), help="train.optimizer")
    t.add_argument("--momentum", type=float, help="train.momentum (optimizer momentum)")
    t.add_argument("--loss", choices=("cross_entropy", "mse"), help="train.loss")
    t.add_argument("--prox-mu", type=float, help="train.prox_mu (FedAsync proximal term)")
    t.add_argument("--topk", type=float, help="codec.topk (0: dense; 0.01: top 1%%)")
    t.add_argument("--quant", choices=("none", "fp16", "int8"), help="codec.quant")
    t.add_argument("--strategy", choices=("fedasync", "fedasync_delta", "fedbuff", "fedavg"),
                   help="strategy.name")  # fmt: skip
    t.add_argument("--alpha", type=float, help="strategy.alpha (FedAsync mixing weight)")


def _labels(text: str) -> list[str]:
    out = [t.strip() for t in text.split(",") if t.strip()]
    if not out:
        raise argparse.ArgumentTypeError("--labels needs class names: a,b,c")
    return out


def _shape(text: str) -> tuple[int, ...]:
    try:
        out = tuple(int(t) for t in text.split(","))
    except ValueError:
        out = ()
    if not out or any(d < 1 for d in out):
        raise argparse.ArgumentTypeError("--input-shape needs positive sizes: 30 or 1,40")
    return out


def with_artifact(body: dict[str, Any], art: dict[str, Any], *, torch_module: str = "") -> None:
    """Name an uploaded artifact in ``body``: its ``spec`` (the user's ``labels`` and
    standardisation kept) and, for a module devices build, ``torch_module``."""
    raw = body.get("spec")
    own: dict[str, Any] = raw if isinstance(raw, dict) else {}
    spec = dict(art["spec"])
    for key in ("labels", "input_mean", "input_std"):
        if own.get(key):
            spec[key] = own[key]
    if torch_module:
        spec["torch_module"] = torch_module
    body["spec"] = spec


def read_file(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise JobCliError(f"job file {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise JobCliError(f"job file {path} is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise JobCliError(f"job file {path} must hold a JSON object (the POST /v1/jobs body)")
    return data


def build_body(args: argparse.Namespace, art: dict[str, Any] | None = None) -> dict[str, Any]:
    """The job file's body (or ``{}``) with every given flag set on it; ``art``: the
    ``POST /v1/artifacts`` answer of the user's model (its spec replaces the file's)."""
    body: dict[str, Any] = read_file(args.file) if getattr(args, "file", None) else {}
    for dest, where in FLAG_FIELDS.items():
        value = getattr(args, dest, None)
        if value is None:
            continue
        node = body
        for key in where[:-1]:
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                raise JobCliError(f"job file: {key!r} must be an object")
            node = child
        node[where[-1]] = value
    if art is not None:
        module = getattr(args, "torch_module", None) or ""
        with_artifact(body, art, torch_module="" if getattr(args, "graph_only", False) else module)
    spec = body.get("spec")
    if isinstance(spec, dict):
        if "family" not in spec:
            spec["family"] = "mlp" if spec.get("hidden") else "softmax"
        if "n_classes" not in spec and isinstance(spec.get("labels"), list):
            spec["n_classes"] = len(spec["labels"])
    if "model_name" not in body:
        raise JobCliError("a job needs a model name: --model-name NAME (or a --file with it)")
    if not isinstance(spec, dict) or "n_features" not in spec:
        raise JobCliError("a job needs its model's shape: --features N --classes K "
                          "(or --labels a,b,...), or a --file with a spec")  # fmt: skip
    if "n_classes" not in spec:
        raise JobCliError("a job needs its class count: --classes K or --labels a,b,...")
    return body


__all__ = ["FLAG_FIELDS", "add_flags", "build_body", "read_file", "with_artifact"]
