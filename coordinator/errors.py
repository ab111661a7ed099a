"""Coordinator errors.

Error tree::

    FedfleetError (schemas.errors)       root: .code (metrics label), .detail, .retriable
    CoordinatorError
        UploadRejected                   an upload failed auth/state/shape checks
        JobError                         a job request is invalid (-> 422)
        NotFound                         unknown job / device / model / version (-> 404)
        RegistryError                    a ShardVersion event cannot be applied

Wire decoding failures stay ``schemas.errors.SchemaError`` and are counted by ``reason``.
"""

from __future__ import annotations

from schemas.errors import FedfleetError


class CoordinatorError(FedfleetError):
    """Base of the coordinator's errors: ``CoordinatorError(code, detail)``."""

    code = "coordinator"


class UploadRejected(CoordinatorError):
    """Reasons: unknown_task, wrong_device, bad_token, wrong_job, token_used, task_<state>,
    unknown_job, shape, round_closed (a sync round already has its K uploads, or closed)."""


class JobError(CoordinatorError):
    pass


class NotFound(CoordinatorError):
    pass


class RegistryError(CoordinatorError):
    pass
