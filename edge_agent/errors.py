"""Errors raised inside the edge agent.

Error tree::

    AgentError(Exception)                  base; ``reason`` is a metrics label, ``retriable``
        ModelFetchError                    HTTP/network failure pulling a model (retriable)
        ModelVerifyError                   digest/signature/size/shape mismatch (not retriable)
        NoModelError                       ``predict`` before any verified model is loaded
        DataError(ValueError)              a local data file cannot be loaded
        SettingsError(ValueError)          bad flag / env / config value
        TrainerUnavailable                 an optional trainer's extra is not installed

Wire-level problems (malformed tasks, acks, ...) are ``schemas.errors.SchemaError``; the agent
counts them by ``reason`` and never crashes on them.
"""

from __future__ import annotations


class AgentError(Exception):
    """Base of all edge-agent errors."""

    retriable: bool = False

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


class ModelFetchError(AgentError):
    """The model could not be downloaded (network, 5xx, ...); try again later."""

    retriable = True


class ModelVerifyError(AgentError):
    """A downloaded model failed its digest or signature check: refuse it."""


class NoModelError(AgentError):
    """No verified model is loaded yet."""


class DataError(AgentError, ValueError):
    """A local dataset could not be loaded."""


class SettingsError(AgentError, ValueError):
    """A setting has a bad value."""


class TrainerUnavailable(AgentError):
    """The requested trainer needs an optional dependency that is not installed."""
