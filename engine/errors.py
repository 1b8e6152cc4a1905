"""Typed exceptions raised at the engine's API.

Every error a user can cause (a bad checkpoint, a bad request) is one of these, with a message that
names the offending file, field or value. Callers (the CLI, the gateway) map them to exit codes and
HTTP status codes; nothing here knows about either.
"""


class TandemError(Exception):
    """Base class of every error tandem raises on purpose."""


class ModelConfigError(TandemError):
    """A checkpoint is missing a file, has an unsupported architecture or a field we don't handle."""


class ModelFetchError(TandemError):
    """The default model could not be downloaded or converted."""


class InvalidRequestError(TandemError):
    """A request's parameters are invalid (maps to HTTP 400). `param` names the offending field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class CapacityError(TandemError):
    """A request can never fit in this engine (prompt longer than the KV cache or the context)."""
