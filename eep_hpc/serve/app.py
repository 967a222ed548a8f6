"""The head's HTTP front: an OpenAI-compatible API over an EngineClient.

Routes: POST /v1/completions, POST /v1/chat/completions (SSE when stream=true; serving.py is the way of a request
through them), GET /v1/models[/{model}], GET /health, GET /metrics, GET /admin/state. The head may add more routes
to the returned app; those under /v1/ and /admin/ get the same bearer-token checks. `app.state.engine`,
`app.state.metrics` (whose registry takes more collectors) and `app.state.serving` are set.

Middleware, outermost first: HTTP metrics -> catch-all 500 -> bearer auth -> FastAPI's exception handlers. A streamed
response's body chunks skip them (sse.py); none may rewrite a response body. The two POST routes' requests skip the
stack itself where it is the one built here (App, hot_routes): the same steps in one frame.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass
from typing import Awaitable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from fastapi.middleware.asyncexitstack import AsyncExitStackMiddleware
from starlette._utils import is_async_callable
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware.errors import ServerErrorMiddleware
from starlette.middleware.exceptions import ExceptionMiddleware
from starlette.routing import Match, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from eep_hpc.config import ServeConfig
from eep_hpc.serve.auth import BearerAuthMiddleware
from eep_hpc.serve.chat import ChatCompletion
from eep_hpc.serve.completions import Completion
from eep_hpc.serve.engine_client import EngineClient
from eep_hpc.serve.errors import CatchAllMiddleware, install_error_handlers, model_not_found, not_ready
from eep_hpc.serve.metrics import CONTENT_TYPE, ApiMetrics, HttpMetricsMiddleware
from eep_hpc.serve.openai_protocol import ModelCard, ModelList
from eep_hpc.serve.serving import Serving
from eep_hpc.serve.sse import SERVER_SEND
from eep_hpc.serve.write_log import WriteLog

try:  # FastAPI's own layers, where this FastAPI has them (hot_routes)
    from fastapi.telemetry._asgi import ExceptionTelemetryMiddleware as _ExceptionTelemetryMiddleware
except ImportError:
    _ExceptionTelemetryMiddleware = None
try:
    from fastapi._body_limit import AppBodyLimitMiddleware as _AppBodyLimitMiddleware
    from starlette.middleware.body_limit import RequestBodyLimitMiddleware as _RequestBodyLimitMiddleware
except ImportError:
    _AppBodyLimitMiddleware = _RequestBodyLimitMiddleware = None


# FastAPI's native OpenTelemetry (0.16x on) looks up the global tracer, meter and logger providers on every request,
# each a read of the environment: about a tenth of a streamed request's start. eep-hpc configures none (its metrics
# are Prometheus', metrics.py), so it is off.
_NO_TELEMETRY = ({"telemetry": {"tracing": False, "metrics": False, "logs": False}}
                 if "telemetry" in inspect.signature(FastAPI.__init__).parameters else {})


class App(FastAPI):
    """FastAPI that keeps the server's own `send` in the scope, for the streamed chunks (sse.EventStreamResponse),
    and serves its hot routes (POST /v1/completions, /v1/chat/completions) past the middleware stack when that stack
    is the one create_app built: a request's start and end each resumed or unwound some fifteen frames (Starlette's
    and FastAPI's layers, ours, the router, the route's two exception wrappers), about a quarter of the event loop's
    time a request costs outside its tokens. `_serve_hot` does what those layers do for such a request, in one frame,
    with the same instances (metrics, auth rules, exception handlers): see `hot_routes`."""

    _hot: dict[str, "RequestRoute"] | None = None  # path -> route, once the middleware stack is built and checked

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope[SERVER_SEND] = send
        if scope["type"] == "http" and scope["method"] == "POST":
            if self.middleware_stack is None:
                self.middleware_stack = self.build_middleware_stack()
            hot = self._hot
            if hot is not None and (route := hot.get(scope["path"])) is not None and not scope.get("root_path") \
                    and _BODY_LIMIT_KEY not in scope:
                await self._serve_hot(route, scope, receive, send)
                return
        await super().__call__(scope, receive, send)

    def build_middleware_stack(self) -> ASGIApp:
        """FastAPI's stack; whichever request comes first builds it (a GET too), and its hot routes are found then."""
        stack = super().build_middleware_stack()
        self._hot = hot_routes(self, stack)
        return stack

    async def _serve_hot(self, route: "RequestRoute", scope: Scope, receive: Receive, send: Send) -> None:
        """Starlette.__call__, HttpMetricsMiddleware, CatchAllMiddleware, BearerAuthMiddleware, ExceptionMiddleware,
        the router's match and the route's request_response, for a request of a hot route (hot_routes checked that
        these are all the layers between the server and the route that do anything for it)."""
        layers = self._layers
        scope["app"] = self
        status, started = 500, False

        def send_start(message: Message) -> Awaitable[None]:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
            return send(message)

        layers.metrics.metrics.http_requests_in_progress.inc()
        try:
            try:
                error = layers.auth.refusal(scope)
                if error is not None:  # before the router: the metrics count it as "unmatched"
                    await error.response()(scope, receive, send_start)
                    return
                scope["starlette.exception_handlers"] = (layers.handlers, layers.status_handlers)
                scope.setdefault("router", self.router)
                scope["route"] = route
                scope["endpoint"] = route.endpoint
                scope["path_params"] = dict(scope.get("path_params", {}))
                request = Request(scope, receive, send_start)
                try:
                    response = await route.endpoint(request)
                    await response(scope, receive, send_start)
                except Exception as exc:  # as starlette's wrap_app_handling_exceptions
                    handler = layers.handler(exc)
                    if handler is None:
                        raise
                    if started:
                        raise RuntimeError("Caught handled exception, but response already started.") from exc
                    if is_async_callable(handler):
                        response = await handler(request, exc)
                    else:
                        response = await run_in_threadpool(handler, request, exc)
                    if response is not None:
                        await response(scope, receive, send_start)
                    exc.__traceback__ = None
            except Exception:
                await CatchAllMiddleware.failed(scope, send, started)
        finally:
            layers.metrics.done(scope, status)


