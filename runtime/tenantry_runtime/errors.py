"""Errors in Anthropic's shape: one exception type, one body builder, one status table."""

from __future__ import annotations

import json

# Anthropic's error types and the status codes the SDK maps them from.
STATUS_OF = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "overloaded_error": 529,
}
TYPE_OF_STATUS = {status: kind for kind, status in STATUS_OF.items()}
# Beyond this wait a retry is not worth it: older anthropic SDKs ignore longer retry-afters and
# retry at once, newer ones (2.x) sleep the whole wait, hours for a spent daily budget.
SDK_LONGEST_WAIT_SECONDS = 60


class ApiError(Exception):
    """An error returned to the client as {"type":"error","error":{...}}."""

    def __init__(self, kind: str, message: str, *, status: int | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.status = status if status is not None else STATUS_OF[kind]
        self.retry_after = retry_after

    def body(self) -> bytes:
        return error_body(self.kind, self.message)

    def headers(self) -> dict[str, str]:
        if self.retry_after is None:
            return {}
        # The SDK prefers retry-after-ms; plain clients read whole seconds, rounded up.
        headers = {"retry-after": str(max(1, int(-(-self.retry_after // 1)))),
                   "retry-after-ms": str(int(self.retry_after * 1000))}
        if self.retry_after > SDK_LONGEST_WAIT_SECONDS:
            # Let the client see the error now instead.
            headers["x-should-retry"] = "false"
        return headers


def error_body(kind: str, message: str) -> bytes:
    return json.dumps({"type": "error", "error": {"type": kind, "message": message}}).encode()


def kind_for_status(status: int) -> str:
    """Anthropic's error type for an HTTP status (5xx other than 529 is api_error)."""
    if status in TYPE_OF_STATUS:
        return TYPE_OF_STATUS[status]
    return "api_error" if status >= 500 else "invalid_request_error"
