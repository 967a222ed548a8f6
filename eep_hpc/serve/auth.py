"""Bearer-token checks by path prefix: /v1/* needs serve.api_key, /admin/* needs serve.admin_token (when set).

A middleware rather than a per-route dependency, so that routes the head adds later under these prefixes are
covered too.
"""

from __future__ import annotations

import hmac

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from eep_hpc.serve.errors import ApiError, unauthorized


def _bearer(scope: Scope) -> str | None:
    value = Headers(scope=scope).get("authorization", "")
    scheme, _, token = value.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


class BearerAuthMiddleware:
    def __init__(self, app: ASGIApp, *, api_key: str = "", admin_token: str = "") -> None:
        self.app = app
        rules = (("/v1/", api_key, "API key"), ("/admin/", admin_token, "admin token"))  # (prefix, secret, what)
        self.rules = [rule for rule in rules if rule[1]]

    def refusal(self, scope: Scope) -> ApiError | None:
        """The 401 for this request, if its path needs a token it lacks (app.App's hot routes ask it too)."""
        path = scope.get("path", "")
        for prefix, secret, what in self.rules:
            if path.startswith(prefix) or path == prefix.rstrip("/"):
                token = _bearer(scope)
                if token is None:
                    return unauthorized(f"Missing {what}: send the header 'Authorization: Bearer <{what}>'.")
                if not hmac.compare_digest(token.encode(), secret.encode()):
                    return unauthorized(f"Incorrect {what} provided.")
                return None
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            error = self.refusal(scope)
            if error is not None:
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)