_BODY_LIMIT_KEY = "starlette.max_body_size"  # a mounted app's body limit (starlette.middleware.body_limit)
HOT_PATHS = ("/v1/completions", "/v1/chat/completions")


@dataclass
class _Layers:
    """The instances of the app's middleware stack that a hot route's request goes through and that act on it."""

    metrics: HttpMetricsMiddleware
    auth: BearerAuthMiddleware
    handlers: dict
    status_handlers: dict

    def handler(self, exc: Exception):
        if isinstance(exc, HTTPException) and (handler := self.status_handlers.get(exc.status_code)) is not None:
            return handler
        for cls in type(exc).__mro__:
            if cls in self.handlers:
                return self.handlers[cls]
        return None


def hot_routes(app: App, stack: ASGIApp | None = None) -> dict[str, "RequestRoute"] | None:
    """The routes App serves past the stack, by path, or None (then every request takes the stack). Only where the
    stack, outermost first, is: layers that leave such a request alone (Starlette's ServerErrorMiddleware and
    FastAPI's ExceptionTelemetryMiddleware, which only see exceptions, and CatchAllMiddleware below them takes every
    one; FastAPI's AppBodyLimitMiddleware without a limit; a middleware whose `passes_through(path)` says so, e.g.
    api_proxy.ToHeadMiddleware), then exactly HttpMetricsMiddleware, CatchAllMiddleware, BearerAuthMiddleware,
    ExceptionMiddleware, AsyncExitStackMiddleware (a stack for closing uploaded files: these routes read none) and
    the router, with no FastAPI telemetry on, no form limits, and each path's route (the first one whose match is
    full for a POST) a RequestRoute. A FastAPI or Starlette whose stack differs gets no hot routes, not an error."""
    telemetry = getattr(app, "_native_telemetry", None)
    if telemetry is not None and any(getattr(telemetry, "config", {}).get(k, True) for k in ("tracing", "metrics",
                                                                                              "logs")):
        return None
    if getattr(app.router, "form_limits", None) or app.root_path:  # (FastAPI would put its root_path in the scope)
        return None
    transparent = {ServerErrorMiddleware, AsyncExitStackMiddleware}
    if _ExceptionTelemetryMiddleware is not None:
        transparent.add(_ExceptionTelemetryMiddleware)
    kinds, layer = [], stack if stack is not None else app.middleware_stack
    while layer is not app.router:
        if type(layer) is _AppBodyLimitMiddleware and not isinstance(layer.app, _RequestBodyLimitMiddleware):
            pass  # no limit: it passes the request on as it came
        elif type(layer) in transparent:
            pass
        elif callable(passes := getattr(layer, "passes_through", None)) and all(passes(p) for p in HOT_PATHS):
            pass
        else:
            kinds.append(layer)
        layer = getattr(layer, "app", None)
        if layer is None:
            return None
    if [type(k) for k in kinds] != [HttpMetricsMiddleware, CatchAllMiddleware, BearerAuthMiddleware,
                                    ExceptionMiddleware]:
        return None
    metrics, _, auth, exceptions = kinds
    routes = {}
    for path in HOT_PATHS:
        probe = {"type": "http", "method": "POST", "path": path, "root_path": "", "path_params": {}}
        route = next((r for r in app.router.routes if r.matches(probe)[0] is Match.FULL), None)
        if type(route) is not RequestRoute or route.path != path or not is_async_callable(route.endpoint):
            return None
        routes[path] = route
    app._layers = _Layers(metrics, auth, exceptions._exception_handlers, exceptions._status_handlers)
    return routes


