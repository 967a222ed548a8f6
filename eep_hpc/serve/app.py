"""The head's HTTP front: an OpenAI-compatible API over an EngineClient.

Routes: POST /v1/completions, POST /v1/chat/completions (SSE when stream=true; serving.py is the way of a request
through them), GET /v1/models[/{model}], GET /health, GET /metrics, GET /admin/state. The head may add more routes
to the returned app; those under /v1/ and /admin/ get the same bearer-token checks. `app.state.engine`,
`app.state.metrics` (whose registry takes more collectors) and `app.state.serving` are set.

Middleware, outermost first: HTTP metrics -> catch-all 500 -> bearer auth -> FastAPI's exception handlers. A streamed
response's body chunks skip them (sse.py); none may rewrite a response body.
"""

from __future__ import annotations

import inspect
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.routing import Match, Route
from starlette.types import Receive, Scope, Send

from eep_hpc.config import ServeConfig
from eep_hpc.serve.auth import BearerAuthMiddleware
from eep_hpc.serve.chat import ChatCompletion
from eep_hpc.serve.completions import Completion
from eep_hpc.serve.engine_client import EngineClient
from eep_hpc.serve.errors import install_error_handlers, model_not_found, not_ready
from eep_hpc.serve.metrics import CONTENT_TYPE, ApiMetrics, HttpMetricsMiddleware
from eep_hpc.serve.openai_protocol import ModelCard, ModelList
from eep_hpc.serve.serving import Serving
from eep_hpc.serve.sse import SERVER_SEND
from eep_hpc.serve.write_log import WriteLog


# FastAPI's native OpenTelemetry (0.16x on) looks up the global tracer, meter and logger providers on every request,
# each a read of the environment: about a tenth of a streamed request's start. eep-hpc configures none (its metrics
# are Prometheus', metrics.py), so it is off.
_NO_TELEMETRY = ({"telemetry": {"tracing": False, "metrics": False, "logs": False}}
                 if "telemetry" in inspect.signature(FastAPI.__init__).parameters else {})


class App(FastAPI):
    """FastAPI that keeps the server's own `send` in the scope, for the streamed chunks (sse.EventStreamResponse)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope[SERVER_SEND] = send
        await super().__call__(scope, receive, send)


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
