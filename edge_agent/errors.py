"""Errors raised inside the edge agent.

Error tree::

    FedfleetError (schemas.errors)         root: .code (= .reason, a metrics label), .detail,
    │                                      class-level .retriable
    AgentError                             base of this package
        ModelFetchError                    HTTP/network failure pulling a model (retriable)
            ModelRefused                   the server answered a 4xx that will not change
            ModelGone                      404: not published yet, or that version is gone
        ModelVerifyError                   digest/signature/size/shape mismatch (not retriable)
        NoModelError                       ``predict`` before any verified model is loaded
        DataError(ValueError)              a local data file cannot be loaded
        SettingsError(ValueError)          bad flag / env / config value (schemas SettingsError)
        Aborted                            local training stopped (battery, network, ...)
        TrainerUnavailable                 an optional trainer's extra is not installed

Wire-level problems (malformed tasks, acks, ...) are ``schemas.errors.SchemaError``; the agent
counts them by ``reason`` and never crashes on them.
"""

from __future__ import annotations

from typing import ClassVar

from schemas import errors as base


class AgentError(base.FedfleetError):
    """Base of all edge-agent errors: ``AgentError(reason, detail)``."""

    code = "agent"


class ModelFetchError(AgentError):
    """The model could not be downloaded (network, 5xx, not published yet); try later."""

    retriable: ClassVar[bool] = True


class ModelRefused(ModelFetchError):
    """The server refused the download (a 4xx other than 404/408): retrying will not help."""

    retriable: ClassVar[bool] = False


class ModelGone(ModelFetchError):
    """The server answered 404: the model (or the version asked for) is not there (reason
    ``http``, as every other HTTP failure of a pull)."""


class ModelVerifyError(AgentError):
    """A downloaded model failed its digest or signature check: refuse it."""


class NoModelError(AgentError):
    """No verified model is loaded yet."""


class DataError(AgentError, ValueError):
    """A local dataset could not be loaded."""


class SettingsError(AgentError, base.SettingsError):
    """A setting has a bad value."""


class TrainerUnavailable(AgentError):
    """The requested trainer needs an optional dependency that is not installed."""


class Aborted(AgentError):
    """Training stopped; ``reason`` goes into ``TaskResponse(aborted)``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