class RequestRoute(Route):
    """A route to an endpoint that takes the Request and reads it itself. FastAPI's own route would solve the
    endpoint's dependencies and open two exit stacks for it on every request, about a third of a streamed request's
    start; errors raised in it reach the app's exception handlers all the same. Like FastAPI's, it names itself in
    the scope, where the HTTP metrics find the route's path."""

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        match, child_scope = super().matches(scope)
        if match is not Match.NONE:
            child_scope["route"] = self
        return match, child_scope


def create_app(engine: EngineClient, cfg: ServeConfig) -> FastAPI:
    app = App(title="eep-hpc", docs_url=None, redoc_url=None, openapi_url=None, **_NO_TELEMETRY)
    metrics = ApiMetrics(engine.model_name)
    serving = Serving(engine, metrics, WriteLog(cfg.write_log) if cfg.write_log else None)
    app.state.engine, app.state.metrics, app.state.serving = engine, metrics, serving
    started = int(time.time())
    # The detokenizer's bytes per token (byte-level BPE: Tokenizer.token_bytes) are made now rather than by the first
    # streamed request: one decode of every id in the vocabulary.
    token_bytes = getattr(engine.tokenizer, "token_bytes", None)
    if token_bytes is not None:
        token_bytes()

    async def completions(request: Request) -> Response:
        return await serving.handle(request, Completion)

    async def chat_completions(request: Request) -> Response:
        return await serving.handle(request, ChatCompletion)

    app.router.routes.append(RequestRoute("/v1/completions", completions, methods=["POST"]))
    app.router.routes.append(RequestRoute("/v1/chat/completions", chat_completions, methods=["POST"]))

    def model_card() -> ModelCard:
        name = engine.model_name
        return ModelCard(id=name, created=started, root=name, max_model_len=engine.max_model_len)

    @app.get("/v1/models")
    async def models() -> Response:
        return JSONResponse(ModelList(data=[model_card()]).model_dump())

    @app.get("/v1/models/{model:path}")
    async def model(model: str) -> Response:
        if model != engine.model_name:
            raise model_not_found(model)
        return JSONResponse(model_card().model_dump())

    @app.get("/health")
    async def health() -> Response:
        if not engine.ready():
            raise not_ready()
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/admin/state")
    async def admin_state() -> Response:
        return JSONResponse(engine.cluster_state())

    # add_middleware puts each new one outside the previous ones.
    app.add_middleware(BearerAuthMiddleware, api_key=cfg.api_key, admin_token=cfg.admin_token)
    install_error_handlers(app)  # handlers, and the catch-all middleware outside auth
    app.add_middleware(HttpMetricsMiddleware, metrics=metrics)
    return app
