"""Coordinator errors.

Error tree::

    FedfleetError (schemas.errors)       root: .code (metrics label), .detail, .retriable
    CoordinatorError
        UploadRejected                   an upload failed auth/state/shape checks
        JobError                         a job request is invalid (-> 422)
        NotFound                         unknown job / device / model / version (-> 404)
        RegistryError                    a ShardVersion event cannot be applied
        EnrolmentRefused                 an enrolment token or device id is refused (-> 403/409)
        EnrolmentUnavailable             the broker's credential store cannot be reached (-> 503)

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


class EnrolmentRefused(CoordinatorError):
    """Codes: token_unknown, token_used, token_expired, token_device (bound to another id),
    already_enrolled, reserved_id (``coordinator``), bad_id."""


class EnrolmentUnavailable(CoordinatorError):
    """No broker credential store (insecure broker) or it did not answer."""

    retriable = True
