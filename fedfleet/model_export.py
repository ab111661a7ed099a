"""``fedfleet job create --torch-module pkg.mod:factory``: the user's PyTorch module as the
ONNX file a job trains (``torch.onnx.export``; torch imported only here, lazily).

``factory()`` must return the ``torch.nn.Module`` (its initial weights are the job's
version 0); the graph takes ``x[N, *input_shape]`` and its first output is the logits.
Parameter names survive the export as initializer names (``fc1.weight``, ...), which is
how devices that build the same module map it onto the job's flat vector.
"""

from __future__ import annotations

import importlib
import io
import warnings
from collections.abc import Sequence
from typing import Any

from fedfleet.job_client import JobCliError

OPSET = 17


def load_factory(path: str) -> Any:
    """``pkg.mod:factory`` -> the callable, as a device imports it
    (``edge_agent.torch_models.import_factory``); a ``JobCliError`` with the reason."""
    from edge_agent.torch_models import ModelUnsupported, import_factory  # onnx: only here

    mod_name, sep, attr = path.partition(":")
    if not sep or not mod_name or not attr:
        raise JobCliError(f"--torch-module {path!r}: expected pkg.module:factory")
    try:
        return import_factory(path)
    except ModelUnsupported as exc:
        raise JobCliError(f"--torch-module {path!r}: cannot import: {exc.detail}") from None


def export_module(path: str, input_shape: Sequence[int]) -> bytes:
    """The module ``path``'s factory builds, exported to ONNX for inputs ``[N, *input_shape]``
    (batch dimension dynamic)."""
    try:
        torch = importlib.import_module("torch")
    except ImportError:
        raise JobCliError("--torch-module needs PyTorch: pip install 'fedfleet[torch]'") from None
    if not input_shape:
        raise JobCliError("--torch-module needs --input-shape (one example's shape, e.g. 1,40)")
    module = load_factory(path)()
    if not isinstance(module, torch.nn.Module):
        raise JobCliError(f"--torch-module {path!r}: the factory returned "
                          f"{type(module).__name__}, not a torch.nn.Module")  # fmt: skip
    module.eval()
    buf = io.BytesIO()
    example = torch.zeros(2, *input_shape)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(module, (example,), buf, input_names=["x"],
                              output_names=["logits"], opset_version=OPSET,
                              dynamic_axes={"x": {0: "N"}, "logits": {0: "N"}},
                              dynamo=False)  # fmt: skip
    except Exception as exc:  # torch raises many kinds; the user needs the message
        raise JobCliError(f"--torch-module {path!r}: ONNX export failed: "
                          f"{type(exc).__name__}: {exc}") from None  # fmt: skip
    return buf.getvalue()
