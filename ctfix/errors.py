"""Errors a user can cause, and the exit codes the CLI maps them to.

The one thing to know: raise `CtfixError` (or a subclass) for anything the user can
fix. The CLI's single funnel (`ctfix.cli.main`) turns it into one line on stderr and
exit status 2; a traceback is shown only with `--debug`. Never half-apply a change
before raising: validate first, act second.
"""

from __future__ import annotations

import enum


class ExitStatus(enum.IntEnum):
    """Exit statuses shared by every command."""

    OK = 0
    #: explain found a broken or at-risk service; lab could not reproduce/confirm.
    PROBLEM = 1
    #: bad input, missing privilege, missing kernel feature or namespace.
    ERROR = 2
    INTERRUPTED = 130


class CtfixError(Exception):
    """An error the user can act on: a message and, optionally, what to do next."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def one_line(self) -> str:
        return f"{self.message}; {self.hint}" if self.hint else self.message


class PrivilegeError(CtfixError):
    """The command needs a capability the process does not have."""

    def __init__(self, what: str, capability: str = "CAP_NET_ADMIN") -> None:
        super().__init__(
            f"{what} needs {capability}",
            "run ctfix as root (sudo ctfix ...) or grant the capability",
        )


class MissingFeatureError(CtfixError):
    """The kernel or the host lacks something the command needs."""
