"""One exception hierarchy; the CLI turns any DncError into one line and exit 2."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Location:
    """Where a value came from: a file position (1-based) or a command-line override."""

    source: str
    line: int | None = None
    col: int | None = None

    def __str__(self) -> str:
        if self.line is None:
            return self.source
        return f"{self.source}:{self.line}:{self.col}"


class _Located:
    """A message and where it applies; printed `location: message`."""

    def __init__(self, message: str, location: Location | None = None):
        super().__init__(message)
        self.message = message
        self.location = location

    def __str__(self) -> str:
        return f"{self.location}: {self.message}" if self.location else self.message


class DncError(_Located, Exception):
    """Base of every error dnc reports to a user."""


class SpecError(DncError):
    """The YAML spec is malformed, has unknown keys, wrong types or impossible values."""


class ShapeError(DncError):
    """Static inference found a shape or channel count that cannot work."""


class EmitError(DncError):
    """A target could not be emitted (or a generated file is stale under --check)."""


class WeightsError(DncError):
    """A checkpoint file could not be read or does not fit the network."""


class LimitError(SpecError):
    """The spec asks for a network beyond a limit of dnc/limits.py (raisable with --limit)."""


class DncWarning(_Located, UserWarning):
    """Something worth one line on stderr that is not an error (a reused YAML anchor, a converted dtype)."""


class SpecErrors(SpecError):
    """Several errors found in one spec: `errors` holds each, in file order.

    Its own message and location are the first error's, so code that reports one
    error still reports something true; the CLI prints every one (capped).
    """

    def __init__(self, errors: list[SpecError]):
        if not errors:
            raise ValueError("SpecErrors needs at least one error")
        super().__init__(errors[0].message, errors[0].location)
        self.errors = list(errors)
