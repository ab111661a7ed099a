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


def _labels(text: str) -> list[str]:
    out = [t.strip() for t in text.split(",") if t.strip()]
    if not out:
        raise argparse.ArgumentTypeError("--labels needs class names: a,b,c")
    return out


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


def build_body(args: argparse.Namespace) -> dict[str, Any]:
    """The job file's body (or ``{}``) with every given flag set on it."""
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


__all__ = ["FLAG_FIELDS", "add_flags", "build_body", "read_file"]
