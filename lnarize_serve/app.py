"""The FastAPI application factory. All state lives on ``app.state``."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from fastapi import FastAPI

from lnarize_serve import __version__
from lnarize_serve.errors import install_error_handlers
from lnarize_serve.health import router as health_router
from lnarize_serve.lifecycle import Lifecycle
from lnarize_serve.loop_stall import watch_event_loop
from lnarize_serve.metrics import ServerMetrics, metrics_endpoint
from lnarize_serve.middleware import (
    AccessLogMiddleware,
    AdmissionMiddleware,
    ApiKeyMiddleware,
    BodySizeLimitMiddleware,
    InternalErrorShieldMiddleware,
    RequestAccountingMiddleware,
    ResponseCutMiddleware,
)
from lnarize_serve.runtime import EngineStarter, ServerRuntime
from lnarize_serve.serving import mount_openai_routes
from lnarize_serve.settings import Settings


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    runtime: ServerRuntime = app.state.runtime
    # The engine loads in the background: the server is listening (and
    # answering probes with 503) while weights load and the engine warms up.
    loader = asyncio.create_task(runtime.load(app), name="lnarize-engine-load")
    watchdog = asyncio.create_task(runtime.watch_engine(), name="lnarize-engine-watchdog")
    loop_watch = asyncio.create_task(watch_event_loop(), name="lnarize-loop-stall-watch")
    try:
        yield
    finally:
        for task in (loop_watch, watchdog, loader):
            task.cancel()
        await asyncio.gather(loop_watch, watchdog, loader, return_exceptions=True)
        runtime.stop_during_engine_build()
        await asyncio.to_thread(runtime.shutdown_engine)


def create_app(settings: Settings, *, engine_starter: EngineStarter | None = None) -> FastAPI:
    """Build the app; the engine starts when the app's lifespan starts.

    ``engine_starter`` replaces how the vLLM engine is built (default: a real
    AsyncLLM from the settings' engine arguments).
    """
    app = FastAPI(
        title="lnarize-serve",
        version=__version__,
        lifespan=_lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    lifecycle = Lifecycle()
    metrics = ServerMetrics(settings, __version__)
    runtime_kwargs = {"engine_starter": engine_starter} if engine_starter is not None else {}
    app.state.settings = settings
    app.state.lifecycle = lifecycle
    app.state.metrics = metrics
    app.state.runtime = ServerRuntime(settings, lifecycle, metrics, **runtime_kwargs)

    app.include_router(health_router)
    app.add_api_route("/metrics", metrics_endpoint, methods=["GET"], include_in_schema=False)
    mount_openai_routes(app)
    metrics.routes = frozenset(route.path for route in app.routes)
    install_error_handlers(app)

    # add_middleware wraps: the last one added runs first.
    app.add_middleware(ResponseCutMiddleware)
    app.add_middleware(AdmissionMiddleware)
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_request_bytes)
    if settings.api_key is not None:
        app.add_middleware(ApiKeyMiddleware, api_key=settings.api_key.get_secret_value())
    app.add_middleware(InternalErrorShieldMiddleware)
    app.add_middleware(RequestAccountingMiddleware)
    app.add_middleware(AccessLogMiddleware)
    return app
