"""Liveness and readiness probes (small JSON bodies with a status word)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse

from lnarize_serve.lifecycle import Lifecycle

RETRY_AFTER_SECONDS = 5

router = APIRouter()


def _lifecycle(request: Request) -> Lifecycle:
    return request.app.state.lifecycle


@router.get("/health/live")
async def live(request: Request) -> JSONResponse:
    lifecycle = _lifecycle(request)
    if lifecycle.alive:
        return JSONResponse({"status": "alive", "phase": lifecycle.phase.value})
    return JSONResponse({"status": "dead", "phase": lifecycle.phase.value, "detail": lifecycle.detail}, status_code=503)


@router.get("/health/ready")
async def ready(request: Request) -> JSONResponse:
    lifecycle = _lifecycle(request)
    if lifecycle.ready:
        return JSONResponse({"status": "ready", "phase": lifecycle.phase.value})
    return JSONResponse(
        {"status": "not_ready", "phase": lifecycle.phase.value, "detail": lifecycle.detail},
        status_code=503,
        headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
    )


# Alias for tools (load balancers, vLLM-style clients) that probe /health.
router.add_api_route("/health", ready, methods=["GET"])
