"""Coordinator errors.

Error tree::

    CoordinatorError(Exception)          .code (metrics label), .retriable
        UploadRejected                   an upload failed auth/state/shape checks
        JobError                         a job request is invalid (-> 422)
        NotFound                         unknown job / device / model / version (-> 404)
        RegistryError                    a ShardVersion event cannot be applied

Wire decoding failures stay ``schemas.errors.SchemaError`` and are counted by ``reason``.
"""

from __future__ import annotations


class CoordinatorError(Exception):
    code: str = "error"
    retriable: bool = False

    def __init__(self, code: str, detail: str = "") -> None:
        self.code = code
        self.detail = detail
        super().__init__(f"{code}: {detail}" if detail else code)


class UploadRejected(CoordinatorError):
    """Reasons: unknown_task, wrong_device, bad_token, wrong_job, token_used, task_<state>,
    unknown_job, shape, round_closed (a sync round already has its K uploads, or closed)."""


class JobError(CoordinatorError):
    pass


class NotFound(CoordinatorError):
    pass


class RegistryError(CoordinatorError):
    pass
