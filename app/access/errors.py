"""The one answer every fair-share and quota check gives when it says no."""

from __future__ import annotations

from fastapi import HTTPException


class AccessRefused(HTTPException):
    """429 with Retry-After (seconds) and a message naming the limit that was hit.

    reason: "concurrency" (too many generations at once), "quota" (a token budget is used up) or
    "full" (this instance's batch and waiting line are both full); the metrics label.
    scope: whose limit it is, "user" or "key" (the API key's own).
    Being an HTTPException, it reaches chat clients as {"detail": ...} and OpenAI clients as
    OpenAI's error object (type rate_limit_exceeded) through app/api/errors.py.
    """

    def __init__(self, detail: str, *, retry_after_s: int, reason: str, scope: str = "user") -> None:
        super().__init__(429, detail, {"Retry-After": str(max(1, int(retry_after_s)))})
        self.reason = reason
        self.scope = scope
        self.retry_after_s = max(1, int(retry_after_s))
