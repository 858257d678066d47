"""Typed error codes, their HTTP-like statuses, and the exception that carries them."""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    """What went wrong, in words a client can branch on."""

    BAD_REQUEST = "bad_request"
    FORBIDDEN = "forbidden"
    UNKNOWN_SESSION = "unknown_session"
    CONFLICT = "conflict"
    GONE = "gone"
    TOO_LARGE = "too_large"
    CONTEXT_OVERFLOW = "context_overflow"
    IDEMPOTENCY_MISMATCH = "idempotency_mismatch"
    BUSY = "busy"
    INTERNAL = "internal"
    UNAVAILABLE = "unavailable"


STATUS: dict[ErrorCode, int] = {
    ErrorCode.BAD_REQUEST: 400,
    ErrorCode.FORBIDDEN: 403,
    ErrorCode.UNKNOWN_SESSION: 404,
    ErrorCode.CONFLICT: 409,
    ErrorCode.GONE: 410,
    ErrorCode.TOO_LARGE: 413,
    ErrorCode.CONTEXT_OVERFLOW: 422,
    ErrorCode.IDEMPOTENCY_MISMATCH: 422,
    ErrorCode.BUSY: 429,
    ErrorCode.INTERNAL: 500,
    ErrorCode.UNAVAILABLE: 503,
}


class InferError(Exception):
    """An error with a code, a human sentence, and optional data for the client."""

    def __init__(
        self, code: ErrorCode, message: str, details: dict[str, str | int | float] | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = dict(details or {})

    @property
    def status(self) -> int:
        """HTTP-like status of the code."""
        return STATUS[self.code]

    def __repr__(self) -> str:
        return f"InferError({self.code.value}, {self.message!r})"
