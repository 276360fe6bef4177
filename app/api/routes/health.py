"""Readiness for nginx and Ansible, and the Prometheus scrape."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse

from app.api.deps import StateDep
from app.api.schemas import EngineOut, HealthOut, QueueOut
from app.api.serving import in_thread
from app.db import UNAVAILABLE_ERRORS, describe_db_error, ping

router = APIRouter(tags=["health"])


@router.get("/api/health", response_model=HealthOut, responses={503: {"model": HealthOut}})
async def health(state: StateDep) -> JSONResponse:
    try:
        await in_thread(ping, state.db_engine)
        db = "ok"
    except UNAVAILABLE_ERRORS as error:
        db = describe_db_error(error)
    stats = state.engine_stats()
    failure = state.engine.failure
    if failure is not None:
        status = "failed"
    elif state.draining or (stats is not None and not stats.accepting and state.engine_started):
        status = "draining"
    elif not state.engine_started or stats is None:
        status = "starting"
    elif db != "ok":
        status = "degraded"
    else:
        status = "ok"
    body = HealthOut(
        status=status,
        instance=state.instance_name,
        model=state.engine.model_name,
        device=str(state.engine.device),
        engine=EngineOut(**state.engine_description()),
        db=db,
        queue=QueueOut(
            running=stats.running if stats else 0,
            queued=stats.queued if stats else 0,
            max_batch_size=stats.max_batch_size if stats else state.settings.max_batch_size,
            max_queue=stats.max_queue if stats else state.settings.max_queue,
        ),
        in_flight=state.in_flight,
        reason=failure,
    )
    content = body.model_dump()
    if failure is None:
        del content["reason"]  # present only when the engine failed
    return JSONResponse(content, status_code=200 if status == "ok" else 503)


@router.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
def metrics(state: StateDep) -> Response:
    return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")
