"""Fleet coordinator: fleet state, eligibility/selection, task leases, registry, REST API.

``Coordinator`` and ``CoordinatorSettings`` are imported lazily so that importing
``coordinator.settings`` (e.g. by the CLI) does not load the web and ONNX stacks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from coordinator.service import Coordinator
    from coordinator.settings import CoordinatorSettings

__all__ = ["Coordinator", "CoordinatorSettings"]


def __getattr__(name: str) -> Any:
    if name == "Coordinator":
        from coordinator.service import Coordinator

        return Coordinator
    if name == "CoordinatorSettings":
        from coordinator.settings import CoordinatorSettings

        return CoordinatorSettings
    raise AttributeError(name)
