"""Catalog writes under /api/admin/, only with `Authorization: Bearer $TUNEFIT_ADMIN_TOKEN`."""

from __future__ import annotations

import contextlib
import hmac
from collections.abc import Iterator
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, HTTPException, Request
from fastapi.responses import JSONResponse

from app import catalog
from app.catalog_rows import ImportReport
from app.deps import SessionDep, SettingsDep
from app.errors import AppError, InputError
from app.models import Gpu, Model, Price


class ConflictError(AppError):
    """The write contradicts what the catalog already records (prices are never overwritten)."""

    status_code = 409


class BadImportError(AppError):
    """A CSV import had rejected rows; `errors` lists each with its line number. Nothing changed."""

    status_code = 422


def require_admin(request: Request, settings: SettingsDep) -> None:
    """Refuse unless the bearer token equals TUNEFIT_ADMIN_TOKEN (403 when writes are disabled)."""
    expected = settings.admin_token
    if not expected:
        raise HTTPException(403, "catalog writes are disabled (set TUNEFIT_ADMIN_TOKEN to enable them)")
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    # compare_digest: the time taken does not reveal how much of the token matched.
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), expected.encode()):
        raise HTTPException(
            401, "a valid admin bearer token is required", headers={"WWW-Authenticate": "Bearer"}
        )


router = APIRouter(prefix="/api/admin", tags=["admin"], dependencies=[Depends(require_admin)])
JsonBody = Annotated[dict[str, Any], Body()]


def price_json(p: Price) -> dict[str, Any]:
    """A price row as JSON."""
    return {
        "id": p.id, "gpu": p.gpu.slug, "provider": p.provider, "kind": p.kind,
        "usd_per_gpu_hour": p.usd_per_gpu_hour, "observed_on": p.observed_on.isoformat(),
        "source": p.source, "note": p.note,
    }


def gpu_json(g: Gpu) -> dict[str, Any]:
    """A GPU row as JSON (its facts, without prices)."""
    skip = {"id", "updated_at", "prices"}
    return {c.key: getattr(g, c.key) for c in Gpu.__table__.columns if c.key not in skip}


def model_json(m: Model) -> dict[str, Any]:
    """A model row as JSON (config omitted: it is the caller's own input)."""
    skip = {"id", "updated_at", "config"}
    return {c.key: getattr(m, c.key) for c in Model.__table__.columns if c.key not in skip}


@contextlib.contextmanager
def _catalog_write() -> Iterator[None]:
    """Turn a refused catalog write into its HTTP error (409 for a price conflict, else 422)."""
    try:
        yield
    except catalog.PriceConflictError as exc:
        raise ConflictError(exc.message, field=exc.field) from None
    except catalog.CatalogWriteError as exc:
        raise InputError(exc.field, exc.message) from None


def _upserted(name: str, row: dict[str, Any], outcome: str) -> JSONResponse:
    """The written row and its outcome: 201 when inserted, 200 when updated or unchanged."""
    return JSONResponse({name: row, "outcome": outcome}, status_code=201 if outcome == "inserted" else 200)


@router.post("/prices", status_code=201)
def post_price(payload: JsonBody, session: SessionDep) -> JSONResponse:
    """Append one dated, sourced price observation (history is kept; an existing date is a 409)."""
    if "gpu" in payload and "gpu_slug" not in payload:
        payload = {**payload, "gpu_slug": payload["gpu"]}
    payload.pop("gpu", None)
    with _catalog_write():
        price = catalog.add_price(session, payload)
    history = catalog.list_prices(session, gpu_slug=price.gpu.slug, provider=price.provider, kind=price.kind)
    body = {"price": price_json(price), "history": [price_json(p) for p in history]}
    return JSONResponse(body, status_code=201)


@router.post("/gpus", status_code=201)
def post_gpu(payload: JsonBody, session: SessionDep) -> JSONResponse:
    """Insert a GPU (201) or update its facts by slug (200); fields as in data/gpus.csv."""
    with _catalog_write():
        gpu, outcome = catalog.add_gpu(session, payload)
    return _upserted("gpu", gpu_json(gpu), outcome)


@router.post("/models", status_code=201)
def post_model(payload: JsonBody, session: SessionDep) -> JSONResponse:
    """Insert a model (201) or update it by slug (200): slug, hf_id, name, license, gated, source, config."""
    with _catalog_write():
        model, outcome = catalog.add_model(session, payload)
    return _upserted("model", model_json(model), outcome)


async def _csv_text(request: Request) -> str:
    """The request body as UTF-8 text (422 when it is not)."""
    raw = await request.body()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InputError("body", "the CSV file must be UTF-8 text") from None


def _import_response(report: ImportReport) -> JSONResponse:
    """200 with the import's counts, or 422 listing every rejected row (nothing was imported)."""
    if not report.ok:
        raise BadImportError(
            f"{len(report.errors)} bad row(s); nothing was imported", **report.as_dict()
        )
    return JSONResponse(report.as_dict(), status_code=200)


_CSV_BODY: dict[str, Any] = {
    "requestBody": {"required": True, "content": {"text/csv": {"schema": {"type": "string"}}}}
}


@router.post("/import/prices", openapi_extra=_CSV_BODY)
async def import_prices(request: Request, session: SessionDep) -> JSONResponse:
    """Append price rows from a CSV body (header as data/prices.csv); any bad row changes nothing (422)."""
    return _import_response(catalog.import_prices_csv(session, await _csv_text(request)))


@router.post("/import/gpus", openapi_extra=_CSV_BODY)
async def import_gpus(request: Request, session: SessionDep) -> JSONResponse:
    """Insert/update GPUs from a CSV body (header as data/gpus.csv); any bad row changes nothing (422)."""
    return _import_response(catalog.import_gpus_csv(session, await _csv_text(request)))
