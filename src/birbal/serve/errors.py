"""Request errors: one class per kind, a stable `error_type`, and the HTTP status each maps to (TGI style).

A request error names the field, the limit and the value given, so a caller can fix its request from the
message alone. `birbal.errors.ServeError` is the other kind: the server cannot start at all.
"""

from __future__ import annotations

from birbal.errors import BirbalError


class RequestError(BirbalError):
    """Base of the errors a request can get back; `status` and `error_type` are fixed per class."""

    status: int = 500
    error_type: str = "internal"

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class ValidationError(RequestError):
    """The request is well-formed JSON but asks for something the server will not do (a limit, a bad id)."""

    status = 422
    error_type = "validation"


class PayloadTooLargeError(RequestError):
    status = 413
    error_type = "payload_too_large"


class NotReadyError(RequestError):
    """The model is still loading (or failed to load): try again later."""

    status = 503
    error_type = "loading"


class OverloadedError(RequestError):
    """The GPU ran out of memory for this request; the server itself keeps running."""

    status = 503
    error_type = "overloaded"


class CancelledError(RequestError):
    """The client disconnected before its generation ended: the generation is stopped (or, queued, never run).
    499 is nginx's "client closed request"; the client is gone, so it only shows in the request counts."""

    status = 499
    error_type = "cancelled"


# The status table in one place, for the docs and the tests.
STATUS_TABLE: dict[str, int] = {cls.error_type: cls.status for cls in
                                (ValidationError, PayloadTooLargeError, NotReadyError, OverloadedError, CancelledError,
                                 RequestError)}
