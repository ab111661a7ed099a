"""Errors of the fedfleet CLI and local stack (a branch of ``schemas.errors.FedfleetError``).

Error tree::

    FedfleetError (schemas.errors)   root: anything the CLI reports as one line, then exits 2
        StackError                   a local or external server could not be started/reached
            ServerUnavailable        an external server given by URL does not answer
            FallbackRefused          FEDFLEET_REQUIRE_REAL=1 and only a fallback is available
            PkiError                 the fleet CA or a certificate cannot be made, read or trusted
            DynsecError              the broker's dynamic-security plugin refused a command
        ConfigError                  a flag, env var or config value is invalid

These carry a sentence, not a code: ``StackError("kafka: ... did not start")``; ``str()``
is that sentence and ``code`` the class's (``stack``, ``config``).
"""

from __future__ import annotations

from schemas.errors import FedfleetError


class _Sentence(FedfleetError):
    def __init__(self, message: str) -> None:
        super().__init__("", message)

    def __str__(self) -> str:
        return self.detail or self.code


class StackError(_Sentence):
    """A server of the local stack could not be started or reached."""

    code = "stack"


class ServerUnavailable(StackError):
    """An external server given by URL did not answer a health check."""


class FallbackRefused(StackError):
    """Only a fallback implementation is available but real servers are required."""


class PkiError(StackError):
    """The fleet CA or a server certificate cannot be created, loaded or trusted."""


class ConfigError(_Sentence):
    """A configuration value is invalid."""

    code = "config"


__all__ = [
    "ConfigError",
    "FallbackRefused",
    "FedfleetError",
    "PkiError",
    "ServerUnavailable",
    "StackError",
]
