"""HTML pages: the estimate form (full page, or its result block alone for htmx), catalog and accuracy."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from jinja2_fragments.fastapi import Jinja2Blocks
from pydantic import ValidationError
from sqlalchemy.orm import Session

from app import services, web_view
from app.accuracy import accuracy_report
from app.core.errors import CoreInputError
from app.deps import SessionDep
from app.errors import InputError, NotFoundError
from app.model_facts import models_with_architecture
from app.schemas import EstimateQuery, QueryFieldError, request_from_query
from app.web_plot import scatter
from app.web_result import result_view

TEMPLATES_DIR = Path(__file__).resolve().parent.parent.parent / "templates"
templates = Jinja2Blocks(directory=str(TEMPLATES_DIR))
templates.env.filters.update(web_view.FILTERS)

router = APIRouter(include_in_schema=False)

def _is_htmx(request: Request) -> bool:
    # History restores also send HX-Request but want the whole page.
    headers = request.headers
    return headers.get("HX-Request") == "true" and headers.get("HX-History-Restore-Request") != "true"


def _field_errors(errors: list[Any]) -> dict[str, str]:
    """pydantic's error list as {field: message} (the first problem of each field)."""
    out: dict[str, str] = {}
    for err in errors:
        loc = [str(part) for part in err.get("loc", ()) if part not in ("query", "body")]
        name = "model_config" if loc and loc[0] == "hf_config" else (loc[0] if loc else "request")
        out.setdefault(name, str(err.get("msg", "invalid value")))
    return out


def _estimate(session: Session, fields: Mapping[str, str]) -> tuple[dict[str, Any] | None, dict[str, str],
                                                                      dict[str, Any] | None, int]:
    """Run the API's own service call on the form's fields: (result, field errors, problem, status)."""
    try:
        query = EstimateQuery.model_validate(dict(fields))
        result = services.run_estimate(session, request_from_query(query), source="query")
    except ValidationError as exc:
        return None, _field_errors(list(exc.errors())), None, 422
    except QueryFieldError as exc:
        return None, _field_errors(exc.errors), None, 422
    except NotFoundError as exc:
        suggestions = list(exc.extra.get("suggestions", []))
        field = exc.field or "model"
        return None, {field: exc.detail}, {"field": field, "suggestions": suggestions}, 404
    except InputError as exc:
        return None, {exc.field: exc.detail}, None, 422
    except CoreInputError as exc:
        return None, {exc.field: exc.message}, None, 422
    return result, {}, None, 200


def _estimate_page(
    request: Request, session: Session, submitted: Mapping[str, str], example: bool
) -> Response:
    fields = web_view.request_fields(submitted)
    result, errors, problem, status = _estimate(session, fields)
    if problem:
        # Each suggestion links to this same estimate with the unknown slug replaced.
        field = problem["field"]
        problem["suggestions"] = [
            (slug, web_view.permalink("/", {**fields, field: slug})) for slug in problem["suggestions"]
        ]
    htmx = _is_htmx(request)
    # The result block alone needs no model list (that only fills the form's datalist).
    models = [] if htmx else services.models_view(session)["models"]
    gpus = services.gpus_view(session)["gpus"]
    names = {g["slug"]: g["name"] for g in gpus}
    page_url = web_view.permalink("/", fields)
    urls = (page_url, web_view.permalink("/api/estimate", fields),
            web_view.curl_command(str(request.base_url), fields))
    context: dict[str, Any] = {
        "form": web_view.form_state(submitted), "errors": errors, "problem": problem, "r": result,
        "example": example, "choices": web_view.CHOICES, "models": models,
        "gpu_groups": web_view.gpu_options(gpus), "advanced_summary": web_view.advanced_summary(fields),
        "advanced_open": any(k in web_view.ADVANCED_FIELDS for k in errors),
        "budget_open": any(k in web_view.BUDGET_FIELDS for k in [*fields, *errors]),
        "gpu_names": names, "view": result_view(result, fields, names, urls),
        "meta_version": (result or {}).get("meta", {}).get("version", ""),
    }
    # The same URL answers with the page or its result block: caches must key on HX-Request.
    headers = {"Vary": "HX-Request"}
    if htmx:
        # The address bar follows the form, so reload, bookmark and back all show this estimate.
        headers["HX-Replace-Url"] = page_url
        return templates.TemplateResponse(request, "index.html", context, status_code=status,
                                          headers=headers, block_names=["result", "status"])
    return templates.TemplateResponse(request, "index.html", context, status_code=status, headers=headers)


@router.get("/")
def index(request: Request, session: SessionDep) -> Response:
    """The estimate page; query parameters are the API's fields (a permalink), none shows an example."""
    submitted = dict(request.query_params)  # last value wins: a checkbox after its hidden "false"
    example = not submitted
    return _estimate_page(request, session, web_view.EXAMPLE if example else submitted, example)


@router.post("/")
async def index_post(request: Request, session: SessionDep) -> Response:
    """The same page for a plain form post (no JavaScript)."""
    form = await request.form()
    submitted = {k: v for k, v in form.items() if isinstance(v, str)}
    return _estimate_page(request, session, submitted, False)


@router.get("/gpus")
def gpus_page(request: Request, session: SessionDep) -> Response:
    """The GPU catalog: specs and dated, sourced prices."""
    view = services.gpus_view(session)
    context = {"gpus": view["gpus"], "groups": web_view.gpu_groups(view["gpus"]), "meta": view["meta"]}
    return templates.TemplateResponse(request, "gpus.html", context)


@router.get("/models")
def models_page(request: Request, session: SessionDep) -> Response:
    """The model catalog with each model's architecture numbers."""
    view = models_with_architecture(session)
    context = {"models": view["models"], "meta": view["meta"]}
    return templates.TemplateResponse(request, "models.html", context)


@router.get("/accuracy")
def accuracy_page(request: Request) -> Response:
    """Measured vs predicted peak memory over the calibration set, and the reference stack."""
    report = accuracy_report()
    context = {"report": report, "plot": scatter(report["rows"]), "error": None}
    return templates.TemplateResponse(request, "accuracy.html", context)
