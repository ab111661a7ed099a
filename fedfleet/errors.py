"""Errors of the fedfleet CLI and local stack.

Error tree::

    FedfleetError(Exception)         anything the CLI reports as one line, then exits 2
        StackError                   a local or external server could not be started/reached
            ServerUnavailable        an external server given by URL does not answer
            FallbackRefused          FEDFLEET_REQUIRE_REAL=1 and only a fallback is available
        ConfigError                  a flag, env var or config value is invalid
"""

from __future__ import annotations


class FedfleetError(Exception):
    """Base error: ``str(err)`` is a one-line message naming what failed and what to do."""


class StackError(FedfleetError):
    """A server of the local stack could not be started or reached."""


class ServerUnavailable(StackError):
    """An external server given by URL did not answer a health check."""


class FallbackRefused(StackError):
    """Only a fallback implementation is available but real servers are required."""


class ConfigError(FedfleetError):
    """A configuration value is invalid."""
