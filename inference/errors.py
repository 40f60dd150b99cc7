"""The error tree. Each error knows whether retrying can help and what a person may be shown."""

from __future__ import annotations


class GenerationError(Exception):
    """Base class. `str(error)` is safe to show to users: no paths to secrets, no tracebacks."""

    retriable = False


class InvalidRequest(GenerationError, ValueError):
    """A request field is out of range. Names the field so UIs and clients can point at it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class ModelUnavailable(GenerationError):
    """The weights could not be found or loaded; the message says how to fix the configuration."""


class UnsupportedOnDevice(GenerationError):
    """The preset cannot run on this machine (for example FLUX on a CPU-only Space)."""


class Cancelled(GenerationError):
    """The request was cancelled by its owner before it finished."""


class QueueFull(GenerationError):
    """Too many requests are waiting; the caller should retry later."""

    retriable = True


class UnknownRequest(GenerationError, KeyError):
    """No job is known under this request id (never submitted, or expired)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "unknown request"


class GenerationFailed(GenerationError):
    """The pipeline raised while generating; may succeed on another attempt or worker."""

    retriable = True


class QueueUnavailable(GenerationError):
    """The shared request queue (Kafka) cannot take the request right now."""

    retriable = True


class TooManyRequests(GenerationError):
    """The caller is over a per-user limit; the message says which one and when to retry."""

    retriable = True
