"""JSON API: /api/estimate (POST body or GET query), /api/gpus, /api/models, /healthz."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from app import services
from app.deps import SessionDep
from app.schemas import (
    EstimateQuery,
    EstimateRequest,
    NotFoundBody,
    QueryFieldError,
    ValidationErrorBody,
    request_from_query,
)
from app.schemas_out import EstimateResponse

router = APIRouter()

_ERRORS: dict[int | str, dict[str, Any]] = {
    200: {"model": EstimateResponse, "description": "The estimate (extra members may be added over time)."},
    404: {"model": NotFoundBody, "description": "Unknown model or GPU; `suggestions` has the closest slugs."},
    422: {"model": ValidationErrorBody,
          "description": "A field is out of bounds or invalid; `loc` names it."},
}


@router.post("/api/estimate", tags=["estimate"], responses=_ERRORS)
def post_estimate(body: EstimateRequest, session: SessionDep) -> JSONResponse:
    """Estimate memory, time, cost and a recommendation from a JSON body."""
    result = services.run_estimate(session, body, source="body")
    return JSONResponse(result)


@router.get("/api/estimate", tags=["estimate"], responses=_ERRORS)
def get_estimate(query: Annotated[EstimateQuery, Query()], session: SessionDep) -> JSONResponse:
    """The same estimate from query parameters: every result has a permalink."""
    try:
        request = request_from_query(query)
    except QueryFieldError as exc:
        raise RequestValidationError(
            [{**err, "loc": ("query", *err["loc"])} for err in exc.errors]
        ) from exc
    result = services.run_estimate(session, request, source="query")
    return JSONResponse(result)


@router.get("/api/gpus", tags=["catalog"])
def get_gpus(session: SessionDep) -> JSONResponse:
    """Every catalog GPU with its prices (each with the date it was observed and its source)."""
    return JSONResponse(services.gpus_view(session))


@router.get("/api/models", tags=["catalog"])
def get_models(session: SessionDep) -> JSONResponse:
    """Every catalog model with its size, and the catalog's dated prices."""
    return JSONResponse(services.models_view(session))


@router.get("/healthz", tags=["ops"])
def healthz(session: SessionDep) -> JSONResponse:
    """Liveness and readiness: the database answers and the catalog is loaded (503 otherwise)."""
    body = services.health(session)
    return JSONResponse(body, status_code=200 if body["status"] == "ok" else 503)
