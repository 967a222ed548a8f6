"""In the head's other API processes (serve.api_servers > 1): /admin/* and /metrics go on to the head, which
alone holds the cluster's state and scaling, and renders the metrics of every API process together.

A client cannot choose which process of the shared port takes its connection, so each passes these on, headers
(the admin token) and body as they came, to the head's private listener; the head answers, auth included.
"""

from __future__ import annotations

import httpx
from starlette.types import ASGIApp, Receive, Scope, Send

_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding", "host"}


def passed_on(path: str) -> bool:
    return path.startswith("/admin/") or path == "/metrics"


class ToHeadMiddleware:
    def __init__(self, app: ASGIApp, *, head_url: str) -> None:
        self.app = app
        self.client = httpx.AsyncClient(base_url=head_url, timeout=None)  # a grow waits for its event

    @staticmethod
    def passes_through(path: str) -> bool:
        """Requests of this path go on to the app as they came (app.hot_routes asks)."""
        return not passed_on(path)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not passed_on(scope.get("path", "")):
            await self.app(scope, receive, send)
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]
                   if k.decode("latin-1").lower() not in _HOP_BY_HOP]
        reply = await self.client.request(scope["method"], scope["path"], params=scope.get("query_string", b""),
                                          headers=headers, content=body)
        out = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in reply.headers.items()
               if k.lower() not in _HOP_BY_HOP]
        out.append((b"content-length", str(len(reply.content)).encode()))
        await send({"type": "http.response.start", "status": reply.status_code, "headers": out})
        await send({"type": "http.response.body", "body": reply.content})
